"""4-bit NormalFloat (NF4) with double quantisation, in plain PyTorch (runs on CPU).

Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023), arXiv:2305.14314.

    block b of 64 weights:   c_b = max |w| over the block              (absmax, the block scale)
                             q_i = argmin_k | w_i / c_b - NF4[k] |     (a 4-bit code, k in 0..15)
                             w_i ~ NF4[q_i] * c_b
    double quantisation:     c_b - mean(c)  quantised to 8 bits with the signed dynamic map,
                             in blocks of 256 scales, each block with its own fp32 absmax

NF4 is information-theoretically optimal for normally distributed weights: its 16 values are
quantiles of N(0, 1), an asymmetric set (8 positive, 7 negative, an exact zero) normalised to
[-1, 1]. Storage per weight: 4 bits + 8/64 (code of the scale) + 32/(64*256) (second-level
scale) = 4.127 bits, against 16 for bf16 — the figure in the paper.

The codes are packed two to a byte (first weight in the high nibble, as bitsandbytes does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 64  # weights per first-level block
DQ_BLOCK = 256  # scales per second-level block
_NF4_OFFSET = 0.9677083  # QLoRA's choice: the outermost quantile, (1 - 1/(2*15) + 1 - 1/(2*16)) / 2


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values, built as in the paper from quantiles of the standard normal.

    8 positive quantiles ``Phi^-1(linspace(offset, 0.5, 9)[:-1])`` and 7 negative ones
    ``-Phi^-1(linspace(offset, 0.5, 8)[:-1])``, plus an exact 0, normalised by the largest.
    """
    pos = torch.special.ndtri(torch.linspace(_NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(_NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (values / values.max()).float()


def dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic (tree) map of Dettmers (2015), used for the block scales.

    For exponent e = 0..6 it holds 2^e evenly spread fractions in [0.1, 1] scaled by
    10^(e-6), with both signs; plus 0 and 1: 256 sorted values in [-1, 1] that are dense near 0.
    """
    data: list[float] = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1.0, 2**e + 1)
        means = ((bounds[:-1] + bounds[1:]) / 2.0) * (10.0 ** (e - 6))
        data += means.tolist() + (-means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


NF4 = nf4_code()
DYNAMIC = dynamic_code()


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted ``code`` for every element of ``x`` (uint8)."""
    mids = (code[1:] + code[:-1]) / 2
    return torch.bucketize(x, mids.to(x.device)).to(torch.uint8)


@dataclass
class NF4Tensor:
    """A quantised weight: the tensors a module keeps as buffers, plus its shape."""

    packed: torch.Tensor  # uint8 [n/2]: two 4-bit codes per byte
    absmax_q: torch.Tensor  # uint8 [n/64] (double quant) or fp32 [n/64]
    absmax2: torch.Tensor  # fp32 [ceil(n/64/256)] (double quant) or empty
    offset: torch.Tensor  # fp32 [] mean of the first-level scales (double quant) or 0
    shape: tuple[int, ...]


def quantize_nf4(w: torch.Tensor, double_quant: bool = True) -> NF4Tensor:
    """Any-shaped float tensor -> NF4Tensor (blocks of 64; scales double-quantised in 256s)."""
    flat = w.detach().float().reshape(-1)
    n = flat.numel()
    pad = (-n) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = _nearest(blocks / safe[:, None], NF4).view(-1)
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Tensor(packed, absmax, absmax.new_zeros(0), absmax.new_zeros(()), tuple(w.shape))
    offset = absmax.mean()
    centred = absmax - offset
    pad2 = (-centred.numel()) % DQ_BLOCK
    if pad2:
        centred = torch.cat([centred, centred.new_zeros(pad2)])
    blocks2 = centred.view(-1, DQ_BLOCK)
    absmax2 = blocks2.abs().amax(dim=1)
    safe2 = torch.where(absmax2 > 0, absmax2, torch.ones_like(absmax2))
    codes2 = _nearest(blocks2 / safe2[:, None], DYNAMIC).view(-1)[: absmax.numel()]
    return NF4Tensor(packed, codes2, absmax2, offset, tuple(w.shape))


def dequantize_scales(absmax_q: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """First-level block scales [n/64] in fp32 (undoing the double quantisation)."""
    if absmax_q.dtype != torch.uint8:
        return absmax_q.float()
    nb = absmax_q.numel()
    values = DYNAMIC.to(absmax_q.device)[absmax_q.long()]
    pad = (-nb) % DQ_BLOCK
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    return (values.view(-1, DQ_BLOCK) * absmax2[:, None]).view(-1)[:nb] + offset


_PAIRS: dict[torch.device, torch.Tensor] = {}


def _byte_table(device: torch.device) -> torch.Tensor:
    """[256, 2] fp32: the two NF4 values every packed byte stands for (built once per device)."""
    if device not in _PAIRS:
        b = torch.arange(256)
        _PAIRS[device] = torch.stack([NF4[b >> 4], NF4[b & 15]], dim=1).to(device)
    return _PAIRS[device]


def dequantize_nf4(packed: torch.Tensor, absmax_q: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
                   shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float tensor of ``shape`` an NF4 weight stands for (a new tensor, in ``dtype``)."""
    n = 1
    for s in shape:
        n *= s
    scales = dequantize_scales(absmax_q, absmax2, offset)
    values = _byte_table(packed.device)[packed.long()].view(-1, BLOCK)  # [n_blocks, 64]
    out = values * scales[:, None]
    return out.view(-1)[:n].view(shape).to(dtype)


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes an NF4 weight of ``numel`` elements occupies (codes + scales), for memory estimates."""
    blocks = -(-numel // BLOCK)
    if not double_quant:
        return blocks * BLOCK // 2 + 4 * blocks
    return blocks * BLOCK // 2 + blocks + 4 * -(-blocks // DQ_BLOCK) + 4
