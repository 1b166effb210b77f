"""What a training step minimises: the objective interface and the causal-LM loss.

The loop averages a step's loss over its *units* (over every micro-batch and every rank), so
gradient accumulation and data parallelism equal one big batch exactly:

    loss_step = sum over micro-batches b of objective.loss(engine, model, b)
                / sum over micro-batches b of objective.units(b)

Language modelling counts label tokens; a preference loss would count pairs. ``engine`` is the
module from ``DistContext.wrap`` (``engine(batch) -> (loss_sum, label_tokens)``), which must be
called where DDP/FSDP hooks have to run; ``model`` is the plain model underneath (for objectives
that need more than the engine's loss, or None-engine evaluation).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .loss import causal_lm_loss, count_label_tokens


class Objective(Protocol):
    def units(self, batch: dict) -> int:
        """What this micro-batch's loss is a sum over (label tokens, pairs, ...)."""

    def loss(self, engine: nn.Module | None, model: nn.Module, batch: dict) -> torch.Tensor:
        """The SUM of the loss over this micro-batch's units: a scalar tensor."""


class CausalLM:
    """Token-weighted next-token cross-entropy (``loss.causal_lm_loss``): the default objective."""

    def units(self, batch: dict) -> int:
        return count_label_tokens(batch["labels"])

    def loss(self, engine: nn.Module | None, model: nn.Module, batch: dict) -> torch.Tensor:
        return (engine(batch) if engine is not None else causal_lm_loss(model, batch))[0]
