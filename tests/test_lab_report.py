"""A real 2x2 sweep of tiny runs: killed half-way, resumed, then reported.

The module fixture starts ``peftlab sweep`` as a subprocess, SIGKILLs it while the second run is
in its worker, checks nothing is left running, and runs the same command again (2 at a time).
The tests then check what resuming did and what the report contains: a real PNG whose figure
has one line and one legend entry per run on both axes, tables with the right numbers, the
best value marked, and the generations of every run side by side.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import peftlab
from test_lab_sweep import tiny_sweep, write_data

pytest.importorskip("matplotlib")
pytest.importorskip("sacrebleu")

SRC = str(Path(peftlab.__file__).resolve().parents[1])
NAMES = ["full-lr0.001", "full-lr0.01", "lora-lr0.001", "lora-lr0.01"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _workers_of(run_dir: Path) -> list[int]:
    """Pids of live processes whose command line names ``run_dir`` (the sweep's workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
            except OSError:
                continue
            if "peftlab.lab.worker" in cmd and str(run_dir) in cmd and "zombie" not in state:
                pids.append(int(d.name))
    return pids


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    data = write_data(tmp / "d.json")
    f = tiny_sweep(tmp / "s.yaml", data, name="grid2x2",
                   variants=[{"name": "full", "peft.method": "full"}, {"peft.method": "lora", "peft.r": 4}],
                   grid={"train.lr": [1e-3, 1e-2]})
    out = tmp / "out"
    cmd = [sys.executable, "-m", "peftlab", "sweep", str(f), "--output", str(out)]
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run1, run2 = out / "runs" / NAMES[0], out / "runs" / NAMES[1]
    deadline = time.time() + 300  # a wait, not a speed check: CI machines may be busy (the second call allows 300 s too)
    while time.time() < deadline and not (_workers_of(run2) and (run1 / "result.json").exists()):
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.05)
    assert (run1 / "result.json").exists(), "the first run did not finish in time"
    first.send_signal(signal.SIGKILL)  # the sweep dies at once, in the middle of run 2
    first.wait()
    killed_output = first.stdout.read()
    # its worker notices (PR_SET_PDEATHSIG) and goes too: nothing keeps running on its own
    for _ in range(100):
        if not _workers_of(run2):
            break
        time.sleep(0.1)
    assert not _workers_of(run2)
    state_after_kill = {
        "run1_result": (run1 / "result.json").read_bytes(),
        "run1_mtime": (run1 / "result.json").stat().st_mtime_ns,
        "run2_has_result": (run2 / "result.json").exists(),
        "output": killed_output,
    }
    second = subprocess.run([*cmd, "--parallel", "2"], env=_env(), capture_output=True, text=True, timeout=300)
    return {"out": out, "killed": state_after_kill, "second": second}


def test_killed_sweep_resumes_and_skips_finished_runs(swept):
    killed, second, out = swept["killed"], swept["second"], swept["out"]
    assert "[1/4] full-lr0.001: ok" in killed["output"]
    assert not killed["run2_has_result"]  # killed half-way: not marked done
    assert second.returncode == 0, second.stdout + second.stderr
    assert "[1/4] full-lr0.001: done already, skipped" in second.stdout
    assert "1 skipped" in second.stdout and "3 ran ok" in second.stdout
    run1 = out / "runs" / NAMES[0]
    assert (run1 / "result.json").read_bytes() == killed["run1_result"]  # untouched
    assert (run1 / "result.json").stat().st_mtime_ns == killed["run1_mtime"]
    for name in NAMES:
        res = json.loads((out / "runs" / name / "result.json").read_text())
        assert res["train_info"]["status"] == "success", res["run_info"]["error_msg"]
        metrics = [json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2, 3]  # the killed run 2 restarted cleanly
        assert res["train_info"]["peak_memory_bytes"] > 50 * 2**20
        assert res["train_info"]["process_peak_rss_bytes"] >= res["train_info"]["peak_memory_bytes"] * 0.9
    # run 2 was started twice: its log says so
    assert (out / "runs" / NAMES[1] / "log.txt").read_text().count("=== ") == 2


