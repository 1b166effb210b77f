"""The eval loss a run reports: the objective's mean over the held-out examples (no aux term)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..data.tokenize import Example
from .distributed import DistContext, LossModule
from .objective import CausalLM, Objective
from .runtime import autocast, to_device


def evaluate_loss(model: nn.Module, examples: list[Example], batch_size: int, collate_fn,
                  device: torch.device, amp: torch.dtype | None, max_batches: int | None = None,
                  engine: nn.Module | None = None, dist: DistContext | None = None,
                  objective: Objective | None = None) -> float:
    """The mean of ``evaluate_sums``: the objective's loss per unit over ``examples``."""
    total, units = evaluate_sums(model, examples, batch_size, collate_fn, device, amp, max_batches, engine, dist,
                                 objective)
    return total / max(units, 1)


@torch.no_grad()
def evaluate_sums(model: nn.Module, examples: list[Example], batch_size: int, collate_fn,
                  device: torch.device, amp: torch.dtype | None, max_batches: int | None = None,
                  engine: nn.Module | None = None, dist: DistContext | None = None,
                  objective: Objective | None = None) -> tuple[float, int]:
    """(the objective's loss summed over ``examples``, their units: label tokens for language
    modelling), reduced over every process; the model's mode is restored after.

    With several processes each rank scores every world_size-th batch and the sums are reduced.
    ``engine`` (from ``DistContext.wrap``; default: the objective on the plain model) computes the
    loss where FSDP must gather weights;
    under FSDP every rank runs the same number of forwards (a rank short of batches repeats its
    first one with weight 0).
    """
    dist, objective = dist or DistContext(), objective or CausalLM()
    engine = engine if engine is not None else LossModule(model, objective)
    was_training = model.training
    model.eval()
    starts = list(range(0, len(examples), batch_size))
    if max_batches is not None:
        starts = starts[:max_batches]
    mine = starts[dist.rank::dist.world_size]
    rounds = math.ceil(len(starts) / dist.world_size) if dist.mode.startswith("fsdp") else len(mine)
    total, count = 0.0, 0
    try:
        for r in range(rounds):
            i, weight = (mine[r], 1) if r < len(mine) else (starts[0], 0)
            batch = collate_fn(examples[i:i + batch_size])
            n = objective.units(batch)
            batch = to_device(batch, device)
            with autocast(device, amp):
                loss_sum = engine(batch)[0]
            total += weight * float(loss_sum)
            count += weight * n
    finally:
        model.train(was_training)
    sums = dist.all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64, device=device))
    return float(sums[0]), int(sums[1])
