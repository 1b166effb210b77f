"""Runs that differ only by seed, taken together: the report's "Across seeds" section.

``group_by_seed(runs)`` groups the successful runs whose saved configs are equal once the keys of
``PER_RUN`` are left out: the seed, and how and where a run was executed (its output directory,
``overwrite``, which a resumed sweep run has off, the progress bar, and the CPU threads, which a
sweep sets per invocation from ``--parallel``). A group needs runs of two seeds or more. Its name
is the runs' common name without the seed label a sweep adds (``lora-r8`` from ``lora-r8-seed1``;
``group_name``). ``seed_columns(columns)`` turns the report's per-run columns into per-group ones:
the mean over the seeds with (min–max) after it, then the lowest point of the mean eval curve and
its step. ``band(curves, key)`` is the mean, min and max of one metric per step, at the steps every
seed has (the mean eval curve here, the shaded curves of ``plots.seed_curves_figure``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import statistics
from dataclasses import dataclass

PER_RUN = ("train.seed", "train.output_dir", "train.overwrite", "train.progress", "train.threads")
_SEED_LABEL = re.compile(r"(?:^|[-_.])seed-?\d+(?=$|[-_.])")  # sweep.py's label for train.seed
_NOT_AVERAGED = ("perplexity",)  # exp of the eval loss: its mean adds nothing the loss's does not
_HEADERS = {"best_eval": "curve's lowest eval loss"}  # the step goes: each seed has its own
NOTE = (
    "Runs whose saved configs differ only in train.seed (and in where and how they ran: output directory, "
    "overwrite, progress, threads), taken together: the mean over the seeds, their lowest and highest value "
    "in brackets; runs that failed are left out. The curve's columns average each seed's own lowest and last "
    "point; the mean eval curve is the mean over the seeds per step, at the steps every seed evaluated."
)


@dataclass
class SeedGroup:
    """Successful runs (``report.RunView``) that differ only by seed, in report order."""

    name: str
    runs: list

    @property
    def seeds(self) -> list:
        return [(r.config.get("train") or {}).get("seed") for r in self.runs]

    @property
    def seeds_text(self) -> str:
        return f"{len(self.runs)}: {', '.join(map(str, self.seeds))}"

    def stat(self, get) -> tuple[float, float, float] | None:
        """(mean, min, max) of ``get(run)`` over the seeds; None unless every seed has a value."""
        values = [get(r) for r in self.runs]
        if any(v is None for v in values):
            return None
        return statistics.fmean(values), min(values), max(values)

    def mean_curve_lowest(self) -> tuple[int, float] | None:
        """(step, mean eval loss) where the mean eval curve over the seeds is lowest."""
        points = band([r.metrics for r in self.runs], "eval_loss")
        return min(((s, mean) for s, mean, _, _ in points), key=lambda sv: sv[1]) if points else None


def band(curves: list[list[dict]], key: str) -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) of ``key`` over ``curves`` (metrics records, one list per seed), at
    the steps where every curve has a value."""
    per_curve = [{r["step"]: r[key] for r in records if r.get(key) is not None} for records in curves]
    if not per_curve:
        return []
    steps = sorted(set.intersection(*(set(c) for c in per_curve)))
    return [(s, statistics.fmean(c[s] for c in per_curve), min(c[s] for c in per_curve),
             max(c[s] for c in per_curve)) for s in steps]


def _without(config: dict, dotted_keys) -> dict:
    out = copy.deepcopy(config)
    for dotted in dotted_keys:
        *path, leaf = dotted.split(".")
        node = out
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def group_name(names: list[str]) -> str:
    """``lora-r8`` for ``lora-r8-seed1``, ``lora-r8-seed2``; else the names' common start; else the
    first name and how many more."""
    stripped = {_SEED_LABEL.sub("", n).strip("-_.") for n in names}
    if len(stripped) == 1 and "" not in stripped:
        return stripped.pop()
    prefix = os.path.commonprefix(names).rstrip("-_./ ")
    return prefix or f"{names[0]} (+{len(names) - 1})"


def group_by_seed(runs: list) -> list[SeedGroup]:
    """The groups of two seeds or more among the successful ``runs``, in order of first appearance."""
    by_config: dict[str, list] = {}
    for r in runs:
        if r.status == "success" and r.config:
            key = json.dumps(_without(r.config, PER_RUN), sort_keys=True, default=str)
            by_config.setdefault(key, []).append(r)
    groups, taken = [], set()
    for members in by_config.values():
        seeds = {str((r.config.get("train") or {}).get("seed")) for r in members}
        if len(seeds) < 2:
            continue
        name = base = group_name([r.name for r in members])
        while name in taken:  # two groups whose runs share a name (different sweeps, say)
            name = f"{base} ({len(taken) + 1})"
        taken.add(name)
        groups.append(SeedGroup(name, members))
    return groups


def _mean_of(get):
    return lambda g: (g.stat(get) or (None,))[0]


def _range_of(get, fmt):
    def note(g: SeedGroup) -> str:
        _, lo, hi = g.stat(get)
        return f" ({fmt(lo)}–{fmt(hi)})"

    return note


def _mean_curve_step(g: SeedGroup) -> str:
    return f" ({g.mean_curve_lowest()[0]})"


def seed_columns(columns: list) -> list:
    """Per-group versions of the report's per-run ``columns`` (``tables.Column``): the mean over
    the seeds, (min–max) after it; then the mean eval curve's lowest point (step)."""
    out = [c._replace(header=_HEADERS.get(c.key, c.header), get=_mean_of(c.get), note=_range_of(c.get, c.fmt))
           for c in columns if c.key not in _NOT_AVERAGED]
    lowest = next(c for c in columns if c.key == "best_eval")
    out.append(lowest._replace(key="mean_curve", header="mean eval curve's lowest (step)",
                               get=lambda g: (g.mean_curve_lowest() or (None, None))[1], note=_mean_curve_step))
    return out
