"""The report's "Across seeds" section and figure, on a sweep directory with known numbers.

The runs' ``config.yaml`` are the ones a real sweep saves: each point is planned by ``plan``, given
its run directory by the worker's ``_config`` (output directory, threads, overwrite as a resumed
run has it) and written by ``Config.save`` as the training loop does. Their metrics and scores are
written by hand, so the means, minima and maxima below are computed by hand too.

    full-seed1, full-seed2, full-seed3 (failed)         -> group "full", seeds 1, 2
    lora-seed1, lora-seed2 (resumed, 2 threads), lora-seed3  -> group "lora", seeds 1, 2, 3
    lora-hi-seed1 (lr 1e-2), lora-hi-seed2/3 (failed)   -> no group: one seed, and another lr than lora
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from peftlab.lab.seeds import band, group_by_seed, group_name
from peftlab.lab.sweep import plan, run_spec
from peftlab.lab.worker import _config
from test_lab_sweep import tiny_sweep

pytest.importorskip("matplotlib")

# per run: train loss at steps 1-4, eval loss by step, held-out scores (None: the run failed)
RUNS = {
    "full-seed1": ([1.8, 1.2, 0.8, 0.6], {2: 1.3, 4: 1.6}, {"eval_loss": 1.62, "exact_match": 0.25, "rouge1": 0.4, "bleu4": 0.05}),
    "full-seed2": ([1.9, 1.3, 0.9, 0.7], {2: 1.5, 4: 1.8}, {"eval_loss": 1.78, "exact_match": 0.5, "rouge1": 0.5, "bleu4": 0.15}),
    "full-seed3": None,
    "lora-seed1": ([2.0, 1.6, 1.2, 1.0], {2: 1.5, 4: 1.4}, {"eval_loss": 1.39, "exact_match": 0.5, "rouge1": 0.6, "bleu4": 0.2}),
    "lora-seed2": ([2.2, 1.8, 1.4, 1.1], {2: 1.6, 4: 1.7}, {"eval_loss": 1.69, "exact_match": 0.25, "rouge1": 0.5, "bleu4": 0.1}),
    # an extra eval at step 1 that the other seeds lack: the mean curve skips it
    "lora-seed3": ([2.4, 1.7, 1.3, 1.3], {1: 2.5, 2: 1.4, 4: 1.6}, {"eval_loss": 1.58, "exact_match": 0.75, "rouge1": 0.7, "bleu4": 0.3}),
    "lora-hi-seed1": ([2.0, 1.0, 0.5, 0.2], {2: 1.2, 4: 1.1}, {"eval_loss": 1.1, "exact_match": 1.0, "rouge1": 0.9, "bleu4": 0.5}),
    "lora-hi-seed2": None,
    "lora-hi-seed3": None,
}


def _write_run(sweep, point, numbers) -> None:
    run_dir = sweep.run_dir(point)
    run_dir.mkdir(parents=True)
    spec = run_spec(sweep, point)
    spec["config"]["train"].pop("threads")
    spec["threads"], spec["resume"] = (2, True) if point.name == "lora-seed2" else (1, False)
    cfg, _ = _config(spec, run_dir)
    cfg.save(run_dir / "config.yaml")
    if numbers is None:
        (run_dir / "result.json").write_text(json.dumps(
            {"run_info": {"error_msg": "RuntimeError: boom"}, "train_info": {"status": "failed"}}))
        return
    train, evals, scores = numbers
    records = [{"step": s, **({"loss": train[s - 1]} if s <= len(train) else {}),
                **({"eval_loss": evals[s]} if s in evals else {})} for s in range(1, 5)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "result.json").write_text(json.dumps(
        {"run_info": {"error_msg": "", "total_time": 1.0},
         "train_info": {"status": "success", "train_time": 1.0, "eval": scores}, "samples": []}))


@pytest.fixture
def seeds_sweep(tmp_path):
    f = tiny_sweep(tmp_path / "s.yaml", "d.json", name="seeds",
                   variants=[{"name": "full", "peft.method": "full", "train.lr": 1e-4},
                             {"name": "lora", "peft.method": "lora", "train.lr": 1e-3},
                             {"name": "lora-hi", "peft.method": "lora", "train.lr": 1e-2}],
                   grid={"train.seed": [1, 2, 3]})
    sweep = plan(f, tmp_path / "out")
    assert [p.name for p in sweep.points] == list(RUNS)
    for p in sweep.points:
        _write_run(sweep, p, RUNS[p.name])
    (tmp_path / "out" / "sweep.json").write_text(json.dumps(
        {"name": "seeds", "runs": [{"name": p.name} for p in sweep.points]}))
    return tmp_path / "out"


def _table(md: str, section: str) -> dict[str, dict[str, str]]:
    """{first cell: {header: cell}} of the Markdown table under ``## section``."""
    part = md.split(f"## {section}")[1].split("\n## ")[0]
    lines = [ln.strip("| ").split(" | ") for ln in part.splitlines() if ln.startswith("| ")]
    return {row[0]: dict(zip(lines[0], row)) for row in lines[1:]}