def test_report_png_has_one_line_per_run(swept):
    from matplotlib.image import imread
    from PIL import Image

    from peftlab.lab.plots import curves_figure
    from peftlab.lab.report import collect

    out = swept["out"]
    png = out / "curves.png"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 300
    assert imread(png).ndim == 3

    runs, _ = collect([out])
    fig = curves_figure({r.name: r.metrics for r in runs})
    ax_train, ax_eval = fig.axes
    for ax in (ax_train, ax_eval):
        assert len(ax.get_lines()) == 4
        assert [t.get_text() for t in ax.get_legend().get_texts()] == NAMES
    full = ax_train.get_lines()[0]
    assert full.get_linestyle() == "--" and full.get_color() == "black"  # full FT stands out
    assert list(full.get_xdata()) == [1, 2, 3]
    assert list(ax_eval.get_lines()[2].get_xdata()) == [2, 3]  # eval every 2 steps + the last
    want = [json.loads(x)["loss"] for x in (out / "runs" / NAMES[2] / "metrics.jsonl").read_text().splitlines()]
    assert list(ax_train.get_lines()[2].get_ydata()) == want


def test_report_html_and_markdown(swept):
    out = swept["out"]
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    # self-contained: the PNG is inside the page, byte for byte
    embedded = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html).group(1)
    assert base64.b64decode(embedded) == (out / "curves.png").read_bytes()
    assert "<link" not in html and "<script" not in html

    results = {n: json.loads((out / "runs" / n / "result.json").read_text()) for n in NAMES}
    full_total = results[NAMES[0]]["train_info"]["num_total_params"]
    lora = results[NAMES[2]]["train_info"]
    assert results[NAMES[0]]["train_info"]["num_trainable_params"] == full_total
    # r x layers x sum(in + out) of GPT-2's four Conv1D layers per block
    assert lora["num_trainable_params"] == 4 * 2 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert f"| full-lr0.001 | full | – | {full_total:,} | {full_total:,} | 100.0000% |" in md
    pct = 100 * lora["num_trainable_params"] / lora["num_total_params"]
    assert (f"| lora-lr0.001 | lora | 4 | {lora['num_trainable_params']:,} | {lora['num_total_params']:,} "
            f"| {pct:.4f}% |") in md

    # the best eval loss is bold in its column, in its run's row, and nowhere else in that column
    losses = {n: r["train_info"]["eval"]["eval_loss"] for n, r in results.items()}
    best = min(losses, key=losses.get)
    quality = md.split("## Quality")[1].split("##")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in quality.splitlines() if line.startswith("| ")}
    header = rows["run"].strip("| ").split(" | ")
    col = header.index("eval loss")
    for name in NAMES:
        cell = rows[name].strip("| ").split(" | ")[col]
        assert cell == (f"**{losses[name]:.4f}**" if name == best else f"{losses[name]:.4f}")
    assert html.count("class=best") >= 1

    # side-by-side: every run's answer to every fixed prompt, in both files
    for prompt in ("Hi", "What is 2 + 2?"):
        assert f"### {prompt}" in md
        for name, res in results.items():
            answer = next(s["answer"] for s in res["samples"] if s["prompt"] == prompt)
            shown = answer.replace('|', chr(92) + '|').replace(chr(10), '<br>') or "–"  # an empty answer is a dash
            assert f"| {name} | {shown} |" in md
    assert html.count("<div class=card>") == 2 * 4
    assert "peak memory (training)" in md and "train time" in md


def test_report_command_on_run_dirs(swept, tmp_path):
    from peftlab import cli

    out = swept["out"]
    dirs = [str(out / "runs" / n) for n in NAMES[:2]]
    assert cli.main(["report", *dirs, "--output", str(tmp_path / "r"), "--no-generate", "--title", "two runs"]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.startswith("# two runs") and "full-lr0.01" in md and "lora-lr0.001" not in md
    assert (tmp_path / "r" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["report", str(tmp_path / "nothing-here")]) == 2


def test_plot_curves_for_quickstart(tmp_path):
    from peftlab.lab.plots import plot_curves

    metrics = [{"step": s, "loss": 2.0 / s, **({"eval_loss": 2.5 / s} if s % 5 == 0 else {})} for s in range(1, 21)]
    path = plot_curves({"lora": metrics}, tmp_path / "loss.png")
    assert path == tmp_path / "loss.png" and path.read_bytes()[:4] == b"\x89PNG"
