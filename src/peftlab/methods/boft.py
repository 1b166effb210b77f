"""BOFT: orthogonal fine-tuning with butterfly-factorised rotations and a learned output scale.

Liu et al., "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization" (2024),
arXiv:2311.06243.

    y = s ⊙ (W Mᵀ x) + b,    M = M_{m-1} ··· M_1 M_0,    M_i = P_i diag(R_i1, ..., R_iD) P_iᵀ
    R_ij = (I − Q)(I + Q)⁻¹,  Q = (A_ij − A_ijᵀ) / 2      (exact Cayley of a b×b block)

m = ``n_butterfly_factor`` factors of D = in / b blocks of size b; P_i is the block-butterfly
permutation of factor i (P_0 = I), so m factors mix 2^(m-1) times wider than one block-diagonal
factor (m = 1 is block-diagonal OFT with a scale). ``boft_R`` [m, D, b, b] starts at zero (R = I)
and ``boft_s`` [out, 1] at one, so the model starts as the base. ``module_dropout`` = p: during
training int(p D) random blocks of one random factor act as I for the step (PEFT's multiplicative
dropout).

The forward applies M to the input one factor at a time (gathers and block products, no in×in
matrix). Merging: W ← diag(s) W Mᵀ (Conv1D's [in, out] weight: W ← M W diag(s)); the bias is not
scaled. Names and files are PEFT's (``boft_R``, ``boft_s``, peft_type ``BOFT``). PEFT 0.21 computes
m > 1 only with its CUDA kernel; without it (on CPU) it silently trains m = 1 whatever the config
says, so PEFT-written CPU files have boft_R [1, D, b, b].
"""

from __future__ import annotations

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
class BOFTConfig:
    method: str = "boft"
    block_size: int = 4  # b (0: from block_num); set exactly one of block_size and block_num
    block_num: int = 0  # D blocks per factor (0: from block_size)
    n_butterfly_factor: int = 1  # m: 1 = block-diagonal; each more factor mixes twice as wide
    targets: str | list[str] = "all-linear"
    module_dropout: float = 0.0  # fraction of one factor's blocks set to I per training step
    additional_targets: list[str] | None = None
    init_from: str | None = None
    merge_first: list[str] | None = None

    def validate(self) -> None:
        if (self.block_size != 0) == (self.block_num != 0) or self.block_size < 0 or self.block_num < 0:
            raise ConfigError(f"set exactly one of peft.block_size and peft.block_num to a positive value and the "
                              f"other to 0, got block_size={self.block_size}, block_num={self.block_num}")
        if self.n_butterfly_factor < 1:
            raise ConfigError(f"peft.n_butterfly_factor must be >= 1, got {self.n_butterfly_factor}")
        if not 0.0 <= self.module_dropout < 1.0:
            raise ConfigError(f"peft.module_dropout must be in [0, 1), got {self.module_dropout}")


def butterfly_perm(n: int, blocks: int, half: int, factors: int) -> torch.Tensor:
    """The permutation (indices [n]) of one butterfly factor: within every group of n / blocks inputs,
    the sub-blocks of size ``half`` are reordered evens first, then odds. Identity for one factor."""
    if factors == 1:
        return torch.arange(n)
    group = n // blocks
    step = group // half
    seq = torch.cat([torch.arange(0, step, 2), torch.arange(1, step, 2)])
    order = torch.cat([torch.arange(p * half, p * half + half) for p in seq.tolist()])
    return torch.cat([g + order for g in range(0, n, group)])


