"""Batch examples into padded tensors.

Right padding for training: ``input_ids`` padded with the pad id, ``labels`` with -100,
``attention_mask`` 1 on real tokens. The pad id is only filler; nothing reads it back.
"""

from __future__ import annotations

import torch

from .tokenize import IGNORE, Example


def collate(examples: list[Example], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """[Example] -> {input_ids, attention_mask, labels}: LongTensors of shape [B, T]."""
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
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
