"""A comparison report over runs: one self-contained HTML page and a Markdown file.

Sections: the trainable-parameter table (method, rank, trainable, total, %); learning curves
(train and eval loss vs step, one line per run, PNG; embedded as base64 in the HTML, a file
beside the Markdown); when runs differ only by seed (``seeds.group_by_seed``), "Across seeds":
per group the mean (min–max) over its seeds of each quality column and the mean eval curve's
lowest point, and ``curves_seeds.png`` (mean curves, min-max shaded); the quality table (losses, perplexity, BLEU-4, ROUGE-1/2/L, exact match,
long-answer accuracy) and the cost table (train time, total time, peak memory, file size,
throughput), each with the best value per column in bold; side-by-side generations of every run
for a fixed prompt list (the seeds' four by default); failed runs with their error.

Inputs are run directories (``peftlab train`` output, optionally with ``eval/metrics.json``
from ``peftlab eval --run``) and sweep directories (``sweep.json`` + ``runs/<name>/``). A run
without stored samples gets them generated here (``generate_missing``), cached in
``RUN/samples.json``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

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
from .seeds import NOTE as SEEDS_NOTE
from .seeds import group_by_seed, seed_columns


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


# ---------------------------------------------------------------------------- tables

def _pct(v):
    return f"{100 * v:.1f}"


def _f4(v):
    return f"{v:.4f}"


def _gib(v):
    return f"{v / 2**30:.2f} GiB"


def _size(v):
    return f"{v / 2**20:.2f} MiB" if v >= 2**20 else f"{v / 2**10:.1f} KiB"


def _secs(v):
    return f"{v / 60:.1f} min" if v >= 120 else f"{v:.1f} s"


def _best_eval(r: RunView):
    return r.best_eval[1] if r.best_eval else None


def _ppl(r: RunView):
    if r.eval.get("perplexity") is not None:
        return r.eval["perplexity"]
    if "pref_accuracy" in r.eval:  # a preference objective's loss is no cross-entropy: no perplexity
        return None
    loss = r.final_eval_loss
    return math.exp(min(loss, 700.0)) if loss is not None else None


class Column(NamedTuple):
    """A table column: a run's (or group's) value or None, which end is best, its format, what follows it."""

    key: str
    header: str
    get: Callable
    better: str  # "min" | "max"
    fmt: Callable
    note: Callable | None = None


QUALITY = [Column(*c) for c in [
    ("train_loss", "final train loss", lambda r: r.final_train_loss, "min", _f4),
    ("eval_loss", "eval loss", lambda r: r.final_eval_loss, "min", _f4),
    ("best_eval", "curve's lowest eval loss (step)", _best_eval, "min", _f4, lambda r: f" ({r.best_eval[0]})"),
    ("last_eval", "curve's last eval loss", lambda r: r.eval_curve[-1][1] if r.eval_curve else None, "min", _f4),
    ("perplexity", "perplexity", _ppl, "min", lambda v: f"{v:.3f}" if v < 1000 else f"{v:.3g}"),
    ("bleu4", "BLEU-4", lambda r: r.eval.get("bleu4"), "max", _pct),
    ("rouge1", "ROUGE-1", lambda r: r.eval.get("rouge1"), "max", _pct),
    ("rouge2", "ROUGE-2", lambda r: r.eval.get("rouge2"), "max", _pct),
    ("rougeL", "ROUGE-L", lambda r: r.eval.get("rougeL"), "max", _pct),
    ("exact_match", "exact match %", lambda r: r.eval.get("exact_match"), "max", _pct),
    ("pref_accuracy", "preference acc. %", lambda r: r.eval.get("pref_accuracy"), "max", _pct),
    ("pref_margin", "reward margin", lambda r: r.eval.get("pref_margin"), "max", _f4),
    ("long", "long-answer acc. %", lambda r: r.eval.get("long_answer_accuracy"), "max", _pct),
]]
COST = [Column(*c) for c in [
    ("train_time", "train time", lambda r: r.train_time, "min", _secs),
    ("train_cpu", "train CPU time", lambda r: r.train_cpu, "min", _secs),
    ("total_time", "total time (with eval)", lambda r: r.total_time, "min", _secs),
    ("total_cpu", "total CPU time", lambda r: r.total_cpu, "min", _secs),
    ("peak_memory", "peak memory (training)", lambda r: r.peak_memory, "min", _gib),
    ("process_peak", "peak memory (whole run)", lambda r: r.process_peak, "min", _gib),
    ("file_size", "saved file size", lambda r: r.file_size, "min", _size),
    ("tokens_per_s", "tokens/s (median)", lambda r: r.tokens_per_s, "max", lambda v: f"{v:,.0f}"),
]]


QUALITY_NOTE = (
    "Scores x100, on the held-out split. Eval loss: token-weighted cross-entropy over answer tokens after "
    "training, on eval.loss_batches batches (all when unset; perplexity = exp of it). The curve's values come "
    "from the training loop, on train.eval_batches batches (its lowest point and step, and its last point: "
    "last above lowest means the run got worse on held-out data). BLEU-4: "
    "corpus level, smoothed (exp); ROUGE-1/2/L: mean F1; Chinese is segmented with jieba. Exact match: equal "
    "after collapsing white space. Long-answer accuracy: exact match over references longer than N characters. "
    "Preference accuracy (preference runs): held-out pairs whose chosen answer's reward β·log(π/π_ref) is above "
    "the rejected one's; reward margin: their mean difference. "
    "Definitions: peftlab.eval.metrics."
)


def _cells(items: list, columns: list[Column]) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Headers and rows of (text, is_best) for the columns any item (a run, a group of seeds) has a value in."""
    cols = [c for c in columns if any(c.get(r) is not None for r in items)]
    best = {}
    for c in cols:
        vals = [c.get(r) for r in items if c.get(r) is not None]
        if len(vals) >= 2 and len(set(vals)) > 1:
            best[c.key] = min(vals) if c.better == "min" else max(vals)
    rows = []
    for r in items:
        row = []
        for c in cols:
            v = c.get(r)
            text = "–" if v is None else c.fmt(v) + (c.note(r) if c.note else "")
            row.append((text, v is not None and c.key in best and v == best[c.key]))
        rows.append(row)
    return [c.header for c in cols], rows


