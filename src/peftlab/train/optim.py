"""Optimiser and learning-rate schedule, and what a method's step asks of them.

AdamW over the trainable parameters only, in two groups: weight decay on matrices, none on
vectors (biases, norms, scaling vectors; ``model.params.default_param_groups``). A method may
supply its own groups (LoRA+). The schedule (``lr_factor``) is a linear warm-up over
``train.warmup`` (a count of steps, or a share of the run below 1), then a cosine or linear decay
to ``lr * min_lr_ratio``, a constant lr, or wsd: constant until the last ``train.decay`` share of the
run, then a linear decay. A method's ``on_step`` may ask (``registry.StepEffects``) for the
groups to follow a changed trainable set (``regroup``), for part of the AdamW moments to be
zeroed (``prune_moments``), for some parameters' state to be dropped (``reset_state``) or for the
next step's learning rate to be scaled (``scale_lr``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import SCHEDULES
from ..model.params import default_param_groups, trainable_parameters
from ..validate import warmup_setting


def param_groups(model: nn.Module, method, peft_cfg, train_cfg) -> list[dict]:
    """The method's groups (LoRA+) or the default ones, over what trains now."""
    if method.param_groups is not None:
        return method.param_groups(model, peft_cfg, train_cfg.lr, train_cfg.weight_decay)
    return default_param_groups(model, train_cfg.lr, train_cfg.weight_decay)


def build_optimizer(model: nn.Module, method, peft_cfg, train_cfg) -> torch.optim.Optimizer:
    groups = param_groups(model, method, peft_cfg, train_cfg)
    if not groups:
        from ..errors import ConfigError

        raise ConfigError(f"method {peft_cfg.method!r} left no trainable parameters")
    device = next(p for g in groups for p in g["params"]).device
    # Fused AdamW (one kernel over all tensors) is 3-7x faster than foreach on CPU as well
    # (benchmarks/README.md); foreach where fused is not available.
    fused_ok = device.type in ("cuda", "cpu") and all(
        p.is_floating_point() for g in groups for p in g["params"])
    kwargs = {"fused": True} if fused_ok else {"foreach": True}
    betas = tuple(train_cfg.adam_betas)
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=betas, weight_decay=train_cfg.weight_decay, **kwargs)


# ---------------------------------------------------------------------------- what a method's step asks for


def _same_settings(fresh: dict, group: dict) -> bool:
    """``fresh`` (a group as built at the start) has ``group``'s settings; the scheduler has
    rewritten ``group["lr"]``, so its starting lr is ``initial_lr``."""
    return all(group.get("initial_lr", group["lr"]) == v if k == "lr" else group.get(k) == v
               for k, v in fresh.items() if k != "params")


def regroup(optimizer: torch.optim.Optimizer, model: nn.Module, method, peft_cfg, train_cfg) -> None:
    """Re-point the optimiser's groups at the parameters that train now (``StepEffects.regroup``).

    Each parameter goes to the group the method's (or the default) grouping puts it in, matched
    to the optimiser's group of the same settings; parameters that left lose their AdamW state.
    Inside each group the order is the model's, so the order depends on the trainable set only
    and a resumed run's optimiser state lines up with the checkpoint's.
    """
    fresh = param_groups(model, method, peft_cfg, train_cfg)
    order = {id(p): i for i, p in enumerate(trainable_parameters(model))}
    placed: dict[int, list] = {}
    for want in fresh:
        free = [i for i, g in enumerate(optimizer.param_groups) if i not in placed and _same_settings(want, g)]
        if not free:
            raise RuntimeError(f"regroup: no optimiser group has the settings of "
                               f"{ {k: v for k, v in want.items() if k != 'params'} }")
        placed[free[0]] = sorted(want["params"], key=lambda p: order[id(p)])
    keep = {id(p) for params in placed.values() for p in params}
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in keep:
                optimizer.state.pop(p, None)
        group["params"] = placed.get(i, [])


@torch.no_grad()
def prune_moments(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], fraction: float) -> None:
    """Zero the ``fraction`` of each parameter's Adam state with the smallest first moment |m|.

    Both moments are zeroed at the same positions: a kept m over a zeroed v would make the next
    update m / (sqrt(v) + eps) explode.
    """
    for p in params:
        state = optimizer.state.get(p, {})
        m, v = state.get("exp_avg"), state.get("exp_avg_sq")
        if m is None or m.numel() == 0:
            continue
        k = int(fraction * m.numel())
        if k >= m.numel():
            drop = torch.ones_like(m, dtype=torch.bool)
        elif k > 0:
            drop = m.abs() <= m.abs().flatten().kthvalue(k).values
        else:
            continue
        m.masked_fill_(drop, 0.0)
        if v is not None:
            v.masked_fill_(drop, 0.0)


def reset_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """Drop these parameters' AdamW state (moments and step count): AdamW starts them afresh."""
    for p in params:
        optimizer.state.pop(p, None)


def scale_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Multiply every group's learning rate for the next step (the scheduler resets it after)."""
    for group in optimizer.param_groups:
        group["lr"] *= factor


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float, decay: float = 0.2) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (0-based) of ``total``.

    Warm-up: ``(step + 1) / warmup`` for the first ``warmup`` steps. Then, with
    ``p = min(1, (step - warmup) / max(1, total - warmup))``: constant 1; linear
    ``m + (1 - m)(1 - p)``; cosine ``m + (1 - m)(1 + cos(pi p)) / 2``; wsd (warm-up, stable, decay)
    1 while ``p < 1 - d``, then ``m + (1 - m)(1 - p) / d``, where ``m = min_ratio`` and ``d = decay``
    (``train.decay``, the share of the steps after warm-up that wsd spends decaying).
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "wsd":
        if progress < 1.0 - decay:
            return 1.0
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress) / decay
    if kind == "linear":
        shape = 1.0 - progress
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def warmup_steps(warmup: int | float, total: int) -> int:
    """``train.warmup`` in optimiser steps: an int is a count, a float in [0, 1) a share of ``total``
    (validate.warmup_setting; it refuses 1.0, which could be either)."""
    warmup = warmup_setting(warmup)
    return warmup if isinstance(warmup, int) else int(round(warmup * total))


def build_scheduler(optimizer, train_cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    from ..errors import ConfigError

    if train_cfg.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule {train_cfg.schedule!r} is not one of {', '.join(SCHEDULES)}")
    w = warmup_steps(train_cfg.warmup, total_steps)
    kind, ratio, decay = train_cfg.schedule, train_cfg.min_lr_ratio, train_cfg.decay
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, w, kind, ratio, decay))
