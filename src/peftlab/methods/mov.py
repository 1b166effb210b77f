"""MoV: a soft, token-level mixture of (IA)3 vectors.

Zadouri et al., "Pushing Mixture of Experts to the Limit: Extremely Parameter Efficient MoE for
Instruction Tuning" (2023), arXiv:2309.05444 (MoV; its LoRA sibling MoLoRA is ``moe_lora``).

    g(x) = softmax(W_g x) ∈ R^N                     router per adapted layer, per token, on the layer's input x
    l(x) = Σ_i g_i(x) l_i                           the token's (IA)3 vector, a mix of N expert vectors
    output scaling:  y = l(x) ⊙ (W x)               keys, values (GPT-2: the fused c_attn)
    input scaling:   y = W (l(x) ⊙ x)               the FFN's down projection (its input, the activation)

Placement is (IA)3's (``ia3.placements``: the same default targets and ``feedforward`` rule).
Every l_i starts at ones, so l(x) = Σ g_i = 1 and the model starts as the base (up to the softmax's
rounding). ``mov_experts`` [N, n] (n = out, or in for feed-forward targets), ``mov_router`` [N, in]
(no bias, nn.Linear's init), both fp32. Trainable per adapted layer: N·n + N·in.
Cannot merge (the mixture depends on the token). PEFT has no MoV: files use peft_type ``MOV``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..model.params import freeze
from ..model.targets import layer_dtype_device, linear_shape, peft_target_modules, set_submodule
from ..registry import Method, register
from .ia3 import placements


@dataclass
class MoVConfig:
    method: str = "mov"
    num_experts: int = 10  # N (the paper: 10, 30 or 60)
    targets: str | list[str] | None = None  # default: (IA)3's keys, values and FFN down projection
    feedforward: str | list[str] | None = None  # targets whose input is scaled (default: the FFN down proj)

    def validate(self) -> None:
        if self.num_experts < 1:
            raise ConfigError(f"peft.num_experts must be >= 1, got {self.num_experts}")


class MoVLinear(nn.Module):
    """A frozen linear layer whose output (or, for feed-forward targets, input) is scaled per token by
    a router-weighted mix of N (IA)3 vectors. x [..., in] -> [..., out]."""

    def __init__(self, base_layer: nn.Module, feedforward: bool, num_experts: int):
        super().__init__()
        in_f, out_f = linear_shape(base_layer)
        _, device = layer_dtype_device(base_layer)
        self.base_layer = base_layer
        self.feedforward = feedforward
        self.mov_experts = nn.Parameter(torch.ones(num_experts, in_f if feedforward else out_f, device=device))
        self.mov_router = nn.Linear(in_f, num_experts, bias=False, device=device)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """l(x) [..., n] = softmax(W_g x) @ experts, for x [..., in]."""
        gates = self.mov_router(x.to(self.mov_router.weight.dtype)).softmax(-1)
        return gates @ self.mov_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale(x)
        if self.feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        y = self.base_layer(x)
        return (y.to(scale.dtype) * scale).to(y.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.mov_experts.shape[0]}, feedforward={self.feedforward}"


def apply(model: nn.Module, cfg: MoVConfig) -> None:
    freeze(model)
    for path, feedforward in placements(model, cfg):
        set_submodule(model, path, MoVLinear(model.get_submodule(path), feedforward, cfg.num_experts))


def to_peft_config(cfg: MoVConfig, model: nn.Module) -> dict:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MoVLinear)}
    ff = [n for n, m in layers.items() if m.feedforward]
    return {"peft_type": "MOV", "task_type": "CAUSAL_LM", "num_experts": cfg.num_experts,
            "target_modules": peft_target_modules(model, "all-linear", list(layers)),
            "feedforward_modules": peft_target_modules(model, "all-linear", ff) if ff else [], "inference_mode": True}


def from_peft_config(d: dict) -> MoVConfig:
    ff = d.get("feedforward_modules") or []
    return MoVConfig(num_experts=int(d["num_experts"]), targets=d["target_modules"],
                     feedforward=ff if isinstance(ff, str) else list(ff))


register(Method(
    name="mov", config_cls=MoVConfig, apply=apply, merge=None, peft_type="MOV", state_prefixes=("mov_",),
    to_peft_config=to_peft_config, from_peft_config=from_peft_config,
))