def seed_table(runs: list[RunView]) -> tuple[list[str], list[list]] | None:
    """Headers and rows of the "Across seeds" table; None when no two runs differ only by seed."""
    groups = group_by_seed(runs)
    if not groups:
        return None
    headers, rows = _cells(groups, seed_columns(QUALITY))
    return ["group", "seeds", *headers], [[g.name, g.seeds_text, *row] for g, row in zip(groups, rows)]


def param_rows(runs: list[RunView]) -> list[list[str]]:
    out = []
    for r in runs:
        out.append([r.name, r.method, "–" if r.rank is None else str(r.rank),
                    "–" if r.trainable is None else f"{r.trainable:,}",
                    "–" if r.total is None else f"{r.total:,}",
                    "–" if r.percent is None else f"{r.percent:.4f}%"])
    return out


def _setup_lines(runs: list[RunView], sweeps: list[dict]) -> list[str]:
    lines = []
    for s in sweeps:
        lines.append(f"sweep `{s.get('name')}` ({s.get('dir')}), {len(s.get('runs', []))} runs")
    ok = [r for r in runs if r.config]
    if ok:
        c = ok[0].config
        m, d, t = c.get("model", {}), c.get("data", {}), c.get("train", {})
        lines.append(f"model `{m.get('name')}`; data `{d.get('path')}` (max_length {d.get('max_length')}, "
                     f"eval_split {d.get('eval_split')}); {t.get('steps') or str(t.get('epochs')) + ' epochs'} steps "
                     f"of batch {t.get('batch_size')} x accum {t.get('grad_accum')}; schedule {t.get('schedule')}, "
                     f"warmup {t.get('warmup')}; precision {t.get('mixed_precision')}; seed {t.get('seed')}")
        lrs = {r.name: (r.config.get("train") or {}).get("lr") for r in ok}
        if len(set(map(str, lrs.values()))) > 1:
            lines.append("learning rates: " + ", ".join(f"{n} {v}" for n, v in lrs.items()))
        else:
            lines.append(f"learning rate {next(iter(lrs.values()))} for every run")
    return lines


def _prompts(runs: list[RunView]) -> list[str]:
    seen: list[str] = []
    for r in runs:
        for s in r.samples:
            if s.get("prompt") not in seen:
                seen.append(s.get("prompt"))
    return seen


def _answer(r: RunView, prompt: str) -> str | None:
    for s in r.samples:
        if s.get("prompt") == prompt:
            return s.get("answer", "")
    return None


# ---------------------------------------------------------------------------- writers


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def _md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = []
        for c in row:
            text, best = c if isinstance(c, tuple) else (c, False)
            cells.append(f"**{text}**" if best else str(text))
        out.append("| " + " | ".join(_md_escape(x) for x in cells) + " |")
    return "\n".join(out)


