"""The reference policy of DPO and KTO: where the reference log-probabilities come from.

    adapter_off   the policy itself with the method's modules switched off (methods/base_only.py):
                  no second copy; prompt/prefix methods run without their virtual tokens
    frozen_copy   a frozen copy of the model as training starts (full fine-tuning, and methods
                  that change the base weights: ``Method.edits_base``)
    precomputed   either of the above, run once over the data set before training; the
                  log-probabilities travel with the examples (``ref_logps`` in the batch), so a
                  step runs one forward instead of two and no copy stays in memory
    none          reference-free: log-probabilities 0
    auto          adapter_off where the method leaves the base untouched and starts from it, else
                  frozen_copy (``peft.init_from``: the copy holds the adapter training starts from,
                  taken after it is loaded: train/step.start_training)

The reference always runs without gradients and in eval mode (no dropout: a fixed target).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ..errors import ConfigError
from ..methods.base_only import adapters_off, has_wrappers
from .runtime import autocast, to_device
from .seq_logps import row_logps


def resolve_kind(kind: str, method, peft_cfg, model: nn.Module) -> str:
    """``auto`` made concrete (the starting model); adapter_off refused where it would not give the base."""
    edits = method.edits_base is not None and method.edits_base(peft_cfg)
    # peft.init_from starts the modules from a saved adapter (an SFT LoRA): switching them off gives
    # the base before that adapter, not the model training starts from
    init_from = getattr(peft_cfg, "init_from", None)
    if kind == "auto":
        return "frozen_copy" if edits or init_from or not has_wrappers(model) else "adapter_off"
    # asked for by name with init_from, adapter_off is the base before that adapter (a KL to the base)
    if kind == "adapter_off" and (edits or not has_wrappers(model)):
        why = ("changes the base model's own weights" if edits else "has no modules to switch off")
        raise ConfigError(f"pref.reference=adapter_off: peft.method={method.name} {why}, so switching its modules off "
                          "does not give the model training started from; use pref.reference=frozen_copy "
                          "(or precomputed, which needs no copy during training)")
    return kind


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class Reference:
    """``logps(model, rows, key)``: the reference log-probabilities of the rows' answers [R]."""

    def __init__(self, kind: str, model: nn.Module | None = None, source: str | None = None):
        self.kind = kind
        self.source = source or kind  # what a precomputation runs (adapter_off or frozen_copy)
        self.copy = None
        if "frozen_copy" in (kind, self.source):
            self.copy = copy.deepcopy(model).requires_grad_(False).eval()

    @contextlib.contextmanager
    def model_for(self, model: nn.Module):
        """The reference model to run: the frozen copy, or ``model`` in eval mode with its modules
        switched off (restored on exit). Run it without gradients."""
        if self.source == "frozen_copy":
            yield self.copy
            return
        with _eval_mode(model), adapters_off(model):
            yield model

    @torch.no_grad()
    def compute(self, model: nn.Module, rows: dict, chunk: int = 1024) -> torch.Tensor:
        """Run the reference model (adapters off, or the frozen copy) over ``rows``."""
        with self.model_for(model) as ref:
            return row_logps(ref, rows, chunk, fused=False)[0]

    def logps(self, model: nn.Module, rows: dict, key: str = "ref_logps", chunk: int = 1024) -> torch.Tensor:
        if self.kind == "none":
            return torch.zeros(rows["input_ids"].shape[0], device=rows["input_ids"].device)
        if self.kind == "precomputed":
            if key not in rows:
                raise ConfigError("pref.reference=precomputed: this batch has no precomputed reference "
                                  "log-probabilities (train through peftlab.train, which computes them first)")
            return rows[key]
        return self.compute(model, rows, chunk)

    def release(self) -> None:
        """After a precomputation: the copy is no longer needed."""
        self.copy = None


def precompute(reference: Reference, model: nn.Module, examples: list, collate, batch_size: int,
               device: torch.device, amp, chunk: int = 1024) -> None:
    """Store the reference log-probabilities in every example (``example.ref``), batch by batch."""
    for start in range(0, len(examples), batch_size):
        part = examples[start:start + batch_size]
        batch = to_device(collate(part), device)
        with autocast(device, amp):
            main = reference.compute(model, batch, chunk).float().cpu()
            kl = None
            if "kl_input_ids" in batch:
                kl = reference.compute(model, {k[3:]: v for k, v in batch.items() if k.startswith("kl_")},
                                       chunk).float().cpu()
        n = len(part)
        for i, e in enumerate(part):
            if kl is not None:
                e.ref = (float(main[i]), float(kl[i]))
            else:
                e.ref = (float(main[i]), float(main[n + i]))
