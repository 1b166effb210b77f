"""The learning-rate schedule against its closed form, for every schedule name, and train.warmup:
a share of the run below 1 or a whole count of steps, never 1.0 (one step or the whole run?)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from torch import nn

from peftlab import registry
from peftlab.config import SCHEDULES, TrainConfig, build_dataclass
from peftlab.configure import load_config
from peftlab.errors import ConfigError
from peftlab.train.optim import build_optimizer, build_scheduler

# The schedule after warm-up, as written in docs (README, train/optim.py), with p the progress
# through the steps after warm-up (0 at the first, reaching 1 only past the last) and m the floor.
# Every name the config accepts must be here: a new schedule without its formula fails below.
DECAY = {
    "constant": lambda p, m: 1.0,
    "linear": lambda p, m: m + (1 - m) * (1 - p),
    "cosine": lambda p, m: m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p)),
    # warm-up, stable, decay: flat, then linear to the floor over the last DECAY_SHARE of p
    "wsd": lambda p, m: 1.0 if p < 1 - DECAY_SHARE else m + (1 - m) * (1 - p) / DECAY_SHARE,
}
DECAY_SHARE = TrainConfig().decay  # 0.2


def expected_lr(lr: float, step: int, total: int, warmup: int, schedule: str, floor: float) -> float:
    """The lr of optimiser step ``step`` (0-based): a linear ramp to ``lr`` over ``warmup`` steps
    (the first step already at lr / warmup), then the decay over the remaining steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * DECAY[schedule](p, floor)


def test_every_schedule_name_has_its_formula_here():
    assert set(DECAY) == set(SCHEDULES)


def scheduled_lrs(train_cfg: TrainConfig, total: int) -> list[list[float]]:
    """Each step's lr of every optimiser group, read from the optimiser the real scheduler drives
    (a group of matrices with weight decay and one of vectors without)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    full = registry.get("full")
    opt = build_optimizer(model, full, build_dataclass(full.config_cls, {"method": "full"}, "peft"), train_cfg)
    sched = build_scheduler(opt, train_cfg, total)
    out = []
    for _ in range(total):
        out.append([g["lr"] for g in opt.param_groups])
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        sched.step()
    assert len(opt.param_groups) == 2
    return out


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(("warmup", "warmup_count"), [(0, 0), (5, 5), (0.1, 4), (1, 1)])
@pytest.mark.parametrize("floor", [0.0, 0.25])
def test_schedule_equals_its_formula_over_the_whole_run(schedule, warmup, warmup_count, floor):
    total, lr = 40, 3e-3
    cfg = build_dataclass(TrainConfig, {"lr": lr, "schedule": schedule, "warmup": warmup, "min_lr_ratio": floor},
                          "train")
    got = scheduled_lrs(cfg, total)
    want = [expected_lr(lr, s, total, warmup_count, schedule, floor) for s in range(total)]
    for s, (groups, w) in enumerate(zip(got, want, strict=True)):
        assert groups == pytest.approx([w, w], rel=1e-12, abs=0), (schedule, s)
    # the formula's landmarks: the last warm-up step runs at lr itself; a decaying schedule ends
    # one step short of its floor, and after warm-up never goes under it
    if warmup_count:
        assert got[warmup_count - 1][0] == pytest.approx(lr, rel=1e-12)
    if schedule != "constant":
        assert got[-1][0] > lr * floor and min(g[0] for g in got[warmup_count:]) >= lr * floor


def test_a_warmup_longer_than_the_run_only_ramps():
    cfg = TrainConfig(lr=1e-2, schedule="cosine", warmup=50)
    assert [g[0] for g in scheduled_lrs(cfg, 10)] == pytest.approx([1e-2 * (s + 1) / 50 for s in range(10)])


# ---------------------------------------------------------------------------- train.warmup, unambiguous


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("0.0", 0.0), ("0.03", 0.03), ("1e-2", 0.01), ("1", 1),
                                             ("10", 10), ("10.0", 10), ("0.99", 0.99)])
def test_warmup_is_a_share_below_one_or_a_whole_count(text, value):
    got = load_config(None, [f"train.warmup={text}"]).train.warmup
    assert got == value and type(got) is type(value)  # an int counts steps, a float is a share


@pytest.mark.parametrize("text", ["1.0", "2.5", "1.5", "-1", "-0.5", "inf", "nan", "true", "ten"])
def test_a_warmup_that_could_mean_either_or_neither_is_refused(text):
    with pytest.raises(ConfigError, match=r"train\.warmup") as e:
        load_config(None, [f"train.warmup={text}"])
    if text in ("1.0", "2.5", "1.5"):
        msg = str(e.value)
        assert f"train.warmup={text}" in msg and "train.warmup=0.03" in msg and "train.warmup=10" in msg
        assert "train.warmup=1;" in msg  # how to write one step


def test_warmup_spelt_in_yaml_or_python_is_read_as_written(tmp_path):
    one = tmp_path / "one.yaml"
    one.write_text("train:\n  warmup: 1\n")
    assert load_config(one).train.warmup == 1
    ambiguous = tmp_path / "ambiguous.yaml"
    ambiguous.write_text("train:\n  warmup: 1.0\n")
    with pytest.raises(ConfigError, match=r"train\.warmup=1\.0 could mean one step or the whole run"):
        load_config(ambiguous)
    for raw, ok in [(1, True), ("1", True), (1.0, False), ("1.0", False), (0.5, True), ("0.5", True)]:
        if ok:
            assert build_dataclass(TrainConfig, {"warmup": raw}, "train").warmup == float(raw)
        else:
            with pytest.raises(ConfigError, match="one step or the whole run"):
                build_dataclass(TrainConfig, {"warmup": raw}, "train")
    with pytest.raises(ConfigError, match="one step or the whole run"):  # built without the config's checks
        build_scheduler(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0), TrainConfig(warmup=1.0), 10)


def test_a_saved_warmup_reloads_as_the_same_value(tmp_path):
    for text in ("7", "7.0", "0.25", "1"):
        cfg = load_config(None, [f"train.warmup={text}"])
        cfg.save(tmp_path / "config.yaml")
        assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["warmup"] == cfg.train.warmup
        again = load_config(tmp_path / "config.yaml").train.warmup
        assert again == cfg.train.warmup and type(again) is type(cfg.train.warmup)


def test_warmup_one_is_one_step_of_warmup():
    """1 is one warm-up step (step 0 at lr), not the whole run: step 1 is already decaying."""
    lrs = [g[0] for g in scheduled_lrs(TrainConfig(lr=1.0, schedule="linear", warmup=1), 5)]
    assert lrs == pytest.approx([1.0, 1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize("decay", [0, -0.1, 1.5, float("nan")])
def test_wsd_decay_share_outside_0_to_1_is_refused_by_name(decay):
    with pytest.raises(ConfigError, match="train.decay"):
        load_config(None, [f"train.decay={decay}"])
