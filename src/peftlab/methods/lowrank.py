"""The LoRA family's shared code: the low-rank wrappers, their scaling, inits and merge math.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), arXiv:2106.09685.

    h = W x + s · B A x,      s = alpha / r   (rsLoRA: alpha / sqrt(r))

``LoRALinear`` / ``LoRAEmbedding`` wrap a frozen layer (kept as ``base_layer`` and called) and add
the update; the formulas, fused slices and variants are documented in ``methods/lora.py``.
Merging is explicit and plain functions: ``merge_delta(layer)`` adds ``layer.delta_weight()``
(the update in the base weight's layout) into W in fp32 (fp64 for fp64 weights) and rounds once,
after first replacing a quantised base by its dequantised float layer; ``unmerge_delta`` subtracts
it. LoRA, LoRA on embeddings, AdaLoRA and VeRA merge this way; DoRA's merge is a rescaling.
``merging.merge_wrappers(model, classes, merge_delta)`` folds a whole model back into plain layers.
"""

from __future__ import annotations

import math

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
    name_matches,
    replace_module,
)
from . import lora_kernels
from .merging import float_base
from .modules_to_save import add_additional_targets


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732)."""
    return alpha / (math.sqrt(r) if use_rslora else r)


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision merges are computed in: fp64 stays fp64, everything else fp32."""
    return t.double() if t.dtype == torch.float64 else t.float()


@torch.no_grad()
def merge_delta(layer: nn.Module) -> None:
    """W <- W + ``layer.delta_weight()``, once (a quantised base is dequantised first)."""
    if layer.merged:
        return
    float_base(layer)
    w = layer.base_layer.weight
    w.copy_((wide(w) + layer.delta_weight().to(w.device)).to(w.dtype))
    layer.merged = True


@torch.no_grad()
def unmerge_delta(layer: nn.Module) -> None:
    """W <- W - ``layer.delta_weight()``: undoes ``merge_delta``."""
    if not layer.merged:
        return
    w = layer.base_layer.weight
    w.copy_((wide(w) - layer.delta_weight().to(w.device)).to(w.dtype))
    layer.merged = False


