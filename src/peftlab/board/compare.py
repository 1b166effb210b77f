"""The compare page's content: what ``peftlab report`` shows, for runs picked on the board.

Everything comes from the lab's report (lab/report.py and lab/tables.py: the same ``RunView``s,
tables and best-per-column marks); the curves go to the page as the metrics records (drawn there as
SVG) instead of a PNG. The
side-by-side generations are the report's: stored samples, or generated on request with each
run's model (``ensure_samples``, cached in ``RUN/samples.json``).
"""

from __future__ import annotations

from ..errors import ConfigError
from ..eval.harness import DEFAULT_PROMPTS
from ..lab.render import sample_prompts
from ..lab.report import ensure_samples, load_run
from ..lab.tables import COST, QUALITY, QUALITY_NOTE, cells, param_rows
from .workspace import Workspace

MAX_RUNS = 8
CURVE_KEYS = ("step", "loss", "eval_loss")


def _views(ws: Workspace, run_ids) -> list:
    if not isinstance(run_ids, list) or len(run_ids) < 2 or len(run_ids) > MAX_RUNS:
        raise ConfigError(f"runs: choose 2 to {MAX_RUNS} runs to compare")
    views = []
    for rid in run_ids:
        view = load_run(ws.run_dir(rid, "runs"), rid)
        views.append(view)
    return views


def _table(views, columns) -> dict:
    headers, rows = cells(views, columns)
    return {"headers": ["run", *headers],
            "rows": [[{"text": v.name, "best": False}] + [{"text": t, "best": b} for t, b in row]
                     for v, row in zip(views, rows)]}


def compare(ws: Workspace, run_ids: list[str]) -> dict:
    views = _views(ws, run_ids)
    prompts = sample_prompts(views)
    return {
        "runs": [v.name for v in views],
        "params": {"headers": ["run", "method", "rank", "trainable", "total", "% trainable"],
                   "rows": [[{"text": c, "best": False} for c in row] for row in param_rows(views)]},
        "quality": _table(views, QUALITY), "quality_note": QUALITY_NOTE,
        "cost": _table(views, COST),
        "curves": {v.name: [{k: r[k] for k in CURVE_KEYS if r.get(k) is not None} for r in v.metrics]
                   for v in views},
        "generations": [{"prompt": p, "answers": {v.name: v.answer(p) for v in views if v.answer(p) is not None}}
                        for p in prompts],
        "default_prompts": list(DEFAULT_PROMPTS),
    }


def generate(ws: Workspace, run_ids: list[str], prompts: list[str] | None, max_new_tokens: int = 48) -> dict:
    """Side-by-side generations for ``prompts`` with every finished run (the report's samples)."""
    if prompts is not None and (not isinstance(prompts, list) or not prompts or len(prompts) > 8 or not all(
            isinstance(p, str) and p.strip() and len(p) < 2000 for p in prompts)):
        raise ConfigError("prompts: give 1 to 8 non-empty prompts")
    if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 256:
        raise ConfigError(f"max_new_tokens must be an integer from 1 to 256, got {max_new_tokens!r}")
    views = _views(ws, run_ids)
    for v in views:
        ensure_samples(v, list(prompts or DEFAULT_PROMPTS), max_new_tokens, say=lambda *a: None)
    return compare(ws, run_ids)
