"""ReLoRA: high-rank training through repeated low-rank updates.

Lialin et al., "ReLoRA: High-Rank Training Through Low-Rank Updates" (2023), arXiv:2307.05695.

    every K steps:  W <- W + s B A;   A <- fresh random init, B <- 0   (``restart``, shared with
                    Chain of LoRA and PeriodicLoRA: methods/lora_chains.py);
                    zero ``reset_prune`` of the adapter's Adam state (smallest |m|, both moments);
                    learning rate re-warmed linearly over ``restart_warmup`` steps ("jagged" schedule)

Each restart starts a new rank-r subspace, so after n restarts the total update W - W0 can have
rank up to n r while only r (in + out) parameters train at any time. Between restarts it is
plain LoRA (all LoRA fields apply except PiSSA/OLoRA inits).

Because W itself changes during training, the saved adapter carries the adapted layers' base
weights along with A and B (``peft_type`` RELORA; peftlab loads it, PEFT cannot); ``merge``
gives the plain model. On a quantised base the restart requantises W + sBA (lossy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..model.targets import set_weight_matrix, weight_matrix
from ..quant.convert import is_quantized
from ..registry import StepEffects
from . import lora
from .lowrank import LoRAEmbedding, lora_layers, wide
from .merging import shared_weight_ids, untie_base


@dataclass
class ReLoRAConfig(lora.LoRAConfig):
    method: str = "relora"
    reset_every: int = 100  # optimiser steps between merge-and-restart
    restart_warmup: int = 10  # steps of linear LR re-warmup after each restart
    reset_prune: float = 0.99  # fraction of the adapter's optimiser moments zeroed at a restart

    def validate(self) -> None:
        super().validate()
        if self.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"peft.init={self.init} re-derives W at every restart; ReLoRA takes kaiming or gaussian")
        if self.reset_every < 1 or self.restart_warmup < 0:
            raise ConfigError(f"peft.reset_every must be >= 1 and peft.restart_warmup >= 0; got "
                              f"{self.reset_every}, {self.restart_warmup}")
        if not 0.0 <= self.reset_prune <= 1.0:
            raise ConfigError(f"peft.reset_prune must be in [0, 1], got {self.reset_prune}")


def untie_adapted(model: nn.Module) -> None:
    """Methods that write into W during training give tied weights (embeddings) their own copy."""
    shared = shared_weight_ids(model)
    untied = False
    for layer in lora_layers(model).values():
        base = layer.base_layer
        if not is_quantized(base) and id(base.weight) in shared:
            untie_base(layer)
            untied = True
    if untied and getattr(model, "config", None) is not None:
        model.config.tie_word_embeddings = False


def apply(model: nn.Module, cfg: ReLoRAConfig) -> None:
    lora.apply(model, cfg)
    untie_adapted(model)


@torch.no_grad()
def fold(layer: nn.Module, share: float = 1.0) -> None:
    """W <- W + share · s B A without changing the layer's state otherwise (a quantised W is requantised)."""
    delta = layer.delta_weight()
    if share != 1.0:
        delta = delta * share
    base = layer.base_layer
    if is_quantized(base):
        set_weight_matrix(base, weight_matrix(base) + delta.to(base.device))
    else:
        w = base.weight
        w.copy_((wide(w) + delta.to(w.device)).to(w.dtype))


def zero_factor(layer: nn.Module) -> nn.Parameter:
    """The factor that starts at zero: B of a linear layer, A of an embedding."""
    return layer.lora_embedding_A if isinstance(layer, LoRAEmbedding) else layer.lora_B.weight


@torch.no_grad()
def restart(model: nn.Module, cfg, keep: float = 0.0) -> list[nn.Parameter]:
    """Merge and restart — the one mechanism ReLoRA, Chain of LoRA and PeriodicLoRA share.

    For every LoRA layer W <- W + (1 - keep) · s B A; then, with ``keep`` = 0, A is re-initialised
    (``cfg.init``) and B = 0; with ``keep`` > 0 (PeriodicLoRA's momentum), A stays and B <- keep · B.
    Either way W + s B A is what it was, so the model's output is unchanged (up to W's rounding;
    a quantised W is requantised, which is lossy). Returns the adapter's trainable parameters,
    whose optimiser state the caller's ``StepEffects`` prunes or resets.
    """
    params = []
    for layer in lora_layers(model).values():
        fold(layer, 1.0 - keep)
        if keep:
            zero_factor(layer).mul_(keep)
        else:
            layer.reset_lora(cfg.init)
        params += [p for p in layer.parameters(recurse=True) if p.requires_grad]
    return params


def on_step(model: nn.Module, cfg: ReLoRAConfig, step: int) -> StepEffects:
    """A restart every ``reset_every`` steps (moments pruned); the learning rate re-warmed after it."""
    since = step % cfg.reset_every
    effects = StepEffects()
    if since == 0:
        effects.prune = (restart(model, cfg), cfg.reset_prune)
    if step >= cfg.reset_every and since < cfg.restart_warmup:
        effects.lr_scale = (since + 1) / cfg.restart_warmup  # the schedule set the next step's lr; scale it
    return effects


lora.register_variant("relora", ReLoRAConfig, apply, on_step, ("reset_every",))