def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """Adapter tensors stay fp32 (or the base dtype when that is fp32/fp64), as PEFT keeps them."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


@torch.no_grad()
def reset_factors(A: torch.Tensor, B: torch.Tensor, init: str, r: int) -> None:
    """A [r', in] random (Kaiming-uniform, or N(0, 1/r) for ``gaussian``), B [out', r] zero."""
    if init == "gaussian":
        nn.init.normal_(A, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    x: [..., in] -> [..., out]. ``lora_A`` [r, in] and ``lora_B`` [out, r] (``nn.Linear``s) are
    kept in fp32 (or the base dtype when that is fp32/fp64) and the input is cast to them, as PEFT
    does. ``enable`` is None for an ordinary layer; for a fused layer (``peft.enable_lora``) it is
    the slice mask and the factors are A [k r, in], B [k out/n, r] (see the module docstring).
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", *, enable: list[bool] | None = None,
                 sparsity_dropout: float = 0.0):
        super().__init__()
        in_f, out_f = linear_shape(base_layer)
        self.enable = tuple(enable) if enable else None
        n = len(self.enable) if self.enable else 1
        k = sum(self.enable) if self.enable else 1
        if out_f % n:
            raise ConfigError(f"peft.enable_lora: a layer with {out_f} outputs cannot be split into {n} equal slices")
        slice_out = out_f // n
        if not 1 <= r <= min(in_f, slice_out):
            raise ConfigError(
                f"peft.r={r} does not fit a layer of shape in={in_f}, out={slice_out}: "
                f"the rank must be between 1 and {min(in_f, slice_out)}"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = in_f, out_f
        self.r = r
        self.alpha = alpha
        self.scaling = lora_scaling(alpha, r, use_rslora)
        dtype, device = layer_dtype_device(base_layer)
        dtype = factor_dtype(dtype)
        self.lora_A = nn.Linear(in_f, r * k, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, slice_out * k, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.sparsity_dropout = sparsity_dropout
        self.merged = False
        self.reset_lora(init)

    @property
    def fan_in_fan_out(self) -> bool:
        """True when the base stores its weight [in, out] (GPT-2's Conv1D)."""
        return isinstance(self.base_layer, Conv1D)

    def reset_lora(self, init: str = "kaiming") -> None:
        reset_factors(self.lora_A.weight, self.lora_B.weight, "gaussian" if init == "gaussian" else "kaiming", self.r)

    @property
    def weight(self) -> torch.Tensor:  # code that inspects layer.weight (e.g. dtype checks)
        return self.base_layer.weight

    def _slices(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(output slot, A_j [r, in], B_j [out/n, r]) for every enabled slice of a fused layer."""
        r, so = self.r, self.out_features // len(self.enable)
        slots = [i for i, on in enumerate(self.enable) if on]
        a, b = self.lora_A.weight, self.lora_B.weight
        return [(slot, a[j * r:(j + 1) * r], b[j * so:(j + 1) * so]) for j, slot in enumerate(slots)]

    def delta_weight(self) -> torch.Tensor:
        """s·BA in the base weight's layout ([out, in], or [in, out] for Conv1D), fp32 (fp64 for fp64 factors)."""
        if self.enable is None:
            delta = wide(self.lora_B.weight) @ wide(self.lora_A.weight)
        else:
            so = self.out_features // len(self.enable)
            delta = wide(self.lora_A.weight.new_zeros(self.out_features, self.in_features))
            for slot, a, b in self._slices():
                delta[slot * so:(slot + 1) * so] = wide(b) @ wide(a)
        delta = delta * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def merge(self) -> None:
        merge_delta(self)

    def unmerge(self) -> None:
        unmerge_delta(self)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """s·B A x: [..., in] -> [..., out] in the factors' dtype."""
        a = self.lora_A.weight
        h = self.lora_dropout(x.to(a.dtype))
        p = self.sparsity_dropout if self.training else 0.0
        if p:
            keep_in = torch.bernoulli(torch.full((self.in_features,), 1 - p, device=a.device, dtype=a.dtype))
            h = h * (keep_in / (1 - p))
        h = self.lora_A(h)
        if self.enable is None:
            out = self.lora_B(h)
        else:
            k, so = sum(self.enable), self.out_features // len(self.enable)
            parts = torch.einsum("...kr,kor->...ko", h.unflatten(-1, (k, self.r)),
                                 self.lora_B.weight.view(k, so, self.r))
            zeros = parts.new_zeros(*parts.shape[:-2], so)
            slots, j = [], 0
            for on in self.enable:
                slots.append(parts[..., j, :] if on else zeros)
                j += on
            out = torch.cat(slots, dim=-1)
        if p:
            keep_out = torch.bernoulli(torch.full((self.out_features,), 1 - p, device=a.device, dtype=a.dtype))
            out = out * (keep_out / (1 - p))
        return out * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged and lora_kernels.fast_path_ok(self, x):  # same math, fewer saved tensors
            return lora_kernels.lora_linear(self, x)
        result = self.base_layer(x)
        if self.merged:
            return result
        return result + self.lora_forward(x).to(result.dtype)

    def extra_repr(self) -> str:
        fused = f", enable={list(self.enable)}" if self.enable else ""
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}{fused}"


class LoRAEmbedding(nn.Module):
    """A frozen embedding plus a trainable low-rank update (PEFT's layout).

    ids [...] -> [..., d]. ``lora_embedding_A`` [r, V] starts at zero, ``lora_embedding_B``
    [d, r] normal: h = E[ids] + s · A^T[ids] B^T. ΔE = s (B A)^T [V, d].
    """

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, use_rslora: bool = False):
        super().__init__()
        vocab, dim = base_layer.weight.shape
        if not 1 <= r <= min(vocab, dim):
            raise ConfigError(f"peft.r={r} does not fit an embedding of {vocab} x {dim}")
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha
        self.scaling = lora_scaling(alpha, r, use_rslora)
        w = base_layer.weight
        dtype = factor_dtype(w.dtype)
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, vocab, device=w.device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(dim, r, device=w.device, dtype=dtype))
        self.merged = False
        self.reset_lora()

    def reset_lora(self, init: str = "kaiming") -> None:
        with torch.no_grad():
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """s (B A)^T [V, d], fp32."""
        return (wide(self.lora_embedding_B) @ wide(self.lora_embedding_A)).T * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        e = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A.T, e.padding_idx, e.max_norm, e.norm_type,
                              e.scale_grad_by_freq, e.sparse)
        return result + ((after_a @ self.lora_embedding_B.T) * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


WRAPPERS = (LoRALinear, LoRAEmbedding)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, WRAPPERS)}


def wrap_targets(model: nn.Module, cfg, make_linear, make_embedding=None) -> list[str]:
    """Replace every layer ``cfg.targets`` selects by ``make_linear(base, enable)`` (linear layers)
    or ``make_embedding(base)`` (embeddings, when the method supports them); returns the paths."""
    kinds = LINEAR_TYPES + ((nn.Embedding,) if make_embedding else ())
    paths = find_targets(model, cfg.targets, kinds=kinds)
    enable = dict(getattr(cfg, "enable_lora", {}) or {})
    used = set()
    for path in paths:
        base = model.get_submodule(path)
        if isinstance(base, nn.Embedding):
            replace_module(model, path, make_embedding(base))
            continue
        mask = next((m for name, m in enable.items() if name_matches(path, name)), None)
        if mask is not None:
            used.update(name for name in enable if name_matches(path, name))
        replace_module(model, path, make_linear(base, mask))
    unused = sorted(set(enable) - used)
    if unused:
        raise ConfigError(f"peft.enable_lora: {unused[0]!r} names no layer adapted by peft.targets={cfg.targets!r}")
    return paths


def apply_lora_family(model: nn.Module, cfg, make_linear, make_embedding=None) -> None:
    """What every LoRA-family ``apply`` does: freeze, wrap, extra modules, LoRA-FA's frozen factor."""
    freeze(model)
    wrap_targets(model, cfg, make_linear, make_embedding)
    add_additional_targets(model, cfg.additional_targets)
    if getattr(cfg, "freeze_a", False):
        for m in model.modules():
            if isinstance(getattr(m, "lora_A", None), nn.Linear) and hasattr(m, "base_layer"):
                m.lora_A.weight.requires_grad_(False)
            elif isinstance(m, LoRAEmbedding):
                m.lora_embedding_B.requires_grad_(False)
