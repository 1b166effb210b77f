"""The causal-LM loss, computed only where there is something to learn.

    loss_sum = sum over positions t with label[t+1] != -100 of  -log p(label[t+1] | tokens <= t)

The backbone runs once; the LM head and cross-entropy run only on the label-bearing
positions (prompt and padding rows never become vocabulary-sized logits). Returns the *sum*
and the token count so the loop can normalise over every micro-batch of an optimiser step
(gradient accumulation then equals one big batch exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokenize import IGNORE


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss (after the causal shift)."""
    return int((labels[..., 1:] != IGNORE).sum())


def _head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden)
    cfg = model.config
    # Architectures that post-process logits in their forward (Cohere, Granite, Gemma 2/3).
    scale = getattr(cfg, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    scaling = getattr(cfg, "logits_scaling", None)
    if scaling is not None:
        logits = logits / scaling
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def backbone_hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    """Last hidden states [B, T, d] from the model's backbone (no LM head)."""
    backbone = model.base_model
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "inputs_embeds") if k in batch}
    out = backbone(**kwargs, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def causal_lm_loss(model: nn.Module, batch: dict, chunk_rows: int = 4096) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of label tokens) for one micro-batch.

    batch: input_ids [B, T], attention_mask [B, T] (or a 4-D additive mask for packing),
    labels [B, T] aligned with input_ids (-100 = not learned), optional position_ids [B, T].
    """
    labels = batch["labels"]
    hidden = backbone_hidden(model, batch)
    targets = labels[:, 1:]
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]  # [N, d]
    y = targets[keep]  # [N]
    n = int(y.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_rows):
        logits = _head_logits(model, h[start:start + chunk_rows])
        total = total + F.cross_entropy(logits.float(), y[start:start + chunk_rows], reduction="sum")
    return total, n
