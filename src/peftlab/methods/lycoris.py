"""LoHa and LoKr: the LyCORIS family's additive updates built from small factors (not a low-rank B A).

LoHa — Hyeon-Woo et al., "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning" (2022), arXiv:2108.06098; Yeh et al., "Navigating Text-To-Image Customization: From
LyCORIS Fine-Tuning to Model Evaluation" (2024), arXiv:2309.14859.

    ΔW = s · (W1a W1b) ⊙ (W2a W2b),     W1a, W2a [out, r],  W1b, W2b [r, in],  s = alpha / r

The Hadamard product of two rank-r matrices has rank up to r², for 2 r (in + out) parameters.
W2b starts at zero (the others Kaiming-uniform), so the model starts as the base.

LoKr — Edalati et al., "KronA: Parameter Efficient Tuning with Kronecker Adapter" (2022),
arXiv:2212.10650; LyCORIS's LoKr.

    ΔW = s · W1 ⊗ W2,     W1 [a, c],  W2 [b, d],  out = a b,  in = c d

(a, b) and (c, d) are ``factorization(out)`` / ``factorization(in)`` (the divisor pair nearest the
square root, or with ``decompose_factor`` = f the pair (f, n / f)). W2 is itself factored as
W2a [b, r] W2b [r, d] when r < max(b, d) / 2, and W1 as W1a W1b when ``decompose_both`` and
r < max(a, c) / 2 — PEFT's and LyCORIS's rules, so tensor names and shapes are PEFT's. Init: W1 (or
W1a) zero, W2 Kaiming (``init=lycoris``: W2 (or W2b) zero, W1 Kaiming).

Both: ``rank_dropout`` zeroes whole rows of ΔW during training (LoHa rescales the kept rows by
1 / their share, LoKr only with ``rank_dropout_scale``), ``module_dropout`` skips the whole update
for a step with that probability. Merging adds ΔW into W (``lowrank.merge_delta``). The forward is
y = W x + ΔW x with ΔW rebuilt each call (PEFT's way). Works on nn.Linear, GPT-2's Conv1D
(ΔW transposed into its [in, out] layout) and a quantised base; PEFT 0.21 accepts only
nn.Linear/Conv layers, so PEFT loads peftlab's files for Llama-style models, not for Conv1D ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
from .lowrank import factor_dtype, merge_delta, unmerge_delta, wide
from .merging import merge_wrappers
from .modules_to_save import add_additional_targets


@dataclass
class LoHaConfig:
    default_lr = 5e-3  # train.lr when unset (not a key): docs/results.md §2b
    method: str = "loha"
    r: int = 8
    alpha: float = 8.0  # s = alpha / r (PEFT's default alpha is r: s = 1)
    targets: str | list[str] = "all-linear"
    rank_dropout: float = 0.0  # drop rows of ΔW during training
    module_dropout: float = 0.0  # skip the whole update for a step during training
    additional_targets: list[str] | None = None
    init_from: str | None = None
    merge_first: list[str] | None = None

    def validate(self) -> None:
        _check_common(self)


@dataclass
class LoKrConfig:
    default_lr = 5e-3  # train.lr when unset (not a key): docs/results.md §2b
    method: str = "lokr"
    r: int = 8
    alpha: float = 8.0
    targets: str | list[str] = "all-linear"
    decompose_both: bool = False  # also factor W1 as W1a W1b when r is small enough
    decompose_factor: int = -1  # -1: factor near the square root; f > 0: the pair (f, n / f)
    init: str = "default"  # default: W1 = 0 (PEFT) | lycoris: W2 = 0 (LyCORIS)
    rank_dropout: float = 0.0
    rank_dropout_scale: bool = False  # rescale the kept rows of ΔW
    module_dropout: float = 0.0
    additional_targets: list[str] | None = None
    init_from: str | None = None
    merge_first: list[str] | None = None

    def validate(self) -> None:
        _check_common(self)
        if self.init not in ("default", "lycoris"):
            raise ConfigError(f"peft.init must be 'default' or 'lycoris' for lokr, got {self.init!r}")
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ConfigError(f"peft.decompose_factor must be -1 (near the square root) or a positive integer, "
                              f"got {self.decompose_factor}")


def _check_common(cfg) -> None:
    if cfg.r < 1:
        raise ConfigError(f"peft.r must be >= 1, got {cfg.r}")
    for key in ("rank_dropout", "module_dropout"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise ConfigError(f"peft.{key} must be in [0, 1), got {getattr(cfg, key)}")


def factorization(n: int, factor: int = -1) -> tuple[int, int]:
    """n = m · k: (factor, n / factor) when ``factor`` divides n, else the divisor pair m <= k with the
    smallest sum whose smaller member is at most ``factor`` (LyCORIS's search)."""
    if factor > 0 and n % factor == 0:
        return factor, n // factor  # as given, even when factor > n / factor (LyCORIS's order)
    limit = n if factor == -1 else factor
    m, k = 1, n
    while m < k:
        new_m = m + 1
        while n % new_m:
            new_m += 1
        new_k = n // new_m
        if new_m + new_k > m + k or new_m > limit:
            break
        m, k = new_m, new_k
    return (k, m) if m > k else (m, k)


def _kaiming(*shape: int, device, dtype) -> nn.Parameter:
    t = torch.empty(*shape, device=device, dtype=dtype)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return nn.Parameter(t)


def _zeros(*shape: int, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, device=device, dtype=dtype))


