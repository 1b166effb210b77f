"""8-bit absmax quantisation, one scale per output row.

Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale" (2022),
arXiv:2208.07339 — the vector-wise absmax part (without the fp16 outlier decomposition):

    s_o = max_i |W[o, i]| / 127,      Q[o, i] = round(W[o, i] / s_o)  in [-127, 127],
    W[o, i] ~ Q[o, i] * s_o

8 bits per weight plus one fp32 scale per row; the rounding error is at most s_o / 2.
"""

from __future__ import annotations

import torch


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], fp32 scale [out])."""
    w = w.detach().float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(int8 [out, in], fp32 [out]) -> [out, in] in ``dtype``."""
    return (q.float() * scale[:, None]).to(dtype)
