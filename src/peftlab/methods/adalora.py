"""AdaLoRA: adaptive budget allocation over an SVD-form low-rank update.

Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (2023),
arXiv:2303.10512.

    h = W x + (alpha / r0) P Λ Q x,    P = B [out, r0], Λ = diag(E) [r0], Q = A [r0, in]

E starts at zero (identity at init), A and B ~ N(0, 0.02). Every triplet i (column of P, entry
of Λ, row of Q) gets an importance score from the sensitivity of its parameters,

    I(w) = |w * dL/dw|,  Ibar <- β1 Ibar + (1-β1) I,  U <- β2 U + (1-β2) |I - Ibar|,  s(w) = Ibar U
    S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)

and the total rank budget falls on a cubic schedule from r0 per layer to ``target_r`` per layer
between steps ``tinit`` and T - ``tfinal``; every ``delta_t`` steps the lowest-scoring E_i are set
to zero (they may come back while the budget is still falling). At T - ``tfinal`` the allocation is
fixed, reported per layer, and held to the end. A regulariser keeps P and Q near-orthogonal:

    R = orth_reg_weight * mean over matrices of ||Q Q^T - I||_F and ||P^T P - I||_F

These are Hugging Face PEFT's equations and defaults (β1 = β2 = 0.85, weight 0.5), so
adapter files are interchangeable; r0 (``ranknum``) is not stored (PEFT does not store it).
Pruned ranks stay in the file as zero entries of E (``rank_pattern`` null); PEFT files with a
``rank_pattern`` (pruned tensors) load with their per-layer ranks. Mergeable.
Trainable parameters per layer: r0 (in + out + 1).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

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
from .adalora_budget import STATE, Allocator, allocator
from .lora import check_alpha
from .lowrank import factor_dtype, merge_delta, wide
from .merging import merge_wrappers
from .modules_to_save import add_additional_targets


@dataclass
class AdaLoRAConfig:
    default_lr = 5e-3  # train.lr when unset (not a key): docs/results.md §2b
    method: str = "adalora"
    init_r: int = 12  # initial rank of every layer
    target_r: int = 8  # average rank per layer at the end
    alpha: float = 24.0  # scaling = alpha / init_r (2 x init_r: LoRA's default s = 2)
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"
    tinit: int = 0  # steps before pruning starts
    tfinal: int = 0  # steps at the end with the allocation fixed
    delta_t: int = 1  # steps between two allocations
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg_weight: float = 0.5
    total_step: int | None = None  # None: the run's train.steps
    rank_pattern: dict | None = None  # per-layer kept ranks (loading PEFT files with pruned ranks)
    additional_targets: list[str] | None = None
    init_from: str | None = None
    merge_first: list[str] | None = None

    def validate(self) -> None:
        if self.init_r < 1 or not 0 <= self.target_r <= self.init_r:
            raise ConfigError(f"AdaLoRA needs init_r >= 1 and 0 <= target_r <= init_r; got init_r={self.init_r}, "
                              f"target_r={self.target_r}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ConfigError(f"peft.beta1 and peft.beta2 must be in (0, 1); got {self.beta1}, {self.beta2}")
        if self.orth_reg_weight < 0 or self.delta_t < 1 or self.tinit < 0 or self.tfinal < 0:
            raise ConfigError("peft.orth_reg_weight, peft.tinit and peft.tfinal must be >= 0 and peft.delta_t >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {self.dropout}")
        check_alpha(self.alpha)


class AdaLoRALinear(nn.Module):
    """A frozen linear layer plus (alpha / r0) B diag(E) A. x [..., in] -> [..., out].

    ``lora_A`` [r, in], ``lora_B`` [out, r], ``lora_E`` [r, 1] (Parameters, PEFT's names);
    ``ranknum`` = r0, the initial rank, fixes the scaling even after pruning.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, ranknum: int):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        if r > min(self.in_features, self.out_features):
            raise ConfigError(f"peft.init_r={r} does not fit a layer of shape in={self.in_features}, "
                              f"out={self.out_features}")
        self.r = r
        self.ranknum = float(ranknum)
        self.scaling = alpha
        dtype, device = layer_dtype_device(base_layer)
        dtype = factor_dtype(dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=device, dtype=dtype))
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def fan_in_fan_out(self) -> bool:
        from transformers.pytorch_utils import Conv1D

        return isinstance(self.base_layer, Conv1D)

    def delta_weight(self) -> torch.Tensor:
        delta = wide(self.lora_B) @ (wide(self.lora_A) * wide(self.lora_E))
        delta = delta * self.scaling / (self.ranknum + 1e-5)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a = self.lora_A
        h = self.lora_dropout(x.to(a.dtype)) @ (a * self.lora_E).T @ self.lora_B.T
        return result + (h * self.scaling / (self.ranknum + 1e-5)).to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, ranknum={self.ranknum:g}, scaling={self.scaling:g}, merged={self.merged}"


def layers(model: nn.Module) -> dict[str, AdaLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoRALinear)}


