"""The virtual-token backbone that prompt tuning, P-tuning, prefix tuning, P-tuning v2 and MAM share.

``VirtualTokenBackbone`` replaces the model's backbone (``model.model`` for Llama,
``model.transformer`` for GPT-2 — ``model.base_model_prefix``) with a wrapper that keeps the
original as ``self.base`` and, on the first call of a sequence (no cache yet), prepends n virtual
embeddings [B, n, d] or fills the KV cache with per-layer prefixes. Later cached decoding steps
only extend the mask and shift the positions, so ``model.generate`` works with the KV cache and
with batched, left-padded prompts.

The virtual tokens sit at positions 0..n-1 and the real tokens at n + (their index among the real
tokens), so a left-padded row sees exactly what the unpadded sequence sees. Attention-mask columns
for the virtual tokens are 1; in a packed row (4-D block mask, positions restarting per sequence)
every packed sequence attends to the virtual tokens and sees itself at n + i, exactly as unpacked.
Labels need no change because the wrapper strips the n virtual positions from its hidden states
(the loss and the LM head see the original positions).

The method's tensors live once, at ``model.prompt_encoder``, so their names do not depend on the
architecture; the file layout is PEFT's (``prompt_embeddings`` [n, d] for the folded tokens).
This module also holds what the family's configs and adapter files share: the init choices
(``random`` / ``vocab`` / ``text``), the key translation and the common adapter_config.json fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..model.kv_cache import cache_arg, drop_output_cache
from ..registry import add_peft_prefix, strip_peft_prefix

ENCODER_KEY = "prompt_encoder"  # the top-level module holding the method's tensors
FILE_KEY = "prompt_embeddings"  # PEFT's name for the (folded) virtual tokens in the adapter file
INITS = ("random", "vocab", "text")


def _compute_dtype(device: torch.device, fallback: torch.dtype) -> torch.dtype:
    """The dtype the attention will compute in (autocast's, when it is on)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return fallback


def _is_packed(position_ids: torch.Tensor) -> bool:
    """Several sequences in one row: positions restart somewhere after the first token."""
    return bool((torch.diff(position_ids, dim=-1) != 1).any())


class VirtualTokenBackbone(nn.Module):
    """A model's backbone with n virtual tokens in front of every sequence.

    ``prompts(batch_size) -> [B, n, d]`` gives virtual input embeddings (prompt tuning, P-tuning);
    ``prefix(batch_size, dtype) -> [(k, v)] * L``, each [B, H_kv, n, head_dim], gives per-layer
    key/value prefixes written into the KV cache (prefix tuning, P-tuning v2). Both are plain
    callables, not submodules: the parameters are registered once at ``model.prompt_encoder``.

    Inputs are the backbone's own (input_ids [B, T] or inputs_embeds [B, T, d], a 2-D
    attention_mask over the *real* tokens, optional position_ids counting real tokens, an optional
    cache). The returned hidden states are aligned with the real inputs ([B, T, d]).
    """

    def __init__(self, base: nn.Module, num_virtual_tokens: int):
        super().__init__()
        self.base = base
        self.num_virtual_tokens = num_virtual_tokens
        self.prompts: Callable[[int], torch.Tensor] | None = None
        self.prefix: Callable[[int, torch.dtype], list] | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)  # layers, config, embed_tokens, ... of the wrapped backbone

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache=None, **kwargs):
        n = self.num_virtual_tokens
        past_key_values = cache if cache is not None else past_key_values  # transformers >= 5.25: ``cache``
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("give input_ids or inputs_embeds")
        batch, q_len, device = ref.shape[0], ref.shape[1], ref.device
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        fresh = past_len == 0  # the first call of a sequence: the virtual tokens go in now
        self._check_call(attention_mask, position_ids, fresh, q_len)
        cache = past_key_values
        if self.prefix is not None and fresh:
            cache = self._fill_prefix(cache, batch, device)
            past_len = n
        new = n if (self.prompts is not None and fresh) else 0  # virtual positions this call adds
        kv_len = past_len + new + q_len
        attention_mask = _mask_with_virtual(attention_mask, n, new, kv_len, batch)
        position_ids = _positions(position_ids, attention_mask, n, new, past_len, kv_len, batch, device)
        if new:
            embeds = inputs_embeds if inputs_embeds is not None else self.base.get_input_embeddings()(input_ids)
            virtual = self.prompts(batch).to(device=embeds.device, dtype=embeds.dtype)
            inputs_embeds, input_ids = torch.cat([virtual, embeds], dim=1), None
        if "cache_position" in kwargs:  # older model code: positions in the cache, virtual tokens included
            kwargs["cache_position"] = torch.arange(past_len, kv_len, device=device)
        out = self.base(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        position_ids=position_ids, use_cache=use_cache, **{cache_arg(self.base): cache}, **kwargs)
        wants_cache = use_cache if use_cache is not None else getattr(self.base.config, "use_cache", False)
        if past_key_values is None and not wants_cache and not isinstance(out, tuple):
            drop_output_cache(out)  # the prefix cache was only a vehicle for this forward
        if new:
            if isinstance(out, tuple):
                return (out[0][:, n:], *out[1:])
            out.last_hidden_state = out.last_hidden_state[:, n:]
            if getattr(out, "hidden_states", None) is not None:
                out.hidden_states = tuple(h[:, n:] for h in out.hidden_states)
        return out

    def _check_call(self, attention_mask, position_ids, fresh: bool, q_len: int) -> None:
        """Clear errors for what the virtual tokens cannot support."""
        if attention_mask is not None and attention_mask.dim() == 4 and not fresh:
            raise ConfigError("a 4-D attention mask with a KV cache is not supported by prompt and prefix methods")
        if fresh and position_ids is not None and attention_mask is None and q_len > 1 and _is_packed(position_ids):
            raise ConfigError(
                "prompt and prefix methods need the block mask of packed rows to give every packed sequence "
                "the virtual tokens; the mask-free (flash/varlen) path cannot: use attn_implementation=sdpa "
                "or eager, or data.packing=false"
            )
        if self.prefix is not None and self.training and any(
                getattr(m, "gradient_checkpointing", False) for m in self.base.modules()):
            raise ConfigError(
                "prefix methods (prefix_tuning, p_tuning_v2, mam) put their prefixes in the KV cache, which "
                "gradient checkpointing drops inside every layer; set model.gradient_checkpointing=false"
            )

    def _fill_prefix(self, cache, batch: int, device: torch.device):
        """The KV cache (a new ``DynamicCache`` when there is none) holding every layer's prefix."""
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.base.config)
        param_dtype = next(self.base.parameters()).dtype
        for layer, (k, v) in enumerate(self.prefix(batch, _compute_dtype(device, param_dtype))):
            cache.update(k, v, layer)
        return cache


