"""Batch examples into padded tensors.

Unpacked rows (right padding): ``input_ids`` padded with the pad id, ``labels`` with -100,
``attention_mask`` [B, T] 1 on real tokens. The pad id is only filler; nothing reads it back.

Packed rows (``Example.seq_lens`` set, or ``packed=True``): ``position_ids`` [B, T] restart at
0 for every sequence, and ``attention_mask`` is a 4-D additive mask [B, 1, T, T] (float32:
0 where query t may attend key s — same sequence, s <= t — and the most negative float
elsewhere). Transformers hands a 4-D mask to eager and SDPA attention as it is, so every
sequence sees only itself: the loss equals the unpacked loss. Padding rows attend to nothing
(their softmax is uniform over equal -max values, never NaN) and carry no labels.

The label of each sequence's first token is set to -100: unpacked, nothing predicts it;
packed, the previous sequence's last token would.

Position ids alone do not isolate sequences: with a 2-D mask of ones they leak attention
across the row (tests/test_data_packing.py proves it).

``loss_weights`` [B, T] (float) is added when any example has per-token weights; ``sample_type``
([B], or [B, T] for packed rows) when the examples carry type labels (data/sample_types.py).
"""

from __future__ import annotations

import torch

from .sample_types import row_types
from .tokenize import IGNORE, Example

MASKED = torch.finfo(torch.float32).min


def block_causal_mask(seq_lens_per_row: list[tuple[int, ...]], width: int) -> torch.Tensor:
    """[B, 1, T, T] float32: 0 = may attend (same sequence, not in the future), MASKED elsewhere."""
    b = len(seq_lens_per_row)
    seq = torch.full((b, width), -1, dtype=torch.long)  # sequence index of each token, -1 = padding
    for i, lens in enumerate(seq_lens_per_row):
        seq[i, : sum(lens)] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens, dtype=torch.long))
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (seq[:, :, None] == seq[:, None, :]) & (seq[:, :, None] >= 0) & causal
    mask = torch.zeros(b, 1, width, width, dtype=torch.float32)
    return mask.masked_fill_(~allowed[:, None], MASKED)


def position_ids_for(seq_lens_per_row: list[tuple[int, ...]], width: int) -> torch.Tensor:
    """[B, T]: 0, 1, ... restarting at every sequence (padding counts on from 0 too)."""
    out = torch.zeros(len(seq_lens_per_row), width, dtype=torch.long)
    for i, lens in enumerate(seq_lens_per_row):
        pos = [p for n in lens for p in range(n)]
        pad = width - len(pos)
        out[i] = torch.tensor(pos + list(range(pad)), dtype=torch.long)
    return out


def collate(examples: list[Example], pad_id: int, pad_to_multiple_of: int = 1,
            packed: bool | None = None) -> dict[str, torch.Tensor]:
    """[Example] -> {input_ids, attention_mask, labels[, position_ids, loss_weights]}: shape [B, T]
    (attention_mask [B, 1, T, T] for packed rows)."""
    longest = max(len(e) for e in examples)
    if pad_to_multiple_of > 1:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    b = len(examples)
    input_ids = torch.full((b, longest), pad_id, dtype=torch.long)
    labels = torch.full((b, longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((b, longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if packed is None:
        packed = any(len(e.seq_lens) > 1 for e in examples)
    if packed:
        lens = [e.seq_lens or (len(e),) for e in examples]
        batch["attention_mask"] = block_causal_mask(lens, longest)
        batch["position_ids"] = position_ids_for(lens, longest)
        # The first token of a sequence is never a target (nothing comes before it); in a row
        # it would be the target of the previous sequence's last token.
        labels[batch["position_ids"] == 0] = IGNORE
    types = row_types(examples, longest, packed)
    if types is not None:
        batch["sample_type"] = types
    if any(e.weights is not None for e in examples):
        weights = torch.zeros((b, longest), dtype=torch.float32)
        for i, e in enumerate(examples):
            weights[i, : len(e)] = torch.tensor(e.weights if e.weights is not None else [1.0] * len(e))
        batch["loss_weights"] = weights
    return batch
