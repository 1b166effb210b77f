"""A comparison report over runs: one self-contained HTML page and a Markdown file.

This module reads the runs (``RunView``, ``load_run``, ``collect``, ``ensure_samples``) and writes
the files (``write_report``); ``tables`` says what each column holds and which value is best,
``render`` what the pages say, ``plots`` draws the figures, ``seeds`` groups runs by seed.

Sections: the setup (sweeps, model, data, budget, schedule, seeds, learning rates); the
trainable-parameter table (method, rank, trainable, total, %); learning curves (train and eval loss
vs step, one line per run, PNG; embedded as base64 in the HTML, a file beside the Markdown); when
runs differ only by seed (``seeds.group_by_seed``), "Across seeds": per group the mean (min–max)
over its seeds of each quality column and the mean eval curve's lowest point, and
``curves_seeds.png`` (mean curves, min-max shaded); the quality table (losses, perplexity, BLEU-4,
ROUGE-1/2/L, exact match, preference accuracy, long-answer accuracy) and the cost table (train
time, total time, peak memory, file size, throughput), each with the best value per column in bold;
side-by-side generations of every run for a fixed prompt list (the seeds' four by default); failed
runs with their error.

Inputs are run directories (``peftlab train`` output, optionally with ``eval/metrics.json``
from ``peftlab eval --run``) and sweep directories (``sweep.json`` + ``runs/<name>/``). A run
without stored samples gets them generated here (``generate_missing``), cached in
``RUN/samples.json``.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..eval.harness import DEFAULT_PROMPTS
from ..io import atomic_write_text
from ..rundir import (
    artifact_size,
    is_run_dir,
    peak_memory_bytes,
    read_json,
    read_metrics,
    read_summary,
    run_artifact,
    saved_config,
)
from . import render
from .seeds import group_by_seed


@dataclass
class RunView:
    """What the report knows about one run."""

    name: str
    dir: Path
    status: str = "success"  # success | failed | not run | unfinished
    error: str = ""
    config: dict = field(default_factory=dict)
    method: str = "?"
    rank: int | None = None
    trainable: int | None = None
    total: int | None = None
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl records
    eval: dict = field(default_factory=dict)  # final held-out scores
    train_time: float | None = None
    train_cpu: float | None = None  # CPU seconds (user + system) up to the end of training
    total_time: float | None = None
    total_cpu: float | None = None
    peak_memory: int | None = None  # bytes, the training process (summary.json)
    process_peak: int | None = None  # bytes, the whole worker process (sweeps)
    file_size: int | None = None
    samples: list[dict] = field(default_factory=list)  # {"prompt", "answer"}

    @property
    def percent(self) -> float | None:
        return 100.0 * self.trainable / self.total if self.trainable is not None and self.total else None

    @property
    def final_train_loss(self) -> float | None:
        losses = [r["loss"] for r in self.metrics if r.get("loss") is not None]
        return losses[-1] if losses else None

    @property
    def eval_curve(self) -> list[tuple[int, float]]:
        return [(r["step"], r["eval_loss"]) for r in self.metrics if r.get("eval_loss") is not None]

    @property
    def final_eval_loss(self) -> float | None:
        if self.eval.get("eval_loss") is not None:
            return self.eval["eval_loss"]
        curve = self.eval_curve
        return curve[-1][1] if curve else None

    @property
    def best_eval(self) -> tuple[int, float] | None:
        curve = self.eval_curve
        return min(curve, key=lambda sv: sv[1]) if curve else None

    @property
    def tokens_per_s(self) -> float | None:
        v = [r["tokens_per_s"] for r in self.metrics if r.get("tokens_per_s")]
        return statistics.median(v) if v else None

    def answer(self, prompt: str) -> str | None:
        """The stored answer to ``prompt``; None when there is none."""
        return next((s.get("answer", "") for s in self.samples if s.get("prompt") == prompt), None)


def load_run(run_dir: Path, name: str | None = None) -> RunView:
    run_dir = Path(run_dir)
    view = RunView(name or run_dir.name, run_dir)
    result = read_json(run_dir / "result.json") or {}
    run_info, train_info = result.get("run_info", {}), result.get("train_info", {})
    try:
        config = saved_config(run_dir)
    except ConfigError:
        config = None
    view.config = config or run_info.get("train_config") or {}
    peft = view.config.get("peft") or {}
    view.method = str(peft.get("method", "?"))
    view.rank = peft.get("r")
    summary = read_summary(run_dir) or {}
    view.trainable = train_info.get("num_trainable_params", summary.get("trainable"))
    view.total = train_info.get("num_total_params", summary.get("total"))
    view.metrics = read_metrics(run_dir) or train_info.get("metrics") or []
    view.eval = dict(train_info.get("eval") or read_json(run_dir / "eval" / "metrics.json") or {})
    view.train_time = train_info.get("train_time", summary.get("wall_time_s"))
    view.total_time = run_info.get("total_time")
    view.train_cpu = train_info.get("train_cpu_s")
    view.total_cpu = run_info.get("process_cpu_s")
    mem = train_info.get("peak_memory_bytes")
    view.peak_memory = mem if mem is not None else peak_memory_bytes(summary)
    view.process_peak = train_info.get("process_peak_rss_bytes")
    view.file_size = train_info.get("file_size") or artifact_size(run_dir)
    view.samples = result.get("samples") or (read_json(run_dir / "samples.json") or {}).get("samples") or []
    if result:
        view.status = train_info.get("status", "failed")
        view.error = run_info.get("error_msg") or ""
    elif not summary:
        view.status = "unfinished"
    return view


def collect(paths: list[str | Path]) -> tuple[list[RunView], list[dict]]:
    """(runs, sweeps) from run and sweep directories, in the order given (a sweep's in plan order)."""
    runs: list[RunView] = []
    sweeps: list[dict] = []
    for p in map(Path, paths):
        plan = read_json(p / "sweep.json")
        if plan is not None:
            sweeps.append({**plan, "dir": str(p)})
            for entry in plan.get("runs", []):
                d = p / "runs" / entry["name"]
                if d.is_dir():
                    runs.append(load_run(d))
                else:
                    runs.append(RunView(entry["name"], d, status="not run"))
        elif is_run_dir(p) or (p / "result.json").is_file():
            runs.append(load_run(p))
        elif p.is_dir() and any(is_run_dir(c) for c in p.iterdir() if c.is_dir()):
            runs.extend(load_run(c) for c in sorted(p.iterdir()) if is_run_dir(c))
        else:
            raise ConfigError(f"{str(p)!r} is neither a run directory (config.yaml) nor a sweep directory "
                              "(sweep.json); give the directories `peftlab train` or `peftlab sweep` wrote")
    names: dict[str, int] = {}
    for r in runs:
        names[r.name] = names.get(r.name, 0) + 1
    for r in runs:  # two runs called "latest" from different places: say which is which
        if names[r.name] > 1:
            r.name = f"{r.dir.parent.name}/{r.dir.name}"
    if not runs:
        raise ConfigError(f"no runs found in {', '.join(map(str, paths))}")
    return runs, sweeps


def ensure_samples(run: RunView, prompts: list[str], max_new_tokens: int = 128, say=print) -> None:
    """Generate ``prompts`` with a finished run's model (greedy) unless they are stored already."""
    if run.status not in ("success", "unfinished"):
        return
    if [s.get("prompt") for s in run.samples] == list(prompts):
        return
    if run_artifact(run.dir) is None:
        return
    from ..eval.generate import load_for_generation
    from ..eval.harness import EvalConfig, generate_answers
    from ..train.runtime import resolve_precision

    say(f"report: generating {len(prompts)} samples with {run.name} ...")
    model, tok, encoder, cfg = load_for_generation(str(run.dir), None, [])
    amp = resolve_precision(cfg.train.mixed_precision, next(model.parameters()).device)
    answers = generate_answers(model, tok, encoder, list(prompts), EvalConfig(batch_size=len(prompts)), amp,
                               max_new_tokens=max_new_tokens)
    run.samples = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
    atomic_write_text(run.dir / "samples.json", json.dumps(
        {"max_new_tokens": max_new_tokens, "samples": run.samples}, indent=2, ensure_ascii=False))


def write_report(paths: list[str | Path], out_dir: str | Path, prompts: list[str] | None = None,
                 generate_missing: bool = True, title: str | None = None, say=print,
                 max_new_tokens: int = 128) -> dict[str, Path]:
    """Write ``report.html``, ``report.md`` and ``curves.png`` into ``out_dir`` (and
    ``curves_seeds.png`` when runs differ only by seed); returns their paths."""
    from .plots import plot_curves, plot_seed_curves

    runs, sweeps = collect(paths)
    if generate_missing:
        for r in runs:
            ensure_samples(r, list(prompts or DEFAULT_PROMPTS), max_new_tokens, say=say)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = title or (f"peftlab report: {sweeps[0]['name']}" if len(sweeps) == 1 else "peftlab report")
    curves = {r.name: r.metrics for r in runs if r.metrics}
    png_path = plot_curves(curves, out / "curves.png", title=None)
    png = png_path.read_bytes()
    paths = {"html": out / "report.html", "md": out / "report.md", "png": png_path}
    groups, seeds_png = group_by_seed(runs), None
    (out / "curves_seeds.png").unlink(missing_ok=True)  # from an earlier report of other runs
    if groups:
        paths["seeds_png"] = plot_seed_curves({g.name: [r.metrics for r in g.runs] for g in groups},
                                              out / "curves_seeds.png")
        seeds_png = paths["seeds_png"].read_bytes()
    page = render.content(runs, sweeps, groups, title)
    atomic_write_text(paths["md"], render.markdown(page, png_path.name, "curves_seeds.png" if groups else None))
    atomic_write_text(paths["html"], render.html(page, png, seeds_png))
    return paths