def _pattern_key(name: str) -> str:
    """A PEFT rank_pattern key -> the layer path ('base_model.model.x.q_proj.lora_E' -> 'x.q_proj')."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name[: -len(".lora_E")] if name.endswith(".lora_E") else name


def apply(model: nn.Module, cfg: AdaLoRAConfig) -> None:
    freeze(model)
    pattern = {_pattern_key(k): v for k, v in (cfg.rank_pattern or {}).items()}
    for path in find_targets(model, cfg.targets, kinds=LINEAR_TYPES):
        r = int(sum(bool(b) for b in pattern[path])) if path in pattern else cfg.init_r
        replace_module(model, path, AdaLoRALinear(model.get_submodule(path), r, cfg.alpha,
                                                               cfg.dropout, cfg.init_r))
    add_additional_targets(model, cfg.additional_targets)


def merge(model: nn.Module) -> None:
    merge_wrappers(model, (AdaLoRALinear,), merge_delta)


def start(model: nn.Module, cfg: AdaLoRAConfig, total_steps: int) -> Allocator:
    """Set up the allocator for a run of ``total_steps`` optimiser steps (the loop's ``on_train_start``)."""
    state = Allocator(layers(model), cfg, cfg.total_step or total_steps)
    model.__dict__[STATE] = state
    return state


def on_step(model: nn.Module, cfg: AdaLoRAConfig, step: int) -> None:
    """After optimiser step ``step`` (gradients still present): importance, budget, masking."""
    state = allocator(model)
    if state is None:
        raise ConfigError("AdaLoRA's schedule was not started: call peftlab.methods.adalora.start(model, cfg, "
                          "total_steps) before training outside peftlab's loop")
    if state.step(layers(model), cfg, step):
        print(format_allocation(model), file=sys.stderr)


def rank_allocation(model: nn.Module) -> dict[str, int]:
    """Ranks each layer keeps: the allocator's latest mask during a run; for a loaded adapter the
    non-zero entries of E (pruned ranks are saved as zeros)."""
    state = allocator(model)
    if state is not None and state.rank_pattern is not None:
        return {path: int(sum(keep)) for path, keep in state.rank_pattern.items()}
    return {path: int((layer.lora_E != 0).sum()) or layer.r for path, layer in layers(model).items()}


def format_allocation(model: nn.Module) -> str:
    ranks = rank_allocation(model)
    state = allocator(model)
    width = max(len(p) for p in ranks)
    lines = [f"adalora: final rank allocation, total {sum(ranks.values())} "
             f"(budget {state.target_bgt if state else '?'}, started at {state.init_bgt if state else '?'})"]
    lines += [f"  {p:<{width}}  {r}" for p, r in ranks.items()]
    return "\n".join(lines)


def aux_loss(model: nn.Module, cfg: AdaLoRAConfig, batch: dict | None = None) -> torch.Tensor | None:
    """The orthogonality regulariser (the same for every micro-batch of a step): orth_reg_weight * mean over A and B of ||A A^T - I||_F, ||B^T B - I||_F (fp32)."""
    if cfg.orth_reg_weight == 0:
        return None
    total, n = None, 0
    for layer in layers(model).values():
        for p, left in ((layer.lora_A, True), (layer.lora_B, False)):
            if p.numel() == 0 or not p.requires_grad:
                continue
            p = p.float()
            cov = p @ p.T if left else p.T @ p
            term = torch.linalg.norm(cov - torch.eye(cov.shape[0], device=cov.device), ord="fro")
            total = term if total is None else total + term
            n += 1
    return None if total is None else cfg.orth_reg_weight * total / n


def param_extra(model: nn.Module, cfg: AdaLoRAConfig) -> dict:
    n = len(layers(model))
    return {"adalora_initial_total_rank": sum(m.r for m in layers(model).values()),
            "adalora_target_total_rank": cfg.target_r * n}


# ---------------------------------------------------------------------------- adapter files


def to_peft_config(cfg: AdaLoRAConfig, model: nn.Module) -> dict:
    found = list(layers(model))
    state = allocator(model)
    total = cfg.total_step or (state.total_step if state else cfg.tinit + cfg.tfinal + 1)
    return {
        "peft_type": "ADALORA",
        "task_type": "CAUSAL_LM",
        "init_r": cfg.init_r,
        "target_r": cfg.target_r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": peft_target_modules(model, cfg.targets, found),
        "tinit": cfg.tinit,
        "tfinal": cfg.tfinal,
        "deltaT": cfg.delta_t,
        "beta1": cfg.beta1,
        "beta2": cfg.beta2,
        "orth_reg_weight": cfg.orth_reg_weight,
        "total_step": total,
        "rank_pattern": cfg.rank_pattern,
        "fan_in_fan_out": peft_format.fan_in_fan_out(layers(model).values()),
        "bias": "none",
        "modules_to_save": peft_format.additional_targets_for_peft(cfg),
        "inference_mode": True,
    }


def from_peft_config(d: dict) -> AdaLoRAConfig:
    targets = peft_format.peft_targets(d, "AdaLoRA")
    init_r = int(d.get("init_r", 12))
    return AdaLoRAConfig(
        init_r=init_r,
        target_r=int(d.get("target_r", 8)),
        alpha=float(d.get("lora_alpha", 8)),
        dropout=float(d.get("lora_dropout", 0.0) or 0.0),
        targets=targets,
        tinit=int(d.get("tinit", 0)),
        tfinal=int(d.get("tfinal", 0)),
        delta_t=int(d.get("deltaT", 1)),
        beta1=float(d.get("beta1", 0.85)),
        beta2=float(d.get("beta2", 0.85)),
        orth_reg_weight=float(d.get("orth_reg_weight", 0.5)),
        total_step=d.get("total_step"),
        rank_pattern=d.get("rank_pattern") or None,
        additional_targets=peft_format.additional_targets_from_peft(d),
    )


register(
    peft_format.family_method(
        "adalora", AdaLoRAConfig, apply, ("lora_A", "lora_B", "lora_E"),
        merge=merge,
        peft_type="ADALORA",
        to_peft_config=to_peft_config,
        from_peft_config=from_peft_config,
        on_step=on_step,
        on_train_start=start,
        aux_loss=aux_loss,
        param_extra=param_extra,
    )
)