def test_groups_only_runs_that_differ_by_seed(seeds_sweep):
    from peftlab.lab.report import collect

    runs, _ = collect([seeds_sweep])
    # configs really differ in more than the seed (where and how each ran), and that does not split them
    by_name = {r.name: r.config["train"] for r in runs}
    assert by_name["lora-seed1"]["output_dir"] != by_name["lora-seed3"]["output_dir"]
    assert (by_name["lora-seed2"]["threads"], by_name["lora-seed2"]["overwrite"]) == (2, False)
    assert (by_name["lora-seed1"]["threads"], by_name["lora-seed1"]["overwrite"]) == (1, True)
    groups = group_by_seed(runs)
    assert [(g.name, [r.name for r in g.runs], g.seeds) for g in groups] == [
        ("full", ["full-seed1", "full-seed2"], [1, 2]),  # the failed seed 3 is left out
        ("lora", ["lora-seed1", "lora-seed2", "lora-seed3"], [1, 2, 3]),  # not lora-hi-seed1 (another lr)
    ]  # lora-hi: a lone successful seed is no group
    lora = groups[1]
    assert band([r.metrics for r in lora.runs], "eval_loss") == [  # step 1: only seed 3 has it
        pytest.approx((2, 1.5, 1.4, 1.6)), pytest.approx((4, (1.4 + 1.7 + 1.6) / 3, 1.4, 1.7))]
    assert lora.mean_curve_lowest() == (2, pytest.approx(1.5))


@pytest.mark.parametrize("names, want", [
    (["lora-r8-seed1", "lora-r8-seed2"], "lora-r8"),
    (["seed1-lora", "seed2-lora"], "lora"),
    (["runs/full-seed1", "runs/full-seed2"], "runs/full"),
    (["run_a", "run_b"], "run"),  # no seed label: what the names have in common
    (["alpha", "beta", "gamma"], "alpha (+2)"),
    (["seed1", "seed2"], "seed"),
])
def test_group_name(names, want):
    assert group_name(names) == want


def test_report_shows_mean_and_range_over_seeds(seeds_sweep):
    from peftlab.lab.report import write_report

    paths = write_report([seeds_sweep], seeds_sweep, generate_missing=False)
    md, html = paths["md"].read_text(), paths["html"].read_text()
    seeds = _table(md, "Across seeds")
    assert list(seeds) == ["full", "lora"]
    want = {  # mean (min–max) of the numbers in RUNS, bold where the mean is the best of its column
        "full": {"seeds": "2: 1, 2", "final train loss": "**0.6500 (0.6000–0.7000)**",
                 "eval loss": "1.7000 (1.6200–1.7800)", "curve's lowest eval loss": "**1.4000 (1.3000–1.5000)**",
                 "curve's last eval loss": "1.7000 (1.6000–1.8000)", "BLEU-4": "10.0 (5.0–15.0)",
                 "ROUGE-1": "45.0 (40.0–50.0)", "exact match %": "37.5 (25.0–50.0)",
                 "mean eval curve's lowest (step)": "**1.4000 (2)**"},
        "lora": {"seeds": "3: 1, 2, 3", "final train loss": "1.1333 (1.0000–1.3000)",
                 "eval loss": "**1.5533 (1.3900–1.6900)**", "curve's lowest eval loss": "1.4667 (1.4000–1.6000)",
                 "curve's last eval loss": "**1.5667 (1.4000–1.7000)**", "BLEU-4": "**20.0 (10.0–30.0)**",
                 "ROUGE-1": "**60.0 (50.0–70.0)**", "exact match %": "**50.0 (25.0–75.0)**",
                 "mean eval curve's lowest (step)": "1.5000 (2)"},
    }
    for name, cells in want.items():
        assert {k: v for k, v in seeds[name].items() if k != "group"} == cells
    # the per-run tables are still there, every run that finished in its own row
    assert list(_table(md, "Quality")) == ["full-seed1", "full-seed2", "lora-seed1", "lora-seed2", "lora-seed3",
                                           "lora-hi-seed1"]
    assert "- **lora-hi-seed2**: failed — `RuntimeError: boom`" in md
    assert md.index("## Across seeds") < md.index("## Quality")
    # the figure: beside the Markdown, inside the HTML byte for byte
    assert paths["seeds_png"] == seeds_sweep / "curves_seeds.png"
    assert "![mean train and eval loss over the seeds vs step, min-max shaded](curves_seeds.png)" in md
    images = [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)]
    assert images == [paths["png"].read_bytes(), paths["seeds_png"].read_bytes()]
    assert "<h2>Across seeds</h2>" in html and "1.5533 (1.3900–1.6900)" in html


