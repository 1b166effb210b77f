"""Log-probabilities of answers: the quantity every preference loss is built from.

    logp(row) = sum over the row's label tokens t of log p(token_t | tokens before t)

One backbone forward per batch; the LM head runs only on label positions. With gradients the
head goes through ``fused_head_loss`` row by row (no vocabulary-sized logits kept for
backward); without (the reference, evaluation) it runs in chunks of at most ``PLAIN_ROWS`` rows,
so the transient logits stay small (256 x 49,152 fp32 is 50 MB; 1,024 rows and their log-softmax
would hold 400 MB at the peak of every reference pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokenize import IGNORE
from .fused_loss import fused_head_loss
from .loss import _head_logits, backbone_hidden, right_padded

PLAIN_ROWS = 256  # label rows per LM-head chunk on the no-gradient path


def hidden_states(model: nn.Module, batch: dict, skip_pad_mask: bool = True) -> torch.Tensor:
    """[R, T, d] last hidden states of the rows (right padding: causal attention needs no mask)."""
    rows = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    if skip_pad_mask and right_padded(rows.get("attention_mask")):
        rows.pop("attention_mask")
    return backbone_hidden(model, rows)


def label_logps(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 1024,
                fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) over each row's label tokens [R] fp32, label tokens per row [R]).

    With gradients and a plain linear head, each row goes through ``fused_head_loss`` (no
    vocabulary-sized logits kept for backward); otherwise the head runs in chunks of rows."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    counts = keep.sum(1)
    h, y = hidden[:, :-1][keep], targets[keep]  # [N, d], [N]
    if fused and torch.is_grad_enabled():
        parts = []
        for h_row, y_row in zip(h.split(counts.tolist()), y.split(counts.tolist())):
            loss = fused_head_loss(model, h_row, y_row, None, chunk) if len(y_row) else None
            if loss is None and len(y_row):
                break
            parts.append(-loss if loss is not None else h.new_zeros((), dtype=torch.float32))
        else:
            return torch.stack(parts), counts
    token, rows_per = [], min(chunk, PLAIN_ROWS)
    for start in range(0, len(y), rows_per):
        logits = _head_logits(model, h[start:start + rows_per]).float()
        token.append(-F.cross_entropy(logits, y[start:start + rows_per], reduction="none"))
        del logits
    rows = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    flat = torch.cat(token) if token else hidden.new_zeros(0, dtype=torch.float32)
    return torch.zeros(len(counts), device=hidden.device, dtype=torch.float32).index_add(0, rows, flat), counts


def row_logps(model: nn.Module, batch: dict, chunk: int = 1024, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each row's labelled answer [R], its token count [R]) in one forward."""
    return label_logps(model, hidden_states(model, batch), batch["labels"], chunk, fused)
