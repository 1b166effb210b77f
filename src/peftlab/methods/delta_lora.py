"""Delta-LoRA: the frozen weight follows the low-rank update's own steps.

Zi et al., "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank Matrices"
(2023), arXiv:2309.02411.

    after optimiser step t (t > delta_start):
        W <- W + λ s (B_{t+1} A_{t+1} - B_t A_t)          λ = ``delta_lambda`` (paper: 2)

W needs no gradient and no optimiser state (the update comes from A and B, which are trained as
in LoRA), so memory stays LoRA's; the model still learns a full-rank change of W. The paper
drops LoRA dropout (keep ``peft.dropout=0``) and starts the W updates after a few hundred steps
(``delta_start``). A and B of the previous step are kept as buffers (``lora_A_prev``/
``lora_B_prev``) so a resumed run continues exactly. Linear layers only (no embeddings, no
fused slices), on an unquantised base: a 4/8-bit W cannot take updates this small.

The saved adapter carries the adapted layers' base weights along with A and B (``peft_type``
DELTA_LORA; peftlab loads it, PEFT cannot); ``merge`` gives the plain model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..quant.convert import model_is_quantized
from . import lora, relora
from .lowrank import LoRALinear, lora_layers, wide


@dataclass
class DeltaLoRAConfig(lora.LoRAConfig):
    method: str = "delta_lora"
    delta_lambda: float = 2.0  # λ: how far W follows each step of s·BA
    delta_start: int = 0  # optimiser steps of plain LoRA before W starts to follow

    def validate(self) -> None:
        super().validate()
        if self.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"peft.init={self.init} is not available with delta_lora; use kaiming or gaussian")
        if self.enable_lora:
            raise ConfigError("peft.enable_lora (fused slices) is not available with delta_lora")
        if self.delta_start < 0:
            raise ConfigError(f"peft.delta_start must be >= 0, got {self.delta_start}")


def apply(model: nn.Module, cfg: DeltaLoRAConfig) -> None:
    if model_is_quantized(model):
        raise ConfigError("delta_lora updates the base weights every step by tiny amounts that a 4/8-bit base "
                          "rounds away; use model.quantize=none (or peft.method=relora, which merges every K steps)")
    lora.apply(model, cfg)
    for path, layer in lora_layers(model).items():
        if not isinstance(layer, LoRALinear):
            raise ConfigError(f"delta_lora adapts linear layers; {path!r} is an embedding — remove it from peft.targets")
        layer.register_buffer("lora_A_prev", layer.lora_A.weight.detach().clone())
        layer.register_buffer("lora_B_prev", layer.lora_B.weight.detach().clone())
    relora.untie_adapted(model)


@torch.no_grad()
def on_step(model: nn.Module, cfg: DeltaLoRAConfig, step: int) -> None:
    """W follows this step's change of s·BA (after ``delta_start``); A and B are kept for the next."""
    for layer in lora_layers(model).values():
        a, b = layer.lora_A.weight, layer.lora_B.weight
        if step > cfg.delta_start:
            change = (wide(b) @ wide(a) - wide(layer.lora_B_prev) @ wide(layer.lora_A_prev))
            change = change * (cfg.delta_lambda * layer.scaling)
            w = layer.base_layer.weight
            w.add_((change.T if layer.fan_in_fan_out else change).to(w.dtype))
        layer.lora_A_prev.copy_(a)
        layer.lora_B_prev.copy_(b)


lora.register_variant("delta_lora", DeltaLoRAConfig, apply, on_step, ("delta_lambda",))
