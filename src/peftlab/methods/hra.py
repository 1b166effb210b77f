"""HRA: Householder reflection adaptation — the frozen weight times a chain of r reflections.

Yuan et al., "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation" (2024), arXiv:2405.17484.

    W' = W H,   H = Π_{i=1..r} (I − 2 u_i u_iᵀ / ‖u_i‖²),   u_i = columns of ``hra_u`` [in, r]

H is orthogonal, so HRA rotates W's input space like OFT, with r·in parameters. Init: the columns
come in equal pairs (u, u, v, v, ...), and a reflection applied twice is the identity, so H = I and
the model starts as the base (up to rounding) — hence ``r`` must be even. With ``apply_gs`` the
columns are Gram-Schmidt-orthonormalised first (Q) and H = I − 2 Q Qᵀ, which is never I: there the
columns start independent Kaiming-uniform (PEFT pairs them here too, and the second of each pair
orthogonalises to rounding noise, a direction no two machines agree on).

The forward applies H to the input, y = W (H x) + b, one reflection at a time (O(r·in) per token,
no in×in matrix); PEFT builds W H each call instead (the same function). The price is memory in
training: autograd keeps r copies of each layer's input (SmolLM2, r = 8: 5.5 GB peak RSS against
LoRA's 2.6 GB in the 40-step table); the compact WY form H = I − U T Uᵀ would keep O(r) per token. Merging: W ← W H
(a Conv1D's [in, out] weight: W ← Hᵀ W). Names and files are PEFT's (``<layer>.hra_u``, peft_type
``HRA``); PEFT 0.21 has HRA for nn.Linear but not GPT-2's Conv1D. Trainable: r·Σ in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from ..model.params import freeze
from ..model.targets import (
    LINEAR_TYPES,
    find_targets,
    layer_dtype_device,
    linear_shape,
    peft_target_modules,
    replace_module,
)
from ..registry import register
from . import peft_format
from .lowrank import factor_dtype, wide
from .merging import float_base, merge_wrappers
from .modules_to_save import add_additional_targets


@dataclass
class HRAConfig:
    method: str = "hra"
    r: int = 8  # number of reflections (even: the identity start pairs them)
    apply_gs: bool = False  # Gram-Schmidt the reflection vectors: H = I - 2 Q Q^T
    targets: str | list[str] = "all-linear"
    additional_targets: list[str] | None = None
    init_from: str | None = None
    merge_first: list[str] | None = None

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"peft.r must be >= 1, got {self.r}")
        if self.r % 2 and not self.apply_gs:
            raise ConfigError(f"peft.r must be even for hra (its reflections start in equal pairs, which cancel, "
                              f"so the model starts as the base), got {self.r}")


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """[in, r] -> orthonormal columns, in order (PEFT's loop, kept for equal rounding)."""
    cols = [u[:, :1] / u[:, 0].norm()]
    for i in range(1, u.shape[1]):
        ui = u[:, i:i + 1]
        for q in cols:
            ui = ui - (q.T @ ui) * q
        cols.append(ui / ui.norm())
    return torch.cat(cols, dim=1)


class HRALinear(nn.Module):
    """A frozen linear layer applied to H x. x [..., in] -> [..., out]; ``hra_u`` [in, r]."""

    def __init__(self, base_layer: nn.Module, cfg: HRAConfig):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        if cfg.r > self.in_features:
            raise ConfigError(f"peft.r={cfg.r} exceeds the {self.in_features} inputs of a target layer")
        self.apply_gs = cfg.apply_gs
        dtype, device = layer_dtype_device(base_layer)
        # pairs only where they cancel: without GS and for even r (an odd r comes only from a PEFT file)
        paired = not cfg.apply_gs and cfg.r % 2 == 0
        u = torch.empty(self.in_features, cfg.r // 2 if paired else cfg.r, device=device, dtype=factor_dtype(dtype))
        nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.hra_u = nn.Parameter(u.repeat_interleave(2, dim=1) if paired else u)
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def reflect(self, x: torch.Tensor) -> torch.Tensor:
        """H x for rows x [..., in] (H symmetric for GS; else H_1 (H_2 (... H_r x)))."""
        u = self.hra_u
        if self.apply_gs:
            q = gram_schmidt(u)
            return x - 2 * (x @ q) @ q.T
        u = u / u.norm(dim=0)
        for i in reversed(range(u.shape[1])):
            x = x - 2 * (x @ u[:, i:i + 1]) * u[:, i]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return self.base_layer(self.reflect(x.to(self.hra_u.dtype)).to(x.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W H ([out, in]); a Conv1D's [in, out] weight: W <- H^T W."""
        if self.merged:
            return
        float_base(self)
        w = self.base_layer.weight
        u = wide(self.hra_u)
        h = self.reflect(torch.eye(self.in_features, dtype=u.dtype, device=u.device))  # rows: H e_k = H[:, k]
        h = h.T.to(w.device)  # H [in, in]
        new = h.T @ wide(w) if isinstance(self.base_layer, Conv1D) else wide(w) @ h
        w.copy_(new.to(w.dtype))
        self.merged = True

    def extra_repr(self) -> str:
        return f"r={self.hra_u.shape[1]}, apply_gs={self.apply_gs}, merged={self.merged}"


def apply(model: nn.Module, cfg: HRAConfig) -> None:
    freeze(model)
    for path in find_targets(model, cfg.targets, kinds=LINEAR_TYPES):
        replace_module(model, path, HRALinear(model.get_submodule(path), cfg))
    add_additional_targets(model, cfg.additional_targets)


def merge(model: nn.Module) -> None:
    merge_wrappers(model, (HRALinear,), HRALinear.merge)


def to_peft_config(cfg: HRAConfig, model: nn.Module) -> dict:
    found = [n for n, m in model.named_modules() if isinstance(m, HRALinear)]
    return {
        "peft_type": "HRA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "apply_GS": cfg.apply_gs,
        "target_modules": peft_target_modules(model, cfg.targets, found),
        "init_weights": True,
        "bias": "none",
        "modules_to_save": peft_format.additional_targets_for_peft(cfg),
        "inference_mode": True,
    }


def from_peft_config(d: dict) -> HRAConfig:
    for key in ("layers_to_transform", "exclude_modules"):
        if d.get(key):
            raise ConfigError(f"adapter_config.json has {key}={d[key]!r}, which peftlab's HRA does not load")
    return HRAConfig(r=int(d["r"]), apply_gs=bool(d.get("apply_GS", False)), targets=peft_format.peft_targets(d, "HRA"),
                     additional_targets=peft_format.additional_targets_from_peft(d))


register(peft_format.family_method("hra", HRAConfig, apply, ("hra_u",), merge=merge, peft_type="HRA",
                                   to_peft_config=to_peft_config, from_peft_config=from_peft_config))