def layer_blocks(in_features: int, cfg: BOFTConfig, path: str) -> tuple[int, int]:
    """(D, b) for a layer, with the divisibility rules of PEFT's BOFT as clear errors."""
    m = cfg.n_butterfly_factor
    b = cfg.block_size or (in_features // cfg.block_num if in_features % cfg.block_num == 0 else 0)
    span = b * 2 ** (m - 1)
    if not b or in_features % span or (m > 1 and (b % 2 or (in_features // b) % 2)):
        given = f"peft.block_size={cfg.block_size}" if cfg.block_size else f"peft.block_num={cfg.block_num}"
        raise ConfigError(f"{given} with peft.n_butterfly_factor={m} does not fit the {in_features} inputs of "
                          f"{path!r}: the block size b must divide them, and for m > 1 b and the block count must "
                          f"be even and b·2^(m-1) must divide them; choose another block size or factor count")
    return in_features // b, b


class BOFTLinear(nn.Module):
    """A frozen linear layer on Mᵀ x, its output scaled by s. x [..., in] -> [..., out]."""

    def __init__(self, base_layer: nn.Module, cfg: BOFTConfig, path: str):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        d, b = layer_blocks(self.in_features, cfg, path)
        m = cfg.n_butterfly_factor
        dtype, device = layer_dtype_device(base_layer)
        dtype = factor_dtype(dtype)
        self.boft_R = nn.Parameter(torch.zeros(m, d, b, b, device=device, dtype=dtype))
        self.boft_s = nn.Parameter(torch.ones(self.out_features, 1, device=device, dtype=dtype))
        perms = [butterfly_perm(self.in_features, d // 2**i, b // 2, m) for i in range(m)]
        self.register_buffer("perm", torch.stack(perms).to(device), persistent=False)
        self.register_buffer("inverse", torch.stack([torch.argsort(p) for p in perms]).to(device), persistent=False)
        self.module_dropout = cfg.module_dropout
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def rotations(self, wide_: bool = False) -> torch.Tensor:
        """[m, D, b, b]: every block's exact Cayley rotation."""
        a = wide(self.boft_R) if wide_ else self.boft_R
        q = 0.5 * (a - a.transpose(-2, -1))
        eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype).expand_as(q)
        rot = torch.linalg.solve(eye + q, eye - q, left=False)
        if self.training and self.module_dropout and not wide_:
            m, d = rot.shape[:2]
            keep = torch.ones(m, d, 1, 1, device=rot.device, dtype=rot.dtype)
            keep[torch.randint(m, (1,)).item(), torch.randperm(d)[: int(self.module_dropout * d)]] = 0
            rot = keep * rot + (1 - keep) * eye[0]
        return rot

    def rotate(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """Rows x [..., in] -> x M (= (Mᵀ xᵀ)ᵀ), one factor at a time, the last factor first."""
        for i in reversed(range(rot.shape[0])):
            h = x[..., self.inverse[i]].unflatten(-1, rot.shape[1:3])  # x P_i
            h = torch.einsum("...dk,dkc->...dc", h, rot[i]).flatten(-2)  # ... B_i
            x = h[..., self.perm[i]]  # ... P_iᵀ
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        rot = self.rotations()
        y = self.base_layer(self.rotate(x.to(rot.dtype), rot).to(x.dtype))
        bias = getattr(self.base_layer, "bias", None)
        s = self.boft_s.flatten()
        if bias is None:
            return (y * s).to(y.dtype)
        return ((y - bias) * s + bias).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- diag(s) W Mᵀ ([out, in]); a Conv1D's [in, out] weight: W <- M W diag(s)."""
        if self.merged:
            return
        float_base(self)
        w = self.base_layer.weight
        rot = self.rotations(wide_=True)
        mat = self.rotate(torch.eye(self.in_features, dtype=rot.dtype, device=rot.device), rot).to(w.device)  # M
        s = wide(self.boft_s).flatten().to(w.device)
        new = (mat @ wide(w)) * s if isinstance(self.base_layer, Conv1D) else s[:, None] * (wide(w) @ mat.T)
        w.copy_(new.to(w.dtype))
        self.merged = True

    def extra_repr(self) -> str:
        m, d, b, _ = self.boft_R.shape
        return f"factors={m}, blocks={d}, block_size={b}, merged={self.merged}"


def apply(model: nn.Module, cfg: BOFTConfig) -> None:
    freeze(model)
    for path in find_targets(model, cfg.targets, kinds=LINEAR_TYPES):
        replace_module(model, path, BOFTLinear(model.get_submodule(path), cfg, path))
    add_additional_targets(model, cfg.additional_targets)


def merge(model: nn.Module) -> None:
    merge_wrappers(model, (BOFTLinear,), BOFTLinear.merge)


def to_peft_config(cfg: BOFTConfig, model: nn.Module) -> dict:
    found = [n for n, m in model.named_modules() if isinstance(m, BOFTLinear)]
    return {
        "peft_type": "BOFT",
        "task_type": "CAUSAL_LM",
        "boft_block_size": cfg.block_size,
        "boft_block_num": cfg.block_num,
        "boft_n_butterfly_factor": cfg.n_butterfly_factor,
        "target_modules": peft_target_modules(model, cfg.targets, found),
        "boft_dropout": cfg.module_dropout,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_weights": True,
        "modules_to_save": peft_format.additional_targets_for_peft(cfg),
        "inference_mode": True,
    }


def from_peft_config(d: dict) -> BOFTConfig:
    for key in ("layers_to_transform", "exclude_modules"):
        if d.get(key):
            raise ConfigError(f"adapter_config.json has {key}={d[key]!r}, which peftlab's BOFT does not load")
    return BOFTConfig(block_size=int(d.get("boft_block_size", 4)), block_num=int(d.get("boft_block_num", 0)),
                      n_butterfly_factor=int(d.get("boft_n_butterfly_factor", 1)),
                      targets=peft_format.peft_targets(d, "BOFT"), module_dropout=float(d.get("boft_dropout") or 0.0),
                      additional_targets=peft_format.additional_targets_from_peft(d))


register(peft_format.family_method("boft", BOFTConfig, apply, ("boft_R", "boft_s"), merge=merge, peft_type="BOFT",
                                   to_peft_config=to_peft_config, from_peft_config=from_peft_config))
