"""The verdict at the end of a run: still learning, overfitting, or nothing to say
(train/diagnosis.py), on constructed curves and on real runs of the tiny model."""

from __future__ import annotations

import json
import math
import random

import pytest

from conftest import tiny_overrides
from peftlab.configure import load_config
from peftlab.data.builtin import task_pairs
from peftlab.train.diagnosis import diagnose
from peftlab.train.loop import train


def curve(train_loss, eval_loss=None, steps: int = 100, eval_every: int = 20, noise: float = 0.0, seed: int = 0):
    """Step records as the loop writes them: ``train_loss(step)`` (times 1 + noise, a batch's
    scatter) every step, ``eval_loss(step)`` every ``eval_every`` steps and at the last."""
    rng = random.Random(seed)
    out = []
    for s in range(1, steps + 1):
        r = {"step": s, "loss": round(train_loss(s) * (1 + rng.gauss(0, noise)), 6), "lr": 1e-3}
        if eval_loss is not None and (s % eval_every == 0 or s == steps):
            r["eval_loss"] = round(eval_loss(s), 6)
        out.append(r)
    return out


def falling(s):
    return 0.5 + 3 * math.exp(-s / 60)


def plateau(s):
    return 1.0 + 2 * math.exp(-s / 8)


def test_still_falling_steeply_is_still_learning():
    d = diagnose(curve(falling, lambda s: 1.1 * falling(s), noise=0.05))
    assert d is not None and d.code == "still_learning"
    assert "train.steps" in d.advice and "train.epochs" in d.advice and "100" in d.advice
    # the evidence is the rule's numbers: the last quarter's fall of the train line and the eval losses
    fall = (falling(76) - falling(100)) / (sum(falling(s) for s in range(76, 101)) / 25)
    assert d.evidence["window_steps"] == [76, 100]
    assert d.evidence["train_fall"] == pytest.approx(fall, rel=0.15) and d.evidence["train_slope_t"] < -3
    assert d.evidence["eval_steps"] == [60, 80, 100]
    assert d.evidence["eval_losses"] == [round(1.1 * falling(s), 6) for s in (60, 80, 100)]


def test_a_plateau_gets_no_verdict():
    assert diagnose(curve(plateau, lambda s: 1.2 * plateau(s), noise=0.05)) is None


def test_eval_rising_while_train_falls_is_overfitting():
    evals = {20: 2.0, 40: 1.6, 60: 1.5, 80: 1.56, 100: 1.65}
    d = diagnose(curve(falling, lambda s: evals[s], noise=0.05))
    assert d is not None and d.code == "overfitting"
    assert d.evidence["best_step"] == 60 and d.evidence["best_eval_loss"] == 1.5
    assert d.evidence["eval_rise"] == pytest.approx(1.65 / 1.5 - 1, abs=1e-4)
    assert "train.steps=60" in d.advice and "train.lr" in d.advice and "data" in d.advice


def test_eval_rising_with_train_flat_is_not_called_overfitting():
    evals = {20: 2.0, 40: 1.6, 60: 1.5, 80: 1.56, 100: 1.65}
    assert diagnose(curve(lambda s: 1.0, lambda s: evals[s])) is None


def test_too_few_evaluations_give_no_verdict():
    """Two evaluations (one interval), or none: the train curve alone says nothing."""
    assert diagnose(curve(falling, lambda s: falling(s), eval_every=50)) is None
    assert diagnose(curve(falling)) is None
    assert diagnose(curve(falling, lambda s: falling(s), eval_every=40)) is not None  # 40, 80, 100: three


@pytest.mark.parametrize("seed", range(10))
def test_a_noisy_flat_curve_gets_no_verdict(seed):
    """Batch noise of 10% on a flat train loss, eval loss wobbling by 0.5%: nothing to report, even
    where the wobble happens to go the same way twice."""
    wobble = {20: 2.0, 40: 2.006, 60: 1.998, 80: 2.004, 100: 2.009}
    assert diagnose(curve(lambda s: 2.0, lambda s: wobble[s], noise=0.10, seed=seed)) is None
    down = {20: 2.03, 40: 2.0, 60: 2.01, 80: 2.005, 100: 2.0}  # eval falling 0.25% an interval
    assert diagnose(curve(lambda s: 2.0, lambda s: down[s], noise=0.10, seed=seed)) is None