def render_markdown(runs, sweeps, png_name: str, title: str, seeds_png_name: str | None = None) -> str:
    parts = [f"# {title}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `peftlab report`.", ""]
    parts += [f"- {line}" for line in _setup_lines(runs, sweeps)] + [""]
    parts += ["## Trainable parameters", "",
              _md_table(["run", "method", "rank", "trainable", "total", "% trainable"], param_rows(runs)), ""]
    parts += ["## Learning curves", "", f"![train and eval loss vs step]({png_name})", ""]
    seeds = seed_table(runs)
    if seeds:
        parts += ["## Across seeds (best mean per column in bold)", "", SEEDS_NOTE, "", _md_table(*seeds), ""]
        parts += [f"![{SEEDS_ALT}]({seeds_png_name})", ""] if seeds_png_name else []
    done = [r for r in runs if r.status == "success" or r.metrics]
    headers, rows = _cells(done, QUALITY)
    parts += ["## Quality (best per column in bold)", "",
              QUALITY_NOTE, "",
              _md_table(["run", *headers], [[r.name, *row] for r, row in zip(done, rows)]), ""]
    headers, rows = _cells(done, COST)
    parts += ["## Time and memory (best per column in bold)", "",
              "Peak memory is the peak resident set size of the training process (CPU) or peak CUDA "
              "allocation; 'whole run' includes loading and the evaluation afterwards.", "",
              _md_table(["run", *headers], [[r.name, *row] for r, row in zip(done, rows)]), ""]
    prompts = _prompts(runs)
    if prompts:
        parts += ["## Side-by-side generations", ""]
        for p in prompts:
            parts += [f"### {p}", "", _md_table(["run", "answer"], [[r.name, _answer(r, p) or "–"] for r in runs
                                                                   if _answer(r, p) is not None]), ""]
    bad = [r for r in runs if r.status != "success"]
    if bad:
        parts += ["## Runs that did not finish", ""]
        parts += [f"- **{r.name}**: {r.status}" + (f" — `{r.error.strip().splitlines()[0]}`" if r.error.strip() else "")
                  for r in bad] + [""]
    return "\n".join(parts)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left;font-weight:600}
td.best{font-weight:700;background:#e5f5e0}.note{color:#666;font-size:12.5px}
img{max-width:100%;border:1px solid #eee}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:10px;margin-bottom:1.2em}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;background:#fafafa}
.card h4{margin:0 0 4px;font-size:13px}.card pre{white-space:pre-wrap;margin:0;font:12.5px/1.4 ui-monospace,monospace}
.fail{color:#b00}
"""


def _html_table(headers: list[str], rows: list[list]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"]
    for row in rows:
        cells = []
        for c in row:
            text, best = c if isinstance(c, tuple) else (c, False)
            cells.append(f"<td{' class=best' if best else ''}>{html.escape(str(text))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _code(escaped: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", escaped)


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{alt}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


SEEDS_ALT = "mean train and eval loss over the seeds vs step, min-max shaded"


def render_html(runs, sweeps, png: bytes | None, title: str, seeds_png: bytes | None = None) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>", f"<p class=note>Generated {time.strftime('%Y-%m-%d %H:%M')} by peftlab report.</p>",
             "<ul>" + "".join(f"<li>{_code(e(line))}</li>" for line in _setup_lines(runs, sweeps)) + "</ul>",
             "<h2>Trainable parameters</h2>",
             _html_table(["run", "method", "rank", "trainable", "total", "% trainable"], param_rows(runs)),
             "<h2>Learning curves</h2>"]
    if png:
        parts.append(_img(png, "train and eval loss vs step"))
    seeds = seed_table(runs)
    if seeds:
        parts += [f"<h2>Across seeds</h2><p class=note>Best mean per column highlighted. {e(SEEDS_NOTE)}</p>",
                  _html_table(*seeds)] + ([_img(seeds_png, SEEDS_ALT)] if seeds_png else [])
    done = [r for r in runs if r.status == "success" or r.metrics]
    headers, rows = _cells(done, QUALITY)
    parts += [f"<h2>Quality</h2><p class=note>Best per column highlighted. {e(QUALITY_NOTE)}</p>",
              _html_table(["run", *headers], [[r.name, *row] for r, row in zip(done, rows)])]
    headers, rows = _cells(done, COST)
    parts += ["<h2>Time and memory</h2><p class=note>Peak memory: peak resident set size of the training process "
              "(CPU) or peak CUDA allocation; 'whole run' includes loading and the evaluation afterwards.</p>",
              _html_table(["run", *headers], [[r.name, *row] for r, row in zip(done, rows)])]
    prompts = _prompts(runs)
    if prompts:
        parts.append("<h2>Side-by-side generations</h2>")
        for p in prompts:
            cards = [f"<div class=card><h4>{e(r.name)}</h4><pre>{e(_answer(r, p) or '')}</pre></div>"
                     for r in runs if _answer(r, p) is not None]
            parts += [f"<h3>{e(p)}</h3><div class=grid>{''.join(cards)}</div>"]
    bad = [r for r in runs if r.status != "success"]
    if bad:
        parts.append("<h2>Runs that did not finish</h2><ul>")
        parts += [f"<li><b>{e(r.name)}</b>: <span class=fail>{e(r.status)}</span>"
                  + (f"<pre>{e(r.error.strip())}</pre>" if r.error.strip() else "") + "</li>" for r in bad]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


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
    atomic_write_text(paths["md"], render_markdown(runs, sweeps, png_path.name, title,
                                                   "curves_seeds.png" if groups else None))
    atomic_write_text(paths["html"], render_html(runs, sweeps, png, title, seeds_png))
    return paths
