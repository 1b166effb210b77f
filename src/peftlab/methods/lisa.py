"""LISA: layerwise importance sampling — full fine-tuning of a few random layers at a time.

Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model
Fine-Tuning" (2024), arXiv:2403.17919.

    every K steps:  S ~ Uniform{γ-subsets of the L decoder layers}
                    train θ_emb, θ_head (and everything outside the layers: final norm, ...) + θ_S
                    AdamW state exists only for those; a layer's state is dropped when it freezes

Trainable at any one time: |θ_outside| + Σ_{l∈S} |θ_l| (= |θ_outside| + γ·|θ_layer| for identical
layers); over a run it cycles through all parameters, so the artifact is a whole model (as full
fine-tuning) and merging is the identity. The switch happens in ``on_step``: frozen layers lose
their gradients, and the step asks the loop to regroup the optimiser (frozen layers leave it with
their AdamW state, newly active layers join its param groups), so the memory of gradients and AdamW moments scales with γ, not L (benchmarks/methods_beyond.py
measures it against full fine-tuning). The layer sets are a pure function of (seed, step // K),
so a resumed run continues with the same schedule.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..model.params import unique_parameters
from ..registry import Method, StepEffects, register
from .adapter import decoder_layers


@dataclass
class LISAConfig:
    default_lr = 2e-4  # train.lr when unset (not a key): docs/results.md §2b (the shared default, measured best)
    method: str = "lisa"
    layers: int = 2  # γ: decoder layers trained at a time
    interval: int = 20  # K: optimizer steps between switches
    seed: int = 0  # the layer schedule's seed

    def validate(self) -> None:
        if self.layers < 1:
            raise ConfigError(f"peft.layers (γ) must be >= 1, got {self.layers}")
        if self.interval < 1:
            raise ConfigError(f"peft.interval (K) must be >= 1, got {self.interval}")


def schedule(num_layers: int, cfg: LISAConfig, step: int) -> list[int]:
    """The active layer indices for optimizer step ``step`` (0-based count of steps done)."""
    if cfg.layers > num_layers:
        raise ConfigError(f"peft.layers={cfg.layers} but the model has only {num_layers} decoder layers")
    rng = random.Random(f"{cfg.seed}:{step // cfg.interval}")
    return sorted(rng.sample(range(num_layers), cfg.layers))


def _layer_params(model: nn.Module) -> list[list[nn.Parameter]]:
    return [list(layer.parameters()) for _, layer in decoder_layers(model)]


def _activate(model: nn.Module, active: list[int]) -> None:
    """Freeze every decoder layer except ``active``; everything outside the layers trains."""
    for p in model.parameters():
        p.requires_grad_(True)
    for i, params in enumerate(_layer_params(model)):
        if i not in active:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
    model._lisa_active = list(active)


def apply(model: nn.Module, cfg: LISAConfig) -> None:
    _activate(model, schedule(len(decoder_layers(model)), cfg, 0))


def on_step(model: nn.Module, cfg: LISAConfig, step: int) -> StepEffects:
    """Switch to the layer set of ``step``; the loop then re-points the optimiser (``regroup``):
    frozen layers leave it with their AdamW state, newly active ones join it."""
    active = schedule(len(decoder_layers(model)), cfg, step)
    changed = active != getattr(model, "_lisa_active", None)
    if changed:
        _activate(model, active)
    return StepEffects(metrics={"lisa_layers": ",".join(map(str, active))}, regroup=changed)


def param_extra(model: nn.Module, cfg: LISAConfig) -> dict:
    """Trainable at any one time (the largest γ layers) and the total LISA cycles through."""
    sizes = sorted((sum(p.numel() for p in params) for params in _layer_params(model)), reverse=True)
    in_layers = {id(p) for params in _layer_params(model) for p in params}
    outside = sum(p.numel() for _, p in unique_parameters(model) if id(p) not in in_layers)
    return {"lisa_trainable_at_once": outside + sum(sizes[:cfg.layers]), "lisa_cycled_total": outside + sum(sizes),
            "lisa_active_layers": cfg.layers, "lisa_layers_total": len(sizes)}


def merge(model: nn.Module) -> None:
    """Nothing to fold: LISA trains the model's own weights."""


register(Method(
    name="lisa", config_cls=LISAConfig, apply=apply, merge=merge, peft_type=None,
    # The checkpoint must hold every weight, frozen or not: each was trained while its layer was active.
    state_prefixes=("",), on_step=on_step, param_extra=param_extra, edits_base=lambda cfg: True,
))