def test_seed_figure_has_one_line_and_band_per_group(seeds_sweep):
    from peftlab.lab.plots import seed_curves_figure
    from peftlab.lab.report import collect

    runs, _ = collect([seeds_sweep])
    fig = seed_curves_figure({g.name: [r.metrics for r in g.runs] for g in group_by_seed(runs)})
    ax_train, ax_eval = fig.axes
    for ax in (ax_train, ax_eval):
        assert len(ax.get_lines()) == 2 and len(ax.collections) == 2  # a mean line and a band per group
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full (2 seeds)", "lora (3 seeds)"]
        full = ax.get_lines()[0]
        assert full.get_linestyle() == "--" and full.get_color() == "black"
    full_train, lora_train = ax_train.get_lines()
    assert list(full_train.get_xdata()) == [1, 2, 3, 4]
    assert list(full_train.get_ydata()) == pytest.approx([1.85, 1.25, 0.85, 0.65])
    lora_eval = ax_eval.get_lines()[1]
    assert list(lora_eval.get_xdata()) == [2, 4]
    assert list(lora_eval.get_ydata()) == pytest.approx([1.5, (1.4 + 1.7 + 1.6) / 3])
    ys = ax_eval.collections[1].get_paths()[0].vertices[:, 1]  # the lora band: min 1.4, max 1.7 over steps 2, 4
    assert (ys.min(), ys.max()) == pytest.approx((1.4, 1.7))


def test_no_groups_no_section_and_the_rest_unchanged(seeds_sweep, tmp_path, monkeypatch):
    from peftlab.lab import report

    # one run per config: nothing to take together, so no section, no figure (an old one is removed)
    singles = [seeds_sweep / "runs" / n for n in ("full-seed1", "lora-seed1", "lora-hi-seed1")]
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "curves_seeds.png").write_bytes(b"stale")
    paths = report.write_report(singles, tmp_path / "r", generate_missing=False)
    md, html = paths["md"].read_text(), paths["html"].read_text()
    assert "Across seeds" not in md and "Across seeds" not in html and "curves_seeds" not in md
    assert "seeds_png" not in paths and not (tmp_path / "r" / "curves_seeds.png").exists()
    assert html.count("data:image/png") == 1
    # with groups, the rest of the report is what it is without the feature
    from peftlab.lab import render

    monkeypatch.setattr(render.time, "strftime", lambda fmt, *a: "2026-01-01 00:00")
    runs, sweeps = report.collect([seeds_sweep])
    with_groups = render.markdown(render.content(runs, sweeps, group_by_seed(runs), "t"), "curves.png",
                                  "curves_seeds.png")
    without = render.markdown(render.content(runs, sweeps, [], "t"), "curves.png", "curves_seeds.png")
    section = re.search(r"## Across seeds.*?(?=\n## )", with_groups, re.S).group(0)
    assert with_groups.replace(section + "\n", "") == without


def test_setup_line_names_every_seed_and_the_budget_it_ran():
    from peftlab.lab.render import setup_lines
    from peftlab.lab.report import RunView

    def run(name, seed, **train):
        return RunView(name, Path(name), config={"model": {"name": "m"}, "data": {"path": "d"},
                                                 "train": {"seed": seed, "lr": 1e-3, **train}})

    line = setup_lines([run("a", 3, steps=48), run("b", 1, steps=48), run("c", 3, steps=48)], [])[0]
    assert "48 steps of batch" in line and line.endswith("; seeds 3, 1")
    line = setup_lines([run("a", 2, steps=None, epochs=3)], [])[0]
    assert "3 epochs of batch" in line and "steps" not in line and line.endswith("; seed 2")
