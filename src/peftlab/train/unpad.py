"""Padding-free training on padded batches (``train.unpad``): no linear layer sees a pad token.

A right-padded SFT batch of B rows of width T holds N <= B*T real tokens; on short chat rows a
third of the batch is padding (builtin:tasks at batch 16: 799 real tokens of 1,184). Every
linear layer, norm and activation of a padded forward and backward spends that third on rows
whose results are thrown away. Here the real tokens run as one row [1, N]:

    ids      = input_ids[rows]                  rows = attention_mask.bool()  [B, T]
    position = (cumsum(rows, 1) - 1)[rows]      each sequence's own positions 0..L_b-1
    attention per layer, one of two ways (the cheaper by ``per_sequence``'s count):
      per sequence:  SDPA's causal kernel on each sequence's own slice q, k, v [1, H, L_b, D],
                     outputs concatenated: sum(L_b^2) query-key pairs, not B*T^2
      padded:        q, k, v scattered back to [B, H, T, D] (zeros in the padding), the very
                     SDPA causal call the padded batch makes, the real rows gathered again;
                     many short rows are cheaper as one call than as B small ones
    hidden   = scattered back to [B, T, d] for the label selection that follows

Attention is the only layer that mixes tokens, and either way each real query sees exactly
the real keys at and before it in its own sequence, as in the padded batch; everything else is
per token. So the loss and every gradient equal the padded batch's, up to the rounding of GEMMs
with fewer rows (tests/test_unpad.py: every allowed method, Llama and Qwen2 shapes, loss and
gradients, both attention ways). On alpaca rows (batch 4, 60-400 tokens) the per-sequence way
cuts attention's forward + backward 1.7-2.4x. The same examples make each step: unlike
``data.packing`` nothing about the optimisation changes.

Where it runs (``unpad_blocker`` says why not, and the loop then keeps padded batches;
``per_token_blocker`` is the part GRPO's shared-prompt forward asks too):
- SDPA attention (the loader's default) on an architecture whose attention goes through
  transformers' attention interface and whose mask is plain causal (``ARCHITECTURES``; no
  sliding window shorter than the batch);
- a method in ``METHODS``: per-token modules only. Prompt and prefix methods change the
  attention's keys and masks, the mixtures' routers keep per-batch statistics shaped like the
  padded batch, LongLoRA has its own attention, LoRA-drop samples importance from the padded
  activations: those keep padded batches;
- no gradient checkpointing (its recomputation would run after the attention switch ends)
  and no ``train.compile``.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch import nn

ATTN = "peftlab_unpad"
ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "olmo2", "phi3"})
METHODS = frozenset({
    "full", "lora", "dora", "vera", "adalora", "relora", "delta_lora", "chain_lora", "periodic_lora",
    "loha", "lokr", "krona", "oft", "boft", "hra", "fourierft", "vblora", "ia3", "bitfit",
    "ln_tuning", "lisa", "adapter", "compacter", "trainable_tokens",
})
_STATE = threading.local()  # .rows: the [B, T] real-token mask of the forward in progress; .lengths; .calls
CALL_PAIRS = 1024  # a per-sequence SDPA call's fixed cost in query-key pairs (fp32, AVX2; tests set 0 / huge)


def per_sequence(lengths: list[int]) -> bool:
    """True when B calls over each sequence's own length cost less than one call on the padded
    [B, T] layout: sum(L^2) + B * CALL_PAIRS < B * T^2 (measured: B=4 alpaca rows gain 1.7-2.4x
    in attention, 64 rows of 10-40 tokens lose 0.6x)."""
    b, t = len(lengths), max(lengths)
    return sum(n * n for n in lengths) + b * CALL_PAIRS < b * t * t


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers attention-interface function for the flattened row (see the module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows = getattr(_STATE, "rows", None)
    if rows is None:
        raise RuntimeError(f"attention {ATTN!r} ran outside an unpadded forward (train/unpad.py)")
    _STATE.calls += 1
    lengths = _STATE.lengths
    if _STATE.per_sequence:
        outs, start = [], 0
        for n in lengths:
            part = slice(start, start + n)
            out, _ = sdpa_attention_forward(module, query[:, :, part], key[:, :, part], value[:, :, part], None,
                                            dropout=dropout, scaling=scaling, is_causal=True)
            outs.append(out)  # [1, L_b, H, D]
            start += n
        return torch.cat(outs, 1), None
    b, t = rows.shape

    def padded(x: torch.Tensor) -> torch.Tensor:  # [1, H, N, D] -> [B, H, T, D]
        out = x.new_zeros(b, t, x.shape[1], x.shape[3])
        out[rows] = x[0].transpose(0, 1)
        return out.transpose(1, 2)

    out, _ = sdpa_attention_forward(module, padded(query), padded(key), padded(value), None,
                                    dropout=dropout, scaling=scaling, is_causal=True)
    return out[rows].unsqueeze(0), None  # [B, T, H, D] -> [1, N, H, D]


def _register() -> None:
    from transformers import AttentionInterface

    if ATTN not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN, _attention)


def per_token_blocker(model: nn.Module, method: str, gradient_checkpointing: bool = False, *,
                      attention: tuple[str, ...] = ("sdpa",), compiled: bool = False) -> str | None:
    """None when every position of ``model`` trained with ``method`` depends only on its own input
    and on plain causal attention over the real tokens before it, run by one of the ``attention``
    kernels and not compiled (the question unpadding and GRPO's shared prompts both ask, each with
    its kernels: train/grpo_share.py), else the reason."""
    cfg = model.config
    if cfg.model_type not in ARCHITECTURES:
        return (f"architecture {cfg.model_type!r} is not one whose attention is verified to be plain causal "
                "(train/unpad.py ARCHITECTURES)")
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return "a sliding-window attention mask"
    if method not in METHODS:
        return f"method {method!r} is not a per-token method"
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers 5's name
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if gradient_checkpointing or checkpointing:
        return "gradient checkpointing"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in attention:
        return f"attention {impl!r} (verified here: {', '.join(attention)})"
    if compiled:
        return "train.compile"
    return None


def unpad_blocker(model: nn.Module, method: str, gradient_checkpointing: bool = False,
                  compiled: bool = False) -> str | None:
    """None when ``model`` trained with ``method`` may run unpadded batches (SDPA only), else the reason."""
    return per_token_blocker(model, method, gradient_checkpointing, attention=("sdpa",), compiled=compiled)


def worth_unpadding(mask: torch.Tensor | None) -> bool:
    """A right-padded 2-D mask with at least one pad position (nothing to win otherwise)."""
    if mask is None or mask.dim() != 2 or mask.shape[0] < 2:
        return False
    return bool((mask[:, 1:] <= mask[:, :-1]).all()) and not bool(mask.all())


@contextmanager
def _unpadded(model: nn.Module, rows: torch.Tensor):
    _register()
    cfg = model.config
    saved = cfg._attn_implementation_internal
    cfg._attn_implementation_internal = ATTN
    lengths = rows.sum(1).tolist()
    _STATE.rows, _STATE.lengths, _STATE.calls = rows, lengths, 0
    _STATE.per_sequence = per_sequence(lengths)
    try:
        yield
    finally:
        cfg._attn_implementation_internal = saved
        _STATE.rows = None


def unpadded_hidden(backbone: nn.Module, model: nn.Module, input_ids: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """The backbone's last hidden states [B, T, d] for a right-padded batch, computed on its real
    tokens only (zeros at the padding, which carries no label)."""
    rows = mask.bool()
    positions = (rows.long().cumsum(1) - 1)[rows].unsqueeze(0)
    with _unpadded(model, rows):
        out = backbone(input_ids=input_ids[rows].unsqueeze(0), position_ids=positions, use_cache=False)
        calls = _STATE.calls
    flat = out[0] if isinstance(out, tuple) else out.last_hidden_state
    layers = getattr(model.config, "num_hidden_layers", None)
    if layers is not None and calls != layers:
        raise RuntimeError(f"unpadded forward: {calls} attention calls for {layers} layers; this "
                           f"architecture ({model.config.model_type}) does not route attention through "
                           "transformers' interface. Set train.unpad=false")
    hidden = flat.new_zeros(*rows.shape, flat.shape[-1])
    hidden[rows] = flat[0]
    return hidden