class LycorisLinear(nn.Module):
    """A frozen linear layer plus ΔW built by ``self.kind`` ("loha" or "lokr") from its own factors.

    x [..., in] -> [..., out]. Factor tensors are attributes named as in PEFT (``hada_*``, ``lokr_*``),
    fp32 for a half-precision base.
    """

    def __init__(self, base_layer: nn.Module, cfg):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        self.kind = cfg.method
        self.r, self.scaling = cfg.r, cfg.alpha / cfg.r
        self.rank_dropout, self.module_dropout = cfg.rank_dropout, cfg.module_dropout
        self.rescale_rows = cfg.method == "loha" or cfg.rank_dropout_scale
        self.merged = False
        dtype, device = layer_dtype_device(base_layer)
        kw = {"device": device, "dtype": factor_dtype(dtype)}
        out_f, in_f, r = self.out_features, self.in_features, cfg.r
        if self.kind == "loha":
            self.hada_w1_a, self.hada_w1_b = _kaiming(out_f, r, **kw), _kaiming(r, in_f, **kw)
            self.hada_w2_a, self.hada_w2_b = _kaiming(out_f, r, **kw), _zeros(r, in_f, **kw)
            return
        (a, b), (c, d) = factorization(out_f, cfg.decompose_factor), factorization(in_f, cfg.decompose_factor)
        zero_w1 = cfg.init == "default"
        if cfg.decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a = (_zeros if zero_w1 else _kaiming)(a, r, **kw)
            self.lokr_w1_b = _kaiming(r, c, **kw)
        else:
            self.lokr_w1 = (_zeros if zero_w1 else _kaiming)(a, c, **kw)
        if r < max(b, d) / 2:
            self.lokr_w2_a = _kaiming(b, r, **kw)
            self.lokr_w2_b = (_kaiming if zero_w1 else _zeros)(r, d, **kw)
        else:
            self.lokr_w2 = (_kaiming if zero_w1 else _zeros)(b, d, **kw)

    @property
    def fan_in_fan_out(self) -> bool:
        return isinstance(self.base_layer, Conv1D)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _factor(self, name: str, wide_: bool) -> torch.Tensor:
        """``name`` itself, or the product of ``name_a`` and ``name_b``."""
        cast = wide if wide_ else (lambda t: t)
        if hasattr(self, name):
            return cast(getattr(self, name))
        return cast(getattr(self, name + "_a")) @ cast(getattr(self, name + "_b"))

    def delta(self, wide_: bool = False) -> torch.Tensor:
        """ΔW [out, in] in the factors' dtype (``wide_``: fp32/fp64, for merging)."""
        if self.kind == "loha":
            cast = wide if wide_ else (lambda t: t)
            w = (cast(self.hada_w1_a) @ cast(self.hada_w1_b)) * (cast(self.hada_w2_a) @ cast(self.hada_w2_b))
        else:
            w = torch.kron(self._factor("lokr_w1", wide_), self._factor("lokr_w2", wide_))
        return w * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the base weight's layout ([in, out] for Conv1D), fp32 (fp64 for fp64 factors)."""
        w = self.delta(wide_=True)
        return w.T if self.fan_in_fan_out else w

    def merge(self) -> None:
        merge_delta(self)

    def unmerge(self) -> None:
        unmerge_delta(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        if self.training and self.module_dropout and torch.rand(1).item() <= self.module_dropout:
            return result
        w = self.delta()
        if self.training and self.rank_dropout:
            keep = (torch.rand(w.shape[0], device=w.device) > self.rank_dropout).to(w.dtype)
            if self.rescale_rows:
                keep = keep / keep.mean()
            w = w * keep[:, None]
        return result + F.linear(x.to(w.dtype), w).to(result.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


def apply(model: nn.Module, cfg) -> None:
    freeze(model)
    for path in find_targets(model, cfg.targets, kinds=LINEAR_TYPES):
        replace_module(model, path, LycorisLinear(model.get_submodule(path), cfg))
    add_additional_targets(model, cfg.additional_targets)


def merge(model: nn.Module) -> None:
    merge_wrappers(model, (LycorisLinear,), merge_delta)


def to_peft_config(cfg, model: nn.Module) -> dict:
    found = [n for n, m in model.named_modules() if isinstance(m, LycorisLinear)]
    out = {
        "peft_type": cfg.method.upper(),
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "alpha": cfg.alpha,
        "target_modules": peft_target_modules(model, cfg.targets, found),
        "rank_dropout": cfg.rank_dropout,
        "module_dropout": cfg.module_dropout,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_effective_conv2d": False,
        "init_weights": True,
        "modules_to_save": peft_format.additional_targets_for_peft(cfg),
        "inference_mode": True,
    }
    if cfg.method == "lokr":
        out.update(decompose_both=cfg.decompose_both, decompose_factor=cfg.decompose_factor,
                   rank_dropout_scale=cfg.rank_dropout_scale,
                   init_weights="lycoris" if cfg.init == "lycoris" else True)
    return out


def _from_peft(d: dict, cls):
    name = cls.__name__.removesuffix("Config")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "exclude_modules"):
        if d.get(key):
            raise ConfigError(f"adapter_config.json has {key}={d[key]!r}, which peftlab's {name} does not load; "
                              "re-save the adapter without it")
    kw = {"r": int(d["r"]), "alpha": float(d.get("alpha", d["r"])), "targets": peft_format.peft_targets(d, name),
          "rank_dropout": float(d.get("rank_dropout") or 0.0), "module_dropout": float(d.get("module_dropout") or 0.0),
          "additional_targets": peft_format.additional_targets_from_peft(d)}
    if cls is LoKrConfig:
        kw.update(decompose_both=bool(d.get("decompose_both", False)),
                  decompose_factor=int(d.get("decompose_factor", -1)),
                  rank_dropout_scale=bool(d.get("rank_dropout_scale", False)),
                  init="lycoris" if d.get("init_weights") == "lycoris" else "default")
    return cls(**kw)


LOHA = ("hada_",)
LOKR = ("lokr_",)
register(peft_format.family_method("loha", LoHaConfig, apply, LOHA, merge=merge, peft_type="LOHA",
                                   to_peft_config=to_peft_config,
                                   from_peft_config=lambda d: _from_peft(d, LoHaConfig)))
register(peft_format.family_method("lokr", LoKrConfig, apply, LOKR, merge=merge, peft_type="LOKR",
                                   to_peft_config=to_peft_config,
                                   from_peft_config=lambda d: _from_peft(d, LoKrConfig)))
