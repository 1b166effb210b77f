"""A frozen linear layer whose weight lives quantised (NF4 or int8) and is dequantised on the fly.

    y = x W^T + b,     W = dequant(Q)   recomputed in forward and again in backward

The dequantised W is never kept: a custom autograd function saves nothing for backward (W is
frozen, so dL/dW is not needed, and dL/dx = dL/dy W needs only W, which is rebuilt from the
codes). Peak extra memory is one layer's weight in the compute dtype, transiently.

GPT-2's ``Conv1D`` (weight stored [in, out]) is quantised as the equivalent [out, in] linear;
``from_conv1d`` remembers the origin so a merge can give back a ``Conv1D``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import int8, nf4

KINDS = ("nf4", "int8")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _DequantLinear(torch.autograd.Function):
    """x [..., in] -> x W^T [..., out] with W rebuilt from the layer's codes (nothing saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        dtype = _compute_dtype(x)
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), layer.dequantize(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.layer.dequantize(ctx.dtype)
        return (grad.to(ctx.dtype) @ w).to(ctx.x_dtype), None


class QuantLinear(nn.Module):
    """A linear layer with a frozen quantised weight [out, in] and an optional frozen bias [out].

    ``kind`` is ``nf4`` (4-bit NormalFloat, blocks of 64, double-quantised scales) or ``int8``
    (row-wise absmax). ``dtype`` is the dtype the weight had before quantisation: what
    ``dequantize()`` returns by default and what a merge exports.
    """

    def __init__(self, kind: str, in_features: int, out_features: int, bias: torch.Tensor | None,
                 dtype: torch.dtype = torch.float32, from_conv1d: bool = False):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(kind)
        self.kind = kind
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.from_conv1d = from_conv1d
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_float(cls, layer: nn.Module, kind: str) -> QuantLinear:
        """Quantise an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
        from transformers.pytorch_utils import Conv1D

        conv = isinstance(layer, Conv1D)
        w = layer.weight.detach()
        w = w.T if conv else w
        q = cls(kind, w.shape[1], w.shape[0], layer.bias, layer.weight.dtype, conv)
        q.quantize_(w)
        return q

    @property
    def quantized_numel(self) -> int:
        """Weights this layer stands for (parameter counts report them as frozen)."""
        return self.in_features * self.out_features

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @torch.no_grad()
    def quantize_(self, w: torch.Tensor) -> None:
        """(Re)quantise from a float weight [out, in] (ReLoRA restarts and PiSSA residuals use this)."""
        assert tuple(w.shape) == (self.out_features, self.in_features)
        if self.kind == "nf4":
            t = nf4.quantize_nf4(w)
            self.register_buffer("qweight", t.packed)
            self.register_buffer("absmax_q", t.absmax_q)
            self.register_buffer("absmax2", t.absmax2)
            self.register_buffer("absmax_offset", t.offset)
        else:
            q, scale = int8.quantize_int8(w)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] this layer computes with, as a new tensor."""
        dtype = dtype or self.dtype
        if self.kind == "nf4":
            return nf4.dequantize_nf4(self.qweight, self.absmax_q, self.absmax2, self.absmax_offset,
                                      (self.out_features, self.in_features), dtype)
        return int8.dequantize_int8(self.qweight, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantLinear.apply(x, self)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def to_float(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A plain ``nn.Linear`` (or ``Conv1D``) holding the dequantised weight."""
        from transformers.pytorch_utils import Conv1D

        dtype = dtype or self.dtype
        w = self.dequantize(torch.float32)
        if self.from_conv1d:
            out = Conv1D(self.out_features, self.in_features)
            out.weight = nn.Parameter(w.T.contiguous().to(dtype), requires_grad=False)
            bias = self.bias if self.bias is not None else torch.zeros(self.out_features)
            out.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
            return out.to(self.device)
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.device, dtype=dtype)
        out.weight.requires_grad_(False)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias)
                out.bias.requires_grad_(False)
        return out

    def extra_repr(self) -> str:
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"
