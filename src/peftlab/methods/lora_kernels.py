"""A LoRA linear layer as one autograd function that saves only its input.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), arXiv:2106.09685.

    y = x W^T + b + s (x A^T) B^T          x [N, in], W [out, in] frozen, A [r, in], B [out, r]

Backward, with g = dL/dy [N, out] and u = x A^T [N, r] (saved: it is only r wide):

    dL/dB = s g^T u                [out, r]
    gu    = s g B                  [N, r]
    dL/dA = gu^T x                 [r, in]
    dL/dx = g W + gu A             [N, in]

No gradient is ever formed for the frozen W (or b). Under bf16 autocast, autograd through
``base(x) + B(A(x))`` runs four casts and six small ops per layer and saves, per layer, a
fresh bf16 cast of W, a bf16 cast of x, casts of A and B, and u. This function saves one cast
of x and u, and:
- the compute-dtype copy of a frozen W is made once and cached across steps (autocast recasts
  it in every forward and keeps each copy alive until backward, so peak memory is the same);
- layers that receive the very same input tensor (q/k/v, gate/up) share one cast of it, so
  q/k/v save one copy of x instead of three;
- the function runs only where gradients are recorded (training): inference takes the
  module's own path, op for op what PEFT runs.

Only the dropout-free, unquantised, plain-linear case takes this path (``fast_path_ok``);
everything else runs the module's own autograd path, whose results this equals.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary
from transformers.pytorch_utils import Conv1D

# frozen weight -> (version, data_ptr, dtype, [out, in] copy in the compute dtype)
_WEIGHT_CACHE = WeakIdKeyDictionary()
# the last input cast: (weakref to the input, its version, dtype, the cast copy)
_LAST_CAST: list = [None]


def _compute_dtype(x: torch.Tensor, param_dtype: torch.dtype) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return param_dtype


def _frozen_weight(layer: nn.Module, dtype: torch.dtype, cache: bool = True) -> torch.Tensor:
    """The base weight as [out, in] in ``dtype``; a cast copy is made once per weight version
    (``cache=False``: every call, e.g. under FSDP, where a persistent copy of every unsharded
    weight would undo the sharding)."""
    w = layer.weight
    lin = w.T if isinstance(layer, Conv1D) else w
    if lin.dtype == dtype:
        return lin
    if not cache:
        return lin.detach().to(dtype)
    hit = _WEIGHT_CACHE.get(w)
    if hit is not None and hit[0] == w._version and hit[1] == w.data_ptr() and hit[2] == dtype:
        return hit[3]
    cast = lin.detach().to(dtype).contiguous()
    _WEIGHT_CACHE[w] = (w._version, w.data_ptr(), dtype, cast)
    return cast


def _cast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in ``dtype``; consecutive layers fed the same tensor reuse one copy."""
    if x.dtype == dtype:
        return x
    last = _LAST_CAST[0]
    if last is not None and last[0]() is x and last[1] == x._version and last[2] == dtype:
        return last[3]
    xc = x.detach().to(dtype)
    _LAST_CAST[0] = (weakref.ref(x), x._version, dtype, xc)
    return xc


class _LoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, w, bias, scaling, cdt):
        # x [..., in] (any float dtype), a [r, in], b [out, r] trainable; w [out, in] frozen, cdt.
        xc = _cast_input(x, cdt)
        ac, bc = a.to(cdt), b.to(cdt)
        bias_c = bias.to(cdt) if bias is not None else None
        x2 = xc.reshape(-1, xc.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            # base, then s (A x) B^T accumulated into it by the GEMM itself: no [N, out] temporary
            # for the update and no separate scale and add passes over it (equal to the plain
            # path's ``base + B(A x) * s`` within one rounding of the sum)
            out = F.linear(x2, w, bias_c)
            u = F.linear(x2, ac)  # [N, r]
            out.addmm_(u, bc.t(), alpha=scaling)
        ctx.save_for_backward(xc, u, ac, bc, w)
        ctx.scaling = scaling
        ctx.x_dtype = x.dtype
        ctx.param_dtypes = (a.dtype, b.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, g):
        xc, u, ac, bc, w = ctx.saved_tensors
        s = ctx.scaling
        g2 = g.reshape(-1, g.shape[-1]).to(xc.dtype)
        x2 = xc.reshape(-1, xc.shape[-1])
        gx = ga = gb = None
        # The r-wide products are laid out so the long N dimension is the GEMM's streamed one:
        # g2 @ B as a linear over B^T's rows and g2^T u as (u^T g2)^T. On CPU (MKL fp32, 2 threads,
        # N=1200) that is 2.5x and 4-5x faster than the direct forms (1.3 -> 0.5 ms and 2.5 ->
        # 0.5 ms on a 1536-wide layer), the same sums.
        gu = F.linear(g2, bc.t().contiguous()).mul_(s)  # [N, r] = g2 @ B * s
        if ctx.needs_input_grad[2]:
            gb = (u.T @ g2).T.mul_(s).to(ctx.param_dtypes[1])  # [out, r]
        if ctx.needs_input_grad[1]:
            ga = (gu.T @ x2).to(ctx.param_dtypes[0])
        if ctx.needs_input_grad[0]:
            gx = (g2 @ w).addmm_(gu, ac).to(ctx.x_dtype).reshape(*xc.shape[:-1], xc.shape[-1])
        return gx, ga, gb, None, None, None, None


def fast_path_ok(layer: nn.Module, x: torch.Tensor) -> bool:
    """True when ``layer`` (a LoRALinear) may run ``lora_linear``: no dropout, a plain frozen
    nn.Linear/Conv1D base, plain factors, an input the layer's own path would accept."""
    if not getattr(layer, "fast_path", True):  # train.fast_lora=false sets this on every layer
        return False
    if not torch.is_grad_enabled():  # nothing to save for backward: the plain path is as lean
        return False
    base = layer.base_layer
    if type(base) not in (nn.Linear, Conv1D) or base._forward_hooks or base._forward_pre_hooks:
        return False
    if getattr(layer, "enable", None) is not None or getattr(layer, "sparsity_dropout", 0.0):
        return False
    drop = layer.lora_dropout
    if not (isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and (drop.p == 0 or not layer.training))):
        return False
    a, b = layer.lora_A, layer.lora_B
    if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
        return False
    w = base.weight
    if w.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False
    if not x.is_floating_point() or x.device != w.device:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return True
    # Without autocast the plain path computes the base in x's dtype and the update in the
    # factors' dtype; one dtype for everything keeps the two paths equal.
    return x.dtype == w.dtype == a.weight.dtype == b.weight.dtype


def lora_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer.base_layer(x) + s * lora_B(lora_A(x))`` through ``_LoRALinearFn`` (see above).

    x [..., in] -> [..., out] in the compute dtype (the autocast dtype, else the weights').
    Call only when ``fast_path_ok(layer, x)``.
    """
    a, b = layer.lora_A.weight, layer.lora_B.weight
    cdt = _compute_dtype(x, a.dtype)
    base = layer.base_layer
    w = _frozen_weight(base, cdt, getattr(layer, "cache_weight", True))
    return _LoRALinearFn.apply(x, a, b, w, base.bias, float(layer.scaling), cdt)