@pytest.mark.parametrize("seed", range(10))
def test_batch_noise_alone_is_not_a_falling_train_loss(seed):
    """Eval still falling fast, train loss flat under 5% batch noise: not still learning (the train
    line's slope must stand 3 standard errors clear of zero and fall 10%)."""
    assert diagnose(curve(lambda s: 2.0, lambda s: 3 - s / 100, noise=0.05, seed=seed)) is None


def test_odd_records_give_no_verdict():
    assert diagnose([]) is None
    bad = curve(falling, lambda s: falling(s))
    bad[50]["loss"] = float("nan")
    assert diagnose(bad) is None


# ---------------------------------------------------------------------------- real runs


QUIET = ["train.progress=false", "train.mixed_precision=no", "train.threads=1"]


def task_files(tmp_path, n_train: int) -> list[str]:
    """``n_train`` built-in task records to train on (one batch holds them all, so the train loss
    is not batch noise) and 16 others to evaluate on."""
    pairs = task_pairs(n_train + 16, seed=7)
    paths = []
    for name, part in (("train", pairs[:n_train]), ("eval", pairs[n_train:])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"instruction": p, "output": a}) + "\n" for p, a in part))
        paths.append(path)
    return [f"data.path={paths[0]}", f"data.eval_path={paths[1]}", "data.template=alpaca",
            f"train.batch_size={n_train}", "train.schedule=constant", "train.warmup=0"]


def run(tmp_path, name, n_train, *extra):
    cfg = load_config(None, [*tiny_overrides("gpt2"), *QUIET, *task_files(tmp_path, n_train),
                             f"train.output_dir={tmp_path / name}", *extra])
    result = train(cfg)
    return json.loads((result.run_dir / "summary.json").read_text())["diagnosis"]


def test_a_run_stopped_far_too_early_is_told_it_is_still_learning(tmp_path, capsys):
    """Full fine-tuning at 1e-3 for 24 steps: train loss loses about a quarter of itself in the
    last 6 steps and the eval loss is still falling."""
    d = run(tmp_path, "early", 32, "peft.method=full", "train.lr=1e-3", "train.steps=24", "train.eval_every=6")
    assert d is not None and d["code"] == "still_learning", d
    assert d["evidence"]["train_fall"] > 0.15 and d["evidence"]["eval_steps"] == [12, 18, 24]
    note = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: the run ended")]
    assert note == [f"note: {d['message']}; {d['advice']}"] and "train.steps" in note[0]


def test_a_run_that_learnt_all_it_could_gets_no_verdict(tmp_path, capsys):
    """LoRA at 1e-2 on 8 records for 100 steps: the train loss has flattened out (memorised) and
    the eval loss no longer moves by much: nothing to say, no note."""
    d = run(tmp_path, "done", 8, "train.lr=1e-2", "train.steps=100", "train.eval_every=10")
    assert d is None
    assert "note: the run ended" not in capsys.readouterr().err


def test_a_run_that_memorises_is_told_it_overfits(tmp_path, capsys):
    """LoRA at 2e-2 on 32 records: after step 12 the eval loss turns up and keeps rising while the
    train loss falls; the advice names the best evaluation's step. (At 1e-2 the turn was 2.1%
    on an AVX2 CPU and 0.5% on an AVX-512 one, whose fp32 kernels round differently; at 2e-2 it
    is 8% on the AVX-512 CPU: 12.46, 12.37, 12.86, 13.37.)"""
    d = run(tmp_path, "late", 32, "train.lr=2e-2", "train.steps=24", "train.eval_every=6")
    assert d is not None and d["code"] == "overfitting", d
    best = d["evidence"]["best_step"]
    assert best < 24 and f"train.steps={best}" in d["advice"]
    assert f"note: {d['message']}; {d['advice']}" in capsys.readouterr().err.splitlines()
