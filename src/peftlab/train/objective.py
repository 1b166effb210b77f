"""What a training step minimises: the objective interface and the causal-LM loss.

The loop averages a step's loss over its *units* (over every micro-batch and every rank), so
gradient accumulation and data parallelism equal one big batch exactly:

    loss_step = sum over micro-batches b of objective.loss(model, b)
                / sum over micro-batches b of objective.units(b)

Language modelling counts label tokens; a preference loss counts pairs (train/preference.py:
``train.objective=dpo|orpo|simpo|kto|reward``). Two optional methods: ``pop_stats()`` returns the
(sum, count) of the objective's own metrics since the last call, which the loop reduces over
processes and adds to each step's record (``eval_`` ones after an evaluation); ``save(model,
run_dir)`` writes tensors the objective itself trains (a reward model's head). ``loss`` runs inside
the engine's forward (``DistContext.wrap(model, mode, objective)``), so DDP's gradient sync and
FSDP's weight gathering happen around any objective, not only this one; evaluation, the training
step and every process count the same units.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .loss import causal_lm_loss, count_label_tokens


class Objective(Protocol):
    def units(self, batch: dict) -> int:
        """What this micro-batch's loss is a sum over (label tokens, pairs, ...)."""

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The SUM of the loss over this micro-batch's units: a scalar tensor."""


class CausalLM:
    """Token-weighted next-token cross-entropy (``loss.causal_lm_loss``): the default objective.

    ``options`` are ``causal_lm_loss``'s speed levers (``chunk_rows``, ``fused``, ``skip_pad_mask``;
    ``train.loss_chunk``, ``train.fused_loss``, ``train.skip_pad_mask``): equal losses, other costs."""

    def __init__(self, **options):
        self.options = options

    def units(self, batch: dict) -> int:
        return count_label_tokens(batch["labels"])

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return causal_lm_loss(model, batch, **self.options)[0]