def _mask_with_virtual(mask: torch.Tensor | None, n: int, new: int, kv_len: int, batch: int) -> torch.Tensor | None:
    """The attention mask with columns for the n virtual tokens: a packed row's 4-D block mask, or a
    2-D mask [B, real tokens] given ones in front (a mask that already counts them is kept)."""
    if mask is None:
        return None
    if mask.dim() == 4:
        return _block_mask_with_virtual(mask, n, bool(new))
    if mask.shape[1] == kv_len - n:  # the caller's mask counts real tokens only
        return torch.cat([mask.new_ones(batch, n), mask], dim=1)
    if mask.shape[1] != kv_len:
        raise ValueError(f"attention_mask has {mask.shape[1]} columns; expected "
                         f"{kv_len - n} (real tokens) or {kv_len} (with the virtual tokens)")
    return mask


def _positions(position_ids, mask, n: int, new: int, past_len: int, kv_len: int, batch: int,
               device: torch.device) -> torch.Tensor:
    """Positions of this call's inputs [B, new + T]: real tokens at n + i, virtual ones at 0..n-1."""
    if position_ids is not None:  # counted over real tokens by the caller: shift past the virtual ones
        position_ids = position_ids.expand(batch, -1) + n
        if new:
            virtual = torch.arange(n, device=device, dtype=position_ids.dtype).expand(batch, n)
            position_ids = torch.cat([virtual, position_ids], dim=1)
        return position_ids
    if mask is not None:  # a token's position = how many unmasked tokens precede it
        return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -(kv_len - past_len):]
    return torch.arange(past_len, kv_len, device=device).unsqueeze(0)


def _block_mask_with_virtual(mask: torch.Tensor, n: int, as_inputs: bool) -> torch.Tensor:
    """A packed row's 4-D mask [B, 1, T, T] (additive float or boolean) with the n virtual tokens in
    front: every real token attends to them; as inputs (prompt tuning) they attend causally among
    themselves and to nothing after -> [B, 1, n+T, n+T]; as a KV prefix -> [B, 1, T, n+T]."""
    b, h, t, _ = mask.shape
    if mask.dtype == torch.bool:
        allow, block = True, False
    else:
        allow, block = 0.0, torch.finfo(mask.dtype).min
    real = torch.cat([mask.new_full((b, h, t, n), allow), mask], dim=-1)  # [B, 1, T, n+T]
    if not as_inputs:
        return real
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    top = mask.new_full((b, h, n, n + t), block)
    top[..., :n] = torch.where(causal, torch.as_tensor(allow, dtype=mask.dtype, device=mask.device),
                               torch.as_tensor(block, dtype=mask.dtype, device=mask.device))
    return torch.cat([top, real], dim=-2)


