"""Did the run stop too early, or too late? A verdict on the loss curves at the end of a run.

``diagnose(metrics)`` reads the run's step records (``step``, ``loss``, and ``eval_loss`` where
the run evaluated) and returns one of two verdicts, or None when the curves do not say clearly:

still_learning   the run ended while both losses were still falling steeply:
                 - train loss over the last quarter of the run (at least 6 records): the least-squares
                   line through it falls by >= 10% of the window's mean loss across the window, and
                   its slope is >= 3 standard errors below 0 (a real fall, not the batch-to-batch noise);
                 - eval loss fell at each of the last two evaluations, and at the last interval's rate
                   another quarter of the run would cut it by >= 2%.
                 Advice: train longer (train.steps or train.epochs up).
overfitting      eval loss rose at each of the last two evaluations, by >= 2% in all, while the train
                 loss over the same steps kept falling (least-squares slope below 0). Advice: stop
                 near the best evaluation (train.steps), lower train.lr, or add data; a smaller
                 train.eval_every finds the turn more precisely.

Why these numbers: the train loss of one step is one batch's, noisy by several percent, so its
trend is taken from a line over many steps and must stand well clear of its own noise (3 standard
errors); a loss still losing a tenth of itself per quarter of the run has not levelled off, and
more steps at that rate are worth their time (a plateaued curve moves by a few percent at most).
The eval loss is measured on the same examples every time, so its moves are not batch noise;
two moves the same way in a row, not one, make a trend, and 2% (either way) is past the few tenths
of a percent a levelled-off eval loss wobbles by. Held-out loss falls more slowly than train loss
(the tiny-model run in tests/test_diagnosis.py that stops far too early loses 27% of its train loss
over its last quarter, its eval loss 4% per quarter at its last interval's rate), hence 2%, not 10%.
Fewer than 3 evaluations give no verdict: train loss alone cannot tell learning from memorising.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIN_EVALS = 3  # evaluations needed for any verdict (two intervals)
WINDOW = 0.25  # the last part of the run: its last quarter of steps
MIN_TRAIN_POINTS = 6  # train-loss records the window needs for a trend
TRAIN_FALL = 0.10  # still learning: the train line falls by >= 10% of its level over the window
TRAIN_T = 3.0  # ... with a slope at least 3 standard errors below zero
EVAL_FALL = 0.02  # ... and eval loss, at the last interval's rate, would fall >= 2% over another window
EVAL_RISE = 0.02  # overfitting: eval loss rose >= 2% over the last two evaluations


@dataclass
class Diagnosis:
    code: str  # still_learning | overfitting
    message: str  # what the curves show, with the numbers
    advice: str  # the setting to change
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "advice": self.advice, "evidence": self.evidence}


def _line(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Least-squares line through (x, y): (slope, its standard error, the mean of y)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if n < 3 or sxx == 0:
        return 0.0, math.inf, my
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in points)
    return slope, math.sqrt(resid / (n - 2) / sxx), my


def diagnose(metrics: list[dict]) -> Diagnosis | None:
    """The verdict on a run's step records (see the module's docstring), or None."""
    train = [(r["step"], r["loss"]) for r in metrics if isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_loss"]) for r in metrics if isinstance(r.get("eval_loss"), (int, float))]
    if len(evals) < MIN_EVALS or not train or not all(math.isfinite(y) and y > 0 for _, y in train + evals):
        return None
    return _overfitting(train, evals) or _still_learning(train, evals)


def _still_learning(train: list[tuple], evals: list[tuple]) -> Diagnosis | None:
    last = train[-1][0]
    start = last - WINDOW * last
    window = [p for p in train if p[0] > start]
    if len(window) < MIN_TRAIN_POINTS:
        return None
    slope, se, mean = _line(window)
    span = last - start
    train_fall = -slope * span / mean
    (s0, e0), (s1, e1), (s2, e2) = evals[-3:]
    eval_fall = (e1 - e2) / e1 * span / (s2 - s1)
    if not (train_fall >= TRAIN_FALL and slope <= -TRAIN_T * se and e0 > e1 > e2 and eval_fall >= EVAL_FALL):
        return None
    pct = round(100 * train_fall)
    evidence = {"window_steps": [round(start) + 1, last], "train_fall": round(train_fall, 4),
                "train_slope_t": round(slope / se, 1), "eval_losses": [e0, e1, e2], "eval_steps": [s0, s1, s2],
                "eval_fall_per_window": round(eval_fall, 4)}
    return Diagnosis(
        "still_learning",
        f"the run ended still learning: over its last {round(span)} steps the train loss fell {pct}% and the eval "
        f"loss kept falling ({e0:.4g} -> {e1:.4g} -> {e2:.4g} at steps {s0}, {s1}, {s2})",
        f"train longer: raise train.steps (this run: {last}) or train.epochs", evidence)


def _overfitting(train: list[tuple], evals: list[tuple]) -> Diagnosis | None:
    (s0, e0), (s1, e1), (s2, e2) = evals[-3:]
    if not (e0 < e1 < e2 and e2 >= (1 + EVAL_RISE) * e0):
        return None
    slope, _, _ = _line([p for p in train if p[0] >= s0])
    if not slope < 0:
        return None
    best_step, best = min(evals, key=lambda p: p[1])
    evidence = {"eval_losses": [e0, e1, e2], "eval_steps": [s0, s1, s2], "eval_rise": round(e2 / e0 - 1, 4),
                "best_eval_loss": best, "best_step": best_step, "train_slope": float(f"{slope:.4g}")}
    return Diagnosis(
        "overfitting",
        f"the run ended overfitting: the eval loss rose {e0:.4g} -> {e1:.4g} -> {e2:.4g} (steps {s0}, {s1}, {s2}) "
        f"while the train loss kept falling; it was lowest, {best:.4g}, at step {best_step}",
        f"train fewer steps (train.steps={best_step}), lower train.lr, or add data; a smaller train.eval_every "
        "finds the turn more precisely", evidence)
