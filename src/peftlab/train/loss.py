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
from .fused_loss import fused_head_loss
from .unpad import unpadded_hidden, worth_unpadding


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss (after the causal shift)."""
    return int((labels[..., 1:] != IGNORE).sum())


def count_input_tokens(batch: dict) -> int:
    """Real (non-padding) tokens: the 2-D mask's sum; for packed rows' 4-D additive mask
    [B, 1, T, T], the tokens that may attend to themselves (padding attends to nothing)."""
    mask = batch["attention_mask"]
    if mask.dim() == 4:
        return int((mask[:, 0].diagonal(dim1=-2, dim2=-1) == 0).sum())
    return int(mask.sum())


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


def uses_varlen(model: nn.Module) -> bool:
    """Attention kernels that take no dense 4-D mask: packed rows go by position ids instead."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    return impl.startswith("flash") or impl == "flex_attention"


def backbone_hidden(model: nn.Module, batch: dict, varlen: bool | None = None) -> torch.Tensor:
    """Last hidden states [B, T, d] from the model's backbone (no LM head).

    Packed rows (a 4-D ``attention_mask`` and per-sequence ``position_ids``) go to eager and
    SDPA attention with the block-diagonal mask as it is. With ``varlen`` (default: for
    flash-attention and flex kernels) the rows are flattened into one [1, B*T] row without a
    mask; transformers then finds the sequences where the position ids restart at 0 and
    attends within each (flash ``cu_seqlens``; a block mask otherwise).
    """
    backbone = model.base_model
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "inputs_embeds") if k in batch}
    mask = kwargs.get("attention_mask")
    packed = mask is not None and mask.dim() == 4 and "position_ids" in kwargs
    if packed and (uses_varlen(model) if varlen is None else varlen):
        shape = kwargs["position_ids"].shape
        kwargs = {k: v.reshape(1, shape[0] * shape[1], *v.shape[2:]) for k, v in kwargs.items()
                  if k != "attention_mask"}
        out = backbone(**kwargs, use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return hidden.reshape(*shape, -1)
    if packed and mask.is_floating_point():
        kwargs["attention_mask"] = additive_mask_in(mask, compute_dtype(model, mask.device))
    out = backbone(**kwargs, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def compute_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype attention runs in: autocast's if on, else the embedding weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.get_input_embeddings().weight.dtype


def additive_mask_in(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 0 / most-negative additive mask re-expressed in ``dtype`` (SDPA wants the query's dtype;
    float32's minimum would overflow to -inf in float16)."""
    if mask.dtype == dtype:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask < 0, torch.finfo(dtype).min)


def right_padded(mask: torch.Tensor | None) -> bool:
    """True for a 2-D mask whose rows are ones then zeros (right padding, or none at all)."""
    return mask is not None and mask.dim() == 2 and bool((mask[:, 1:] <= mask[:, :-1]).all())


def causal_lm_loss(model: nn.Module, batch: dict, chunk_rows: int = 1024,
                   fused: bool = True, skip_pad_mask: bool = True, unpad: bool = False) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of label tokens) for one micro-batch.

    batch: input_ids [B, T], attention_mask [B, T] (or a 4-D additive mask for packing),
    labels [B, T] aligned with input_ids (-100 = not learned), optional position_ids [B, T],
    optional loss_weights [B, T] (each token's loss is scaled by its weight; the count stays
    the number of label tokens).
    ``fused`` (a plain linear head): ``fused_loss.chunked_linear_cross_entropy``, which never
    keeps a chunk's vocabulary-sized logits for backward; otherwise chunks of plain autograd.
    ``skip_pad_mask``: a right-padded batch goes in without its mask. Causal attention alone
    keeps every real token from seeing the padding after it (padding rows carry no labels),
    so the loss is the same, and attention takes SDPA's causal kernel instead of a dense mask.
    ``unpad`` (``train.unpad``, where ``unpad.unpad_blocker`` allows it): a right-padded batch runs
    its real tokens only, as one flattened row (``train/unpad.py``); the same loss, no work on pads.
    """
    labels = batch["labels"]
    mask = batch.get("attention_mask")
    if unpad and "position_ids" not in batch and "inputs_embeds" not in batch and worth_unpadding(mask):
        hidden = unpadded_hidden(model.base_model, model, batch["input_ids"], mask)
    else:
        if skip_pad_mask and "position_ids" not in batch and right_padded(mask):
            batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        hidden = backbone_hidden(model, batch)
    targets = labels[:, 1:]
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]  # [N, d]
    y = targets[keep]  # [N]
    weights = batch.get("loss_weights")
    w = weights[:, 1:][keep].float() if weights is not None else None  # [N]
    n = int(y.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    if fused:  # speed: chunked head + CE whose backward needs no stored logits
        total = fused_head_loss(model, h, y, w, chunk_rows)
        if total is not None:
            return total, n
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_rows):
        logits = _head_logits(model, h[start:start + chunk_rows])
        if w is None:
            total = total + F.cross_entropy(logits.float(), y[start:start + chunk_rows], reduction="sum")
        else:
            losses = F.cross_entropy(logits.float(), y[start:start + chunk_rows], reduction="none")
            total = total + (losses * w[start:start + chunk_rows]).sum()
    return total, n
