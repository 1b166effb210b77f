"""The report's tables: which columns a run (``report.RunView``) or a group of seeds has, how each
value is written, and which end of a column is best.

``QUALITY`` (losses, perplexity, BLEU-4, ROUGE, exact match, preference accuracy, long answers) and
``COST`` (times, memory, file size, throughput) are lists of ``Column``; ``cells(items, columns)``
keeps the columns any item has a value in and marks the best value of each, and is what the
report's Markdown and HTML, and the board's compare page, print. ``seed_table`` is the same over
``seeds.group_by_seed``'s groups with ``seeds.seed_columns``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from .seeds import seed_columns


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


def _best_eval(r):
    return r.best_eval[1] if r.best_eval else None


def _ppl(r):
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


def cells(items: list, columns: list[Column]) -> tuple[list[str], list[list[tuple[str, bool]]]]:
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


def seed_table(groups: list) -> tuple[list[str], list[list]] | None:
    """Headers and rows of the "Across seeds" table over ``seeds.group_by_seed``'s groups; None without any."""
    if not groups:
        return None
    headers, rows = cells(groups, seed_columns(QUALITY))
    return ["group", "seeds", *headers], [[g.name, g.seeds_text, *row] for g, row in zip(groups, rows)]


def param_rows(runs: list) -> list[list[str]]:
    out = []
    for r in runs:
        out.append([r.name, r.method, "–" if r.rank is None else str(r.rank),
                    "–" if r.trainable is None else f"{r.trainable:,}",
                    "–" if r.total is None else f"{r.total:,}",
                    "–" if r.percent is None else f"{r.percent:.4f}%"])
    return out