def attach_virtual_tokens(model: nn.Module, encoder: nn.Module, n: int, *, prompts=None, prefix=None) -> None:
    """Register ``encoder`` at ``model.prompt_encoder`` and wrap the backbone (in place)."""
    name = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, name, None) if name else None
    if backbone is None or backbone is model:
        raise ConfigError(
            f"{type(model).__name__} has no separate backbone module (base_model_prefix={name!r}); "
            "prompt and prefix methods need a Hugging Face *ForCausalLM model"
        )
    if isinstance(backbone, VirtualTokenBackbone) or hasattr(model, ENCODER_KEY):
        raise ConfigError("this model already has virtual tokens; apply one prompt or prefix method only")
    wrapper = VirtualTokenBackbone(backbone, n)
    wrapper.prompts, wrapper.prefix = prompts, prefix
    setattr(model, ENCODER_KEY, encoder)
    setattr(model, name, wrapper)


def model_dims(model: nn.Module) -> dict:
    """hidden size d, layers L, attention heads H, key/value heads H_kv and head_dim of the model."""
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"d": cfg.hidden_size, "L": cfg.num_hidden_layers, "H": heads, "H_kv": kv_heads, "head_dim": head_dim}


# ---------------------------------------------------------------------------- shared by the family


def check_init(cfg) -> None:
    """Validate ``init`` / ``init_text`` of a prompt- or prefix-family config."""
    if cfg.init not in INITS:
        raise ConfigError(f"peft.init {cfg.init!r} is not one of {', '.join(INITS)}")
    if cfg.init == "text" and not cfg.init_text:
        raise ConfigError("peft.init=text needs peft.init_text, e.g. peft.init_text='Answer the question:'")


def init_token_ids(model: nn.Module, n: int, cfg) -> list[int]:
    """n token ids to initialise virtual tokens from: random vocabulary ids (``vocab``) or the
    tokens of ``cfg.init_text`` repeated or cut to n (``text``; PEFT's TEXT rule)."""
    if cfg.init == "vocab":
        vocab = model.get_input_embeddings().weight.shape[0]
        return torch.randint(0, vocab, (n,)).tolist()
    from ..model.load import load_tokenizer

    name = cfg.tokenizer or getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not name:
        raise ConfigError("peft.init=text needs a tokenizer: set peft.tokenizer (a directory, an asset name or gpt2)")
    ids = load_tokenizer(str(name))(cfg.init_text, add_special_tokens=False).input_ids
    if not ids:
        raise ConfigError(f"peft.init_text {cfg.init_text!r} encodes to no tokens; give some text")
    return (ids * math.ceil(n / len(ids)))[:n]


def finalize(model: nn.Module, cfg) -> None:
    """Fold a reparameterisation (P-tuning's encoder, prefix tuning's MLP) into its output."""
    enc = getattr(model, ENCODER_KEY, None)
    if enc is not None:
        enc.fold()


def to_file_keys(state: dict) -> dict:
    """``prompt_encoder.embedding.weight`` -> PEFT's ``prompt_embeddings``; other tensors keep PEFT's prefix."""
    own = {k: v for k, v in state.items() if k.split(".")[0] == ENCODER_KEY}
    rest = {k: v for k, v in state.items() if k.split(".")[0] != ENCODER_KEY}
    if set(own) - {f"{ENCODER_KEY}.embedding.weight"}:
        raise ConfigError(
            "the prompt encoder is still attached; fold it first with "
            "peftlab.registry.get(method).finalize(model, cfg) (the training loop does this before saving)"
        )
    out = add_peft_prefix(rest)
    if own:
        out[FILE_KEY] = own[f"{ENCODER_KEY}.embedding.weight"]
    return out


def from_file_keys(state: dict) -> dict:
    out = strip_peft_prefix({k: v for k, v in state.items() if k != FILE_KEY})
    if FILE_KEY in state:
        out[f"{ENCODER_KEY}.embedding.weight"] = state[FILE_KEY]
    return out


def common_peft_config(model: nn.Module, peft_type: str, n: int) -> dict:
    dims = model_dims(model)
    return {"peft_type": peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": n, "token_dim": dims["d"],
            "num_transformer_submodules": 1, "num_attention_heads": dims["H"], "num_layers": dims["L"],
            "modules_to_save": None, "inference_mode": True}


def check_single_stack(d: dict) -> None:
    if (d.get("num_transformer_submodules") or 1) != 1:
        raise ConfigError(
            f"adapter_config.json has num_transformer_submodules={d['num_transformer_submodules']}; "
            "peftlab loads decoder-only (CAUSAL_LM) prompt adapters only"
        )
