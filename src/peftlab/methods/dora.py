"""DoRA: weight-decomposed low-rank adaptation.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation" (2024), arXiv:2402.09353.

    W' = m ⊙ (W + s B A) / ||W + s B A||_c          m [out] trainable, init ||W||_c

The weight is split into a magnitude m and a direction; LoRA adapts the direction, m trains
directly. ||.||_c is the L2 norm of each output unit's weight vector (a row of W [out, in];
a column in the paper's [in, out] notation). As the paper recommends (section 4.3) the norm is
treated as a constant in backward (``exact_norm=false``, the default, PEFT's behaviour): it still
follows B A in forward but passes no gradient, which saves the memory of W + sBA in the graph.
``exact_norm=true`` keeps the exact gradient.

Forward, without materialising W' (PEFT's formulation, so logits match):

    y = W x + b + (m/n - 1) ⊙ W x + (m/n) ⊙ s B A x,    n = ||W + s B A||_c

and, unlike PEFT, without forming W + sBA either: n^2 = ||W||^2 + 2s<W, BA> + s^2||BA||^2 per
row, with ||W||^2 cached (W is frozen) and the rest r-sized (``fast_weight_norm``) — a DoRA
step costs little more than a LoRA step instead of a dense [out, in] pass per layer.

Mergeable: W <- (m/n) ⊙ (W + s B A). All LoRA fields (rsLoRA, inits, LoRA+, LoRA-FA, extra
trained modules, continuing) apply; LoRA on embeddings and fused slices do not.
Trainable parameters per layer: r (in + out) + out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..model.targets import layer_dtype_device, linear_shape, weight_matrix
from ..registry import register
from . import lora, peft_format
from .lowrank import apply_lora_family, factor_dtype, lora_scaling, reset_factors, wide
from .merging import float_base, merge_wrappers


@dataclass
class DoRAConfig(lora.LoRAConfig):
    method: str = "dora"
    exact_norm: bool = False  # keep ||W + sBA|| in the backward graph (the paper detaches it)

    def validate(self) -> None:
        super().validate()
        if self.enable_lora:
            raise ConfigError("peft.enable_lora (fused slices) is not available with peft.method=dora")
        if self.sparsity_dropout:
            raise ConfigError("peft.sparsity_dropout is not available with peft.method=dora; use peft.dropout")


class DoRALinear(nn.Module):
    """A frozen linear layer with a DoRA update. x [..., in] -> [..., out].

    ``lora_A`` [r, in], ``lora_B`` [out, r] (``nn.Linear``), ``lora_magnitude_vector`` [out].
    """

    def __init__(self, base_layer: nn.Module, cfg: DoRAConfig):
        super().__init__()
        in_f, out_f = linear_shape(base_layer)
        if not 1 <= cfg.r <= min(in_f, out_f):
            raise ConfigError(f"peft.r={cfg.r} does not fit a layer of shape in={in_f}, out={out_f}")
        self.base_layer = base_layer
        self.in_features, self.out_features = in_f, out_f
        self.r, self.alpha = cfg.r, cfg.alpha
        self.scaling = lora_scaling(cfg.alpha, cfg.r, cfg.use_rslora)
        self.exact_norm = cfg.exact_norm
        dtype, device = layer_dtype_device(base_layer)
        dtype = factor_dtype(dtype)
        self.lora_A = nn.Linear(in_f, cfg.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(cfg.r, out_f, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        reset_factors(self.lora_A.weight, self.lora_B.weight, cfg.init, cfg.r)
        if cfg.init in ("pissa", "olora"):
            lora.principal_init(self, cfg.init, cfg.pissa_niter)
        self.lora_magnitude_vector = nn.Parameter(torch.empty(out_f, device=device, dtype=dtype))
        self.register_buffer("w_row_sq", torch.empty(out_f, device=device, dtype=dtype), persistent=False)
        if not self.lora_A.weight.is_meta:
            with torch.no_grad():
                self._cache_row_norms()  # m0 = ||W + sBA||_c, computed as forward computes it (identity at init)
                self.lora_magnitude_vector.copy_(self.fast_weight_norm())
        self.merged = False
        self._merge_scale: torch.Tensor | None = None

    @torch.no_grad()
    def _cache_row_norms(self) -> None:
        """||W||^2 per output unit: W is frozen, so the forward pass never needs W itself."""
        w = wide(self.base_weight(self.lora_A.weight.dtype))
        self.w_row_sq.copy_((w * w).sum(dim=1))

    @property
    def fan_in_fan_out(self) -> bool:
        from transformers.pytorch_utils import Conv1D

        return isinstance(self.base_layer, Conv1D)

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W [out, in] in ``dtype`` (dequantised for a quantised base)."""
        return weight_matrix(self.base_layer).to(dtype)

    def weight_norm(self, w: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """||W + s B A|| per output unit, [out]; detached from B A unless ``exact``."""
        ba = self.lora_B.weight @ self.lora_A.weight
        if not exact:
            ba = ba.detach()
        return torch.linalg.norm(w + self.scaling * ba, dim=1)

    def _base_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        bias = getattr(self.base_layer, "bias", None)
        return y - bias if bias is not None else y

    def fast_weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output unit [out] without forming W + sBA (out x in) every step:

            ||W + sBA||^2 = ||W||^2 + 2 s <W, BA> + s^2 ||BA||^2     (per row)
            <W, BA>_o = sum_k B_ok (A W^T)_ko,    ||BA||^2_o = (B (A A^T) B^T)_oo

        A W^T [r, out] is the base layer applied to the r rows of A (works for quantised bases
        too); everything else is r-sized. Differentiable in A and B (``exact_norm``)."""
        a, b, s = self.lora_A.weight, self.lora_B.weight, self.scaling
        dtype, _ = layer_dtype_device(self.base_layer)
        with torch.autocast(a.device.type, enabled=False):
            aw = self._base_no_bias(a.to(dtype)).to(a.dtype)  # [r, out]
            cross = (b * aw.T).sum(dim=1)
            ba_sq = ((b @ (a @ a.T)) * b).sum(dim=1)
            return (self.w_row_sq + 2 * s * cross + s * s * ba_sq).clamp_min(0).sqrt()

    def delta_weight(self) -> torch.Tensor:
        """W' - W in the base weight's layout, fp32."""
        w = wide(self.base_weight(self.lora_A.weight.dtype))
        merged = (wide(self.lora_magnitude_vector) / self.weight_norm(w))[:, None] * (
            w + self.scaling * (wide(self.lora_B.weight) @ wide(self.lora_A.weight)))
        delta = merged - w
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """W <- (m / ||W + sBA||) ⊙ (W + sBA); the factor is kept so ``unmerge`` can undo it."""
        if self.merged:
            return
        float_base(self)
        p = self.base_layer.weight
        w = wide(self.base_weight(self.lora_A.weight.dtype))
        scale = wide(self.lora_magnitude_vector) / self.weight_norm(w)
        merged = scale[:, None] * (w + self.scaling * (wide(self.lora_B.weight) @ wide(self.lora_A.weight)))
        p.copy_((merged.T if self.fan_in_fan_out else merged).to(p.dtype))
        self._merge_scale = scale
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        p = self.base_layer.weight
        w = wide(self.base_weight(self.lora_A.weight.dtype)) / self._merge_scale[:, None]
        w = w - self.scaling * (wide(self.lora_B.weight) @ wide(self.lora_A.weight))
        p.copy_((w.T if self.fan_in_fan_out else w).to(p.dtype))
        self._cache_row_norms()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a = self.lora_A.weight
        dropout_active = self.training and not isinstance(self.lora_dropout, nn.Identity)
        xd = self.lora_dropout(x.to(a.dtype))
        if self.exact_norm:
            norm = self.fast_weight_norm()
        else:
            with torch.no_grad():
                norm = self.fast_weight_norm()
        scale = self.lora_magnitude_vector / norm  # [out]
        lora_out = self.lora_B(self.lora_A(xd))
        if dropout_active:  # the base term must see the same dropped input as the LoRA term
            base_out = self._base_no_bias(xd).to(a.dtype)
        else:
            bias = getattr(self.base_layer, "bias", None)
            base_out = (result - bias if bias is not None else result).to(a.dtype)
        dora = (scale - 1) * base_out + scale * lora_out * self.scaling
        return result + dora.to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, exact_norm={self.exact_norm}, merged={self.merged}"


def apply(model: nn.Module, cfg: DoRAConfig) -> None:
    def linear(base, enable):
        return DoRALinear(base, cfg)

    apply_lora_family(model, cfg, linear)


def merge(model: nn.Module) -> None:
    merge_wrappers(model, (DoRALinear,), DoRALinear.merge)


register(
    peft_format.family_method(
        "dora", DoRAConfig, apply, (*lora.LORA_TENSORS, "lora_magnitude_vector"),
        merge=merge,
        peft_type="LORA",  # PEFT: a LoRA adapter with use_dora=true
        to_peft_config=lora.to_peft_config,
        from_peft_config=lora.from_peft_config,
        to_peft_keys=lora.to_peft_keys,
        param_groups=lora.param_groups,
        saved_config=lora.saved_config,
    )
)
