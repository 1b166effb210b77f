"""Learning curves: train and eval loss against optimiser step, one line per run.

``curves_figure(runs)`` builds a matplotlib ``Figure`` (two axes: train loss, eval loss; each
with one line and one legend entry per run that has such values); ``plot_curves(runs, path)``
saves it as a PNG and returns the path. ``runs`` maps a run's name to its ``metrics.jsonl``
records (``{"step", "loss", "eval_loss"?, ...}``). Preference runs add a row with the reward
margin and the held-out preference accuracy; GRPO runs (records with ``completion_length``) a row
with the mean reward of the training rollouts and the KL to the reference. Full fine-tuning (a name starting with
``full``) is drawn black and dashed so it stands out against the LoRA family.

``seed_curves_figure(groups)`` / ``plot_seed_curves(groups, path)`` draw runs that differ only by
seed (``seeds.group_by_seed``): one line per group, the mean train and eval loss over its seeds at
the steps every seed has, in a shaded band from the lowest to the highest seed. matplotlib is an
optional dependency (the ``lab`` extra) and is imported here only; no pyplot global state.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..io import ordinary_permissions
from .seeds import band


def _style(names: list[str]) -> dict[str, dict]:
    from matplotlib import colormaps

    others = [n for n in names if not n.startswith("full")]
    cmap = colormaps["tab10"] if len(others) <= 10 else colormaps["viridis"]
    styles = {}
    for i, n in enumerate(others):
        color = cmap(i) if len(others) <= 10 else cmap(i / max(1, len(others) - 1))
        styles[n] = {"color": color, "linestyle": "-", "linewidth": 1.4}
    for n in names:
        if n.startswith("full"):
            styles[n] = {"color": "black", "linestyle": "--", "linewidth": 2.0}
    return styles


PREFERENCE = (("margin", "reward margin (train)", "chosen - rejected reward"),
              ("eval_accuracy", "preference accuracy (held out)", "share of pairs, chosen above rejected"))
GRPO = (("reward", "reward (training rollouts)", "mean reward per completion"),
        ("kl", "KL to the reference (train)", "k3 estimate per completion token"))


def _second_row(runs: dict[str, list[dict]]) -> tuple | None:
    records = [r for rs in runs.values() for r in rs]
    if any("margin" in r for r in records):
        return PREFERENCE
    if any("completion_length" in r for r in records):
        return GRPO
    return None


def curves_figure(runs: dict[str, list[dict]], title: str | None = None):
    """A Figure with axes[0] = train loss and axes[1] = eval loss vs step (one line per run);
    for preference runs (records with ``margin``) a second row: the train reward margin and the
    held-out preference accuracy; for GRPO runs: the rollouts' mean reward and the KL."""
    from matplotlib.figure import Figure

    row = _second_row(runs)
    fig = Figure(figsize=(11, 8.4 if row else 4.2), dpi=110, layout="constrained")
    axes = fig.subplots(2 if row else 1, 2)
    ax_train, ax_eval = axes[0] if row else axes
    if row:
        _second_axes(runs, axes[1], _style(list(runs)), row)
    styles = _style(list(runs))
    for name, records in runs.items():
        train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
        if train:
            ax_train.plot(*zip(*train), label=name, **styles[name])
        if evals:
            ax_eval.plot(*zip(*evals), label=name, marker="o", markersize=3.5, **styles[name])
    for ax, what in ((ax_train, "train loss"), (ax_eval, "eval loss (held out)")):
        _finish(ax, what, _unit(row, ax is ax_train))
    if title:
        fig.suptitle(title)
    return fig


def _unit(row: tuple | None, train: bool) -> str:
    if row is PREFERENCE:
        return "loss per pair"
    return "GRPO loss" if row is GRPO and train else "cross-entropy per answer token"


def _finish(ax, what: str, unit: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(what)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(unit)
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8, ncol=1 + len(ax.get_lines()) // 9)
    else:
        ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes)


def seed_curves_figure(groups: dict[str, list[list[dict]]], title: str | None = None):
    """A Figure with axes[0] = train loss and axes[1] = eval loss vs step: per group (its name ->
    the metrics records of each seed) one line, the mean over the seeds at the steps all of them
    have, and a shaded band from the lowest to the highest seed there."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=110, layout="constrained")
    ax_train, ax_eval = fig.subplots(1, 2)
    styles = _style(list(groups))
    row = _second_row({name: [r for c in curves for r in c] for name, curves in groups.items()})
    for name, curves in groups.items():
        for ax, key in ((ax_train, "loss"), (ax_eval, "eval_loss")):
            points = band(curves, key)
            if points:
                steps, mean, lo, hi = zip(*points)
                ax.plot(steps, mean, label=f"{name} ({len(curves)} seeds)", **styles[name],
                        **({"marker": "o", "markersize": 3.5} if key == "eval_loss" else {}))
                ax.fill_between(steps, lo, hi, color=styles[name]["color"], alpha=0.15, linewidth=0)
    for ax, what in ((ax_train, "train loss"), (ax_eval, "eval loss (held out)")):
        _finish(ax, f"{what}: mean over seeds, min-max shaded", _unit(row, ax is ax_train))
    if title:
        fig.suptitle(title)
    return fig


def _second_axes(runs: dict[str, list[dict]], axes, styles: dict, row: tuple) -> None:
    """The objective's own two curves (``PREFERENCE`` or ``GRPO``) against step, one line per run."""
    for ax, (key, what, unit) in zip(axes, row):
        for name, records in runs.items():
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), label=name, marker="o" if key.startswith("eval") else None,
                        markersize=3.5, **styles[name])
        ax.set_title(what)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {key} recorded", ha="center", va="center", transform=ax.transAxes)


def plot_curves(runs: dict[str, list[dict]], path: str | Path, title: str | None = None) -> Path:
    """Save ``curves_figure(runs)`` as a PNG at ``path`` (atomically); returns the path."""
    return _save(curves_figure(runs, title), Path(path))


def plot_seed_curves(groups: dict[str, list[list[dict]]], path: str | Path, title: str | None = None) -> Path:
    """Save ``seed_curves_figure(groups)`` as a PNG at ``path`` (atomically); returns the path."""
    return _save(seed_curves_figure(groups, title), Path(path))


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        ordinary_permissions(tmp)  # mkstemp makes it private; a plot is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
