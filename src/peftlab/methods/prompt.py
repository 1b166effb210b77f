"""Prompt tuning and P-tuning: n trainable virtual tokens prepended to every input.

Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning" (2021), arXiv:2104.08691.
Liu et al., "GPT Understands, Too" (P-tuning, 2021), arXiv:2103.10385.

    h = Transformer([P; E(x)]),    P ∈ R^{n×d} trainable, the model frozen
    prompt tuning:  P is a free parameter (init random, sampled vocabulary rows, or E(text))
    P-tuning:       P = MLP(P₀)  or  P = MLP(BiLSTM(P₀)),  P₀ ∈ R^{n×d}; after training the encoder
                    is folded away (``finalize``) and only P is kept, as PEFT stores it

The virtual tokens sit at positions 0..n-1 and the real tokens at n + (their index among the real
tokens), so a left-padded row sees exactly what the unpadded sequence sees. Attention-mask columns
for the virtual tokens are 1; in a packed row (4-D block mask, positions restarting per sequence)
every packed sequence attends to the virtual tokens and sees itself at n + i, exactly as unpacked.
Labels need no change because the backbone wrapper strips the n
virtual positions from its hidden states (the loss and the LM head see the original positions).

``VirtualTokenBackbone`` is the shared machinery of the prompt family (also used by prefix
tuning, P-tuning v2 and MAM): it replaces the model's backbone (``model.model`` for Llama,
``model.transformer`` for GPT-2 — ``model.base_model_prefix``) with a wrapper that keeps the
original as ``self.base`` and, on the first call of a sequence (no cache yet), prepends the
virtual embeddings or fills the KV cache with per-layer prefixes. Later cached decoding steps
only extend the mask and shift the positions, so ``model.generate`` works with the KV cache and
with batched, left-padded prompts. The method's tensors live once, at ``model.prompt_encoder``,
so their names do not depend on the architecture; the file layout is PEFT's
(``prompt_embeddings`` [n, d]).

Cannot merge (the virtual tokens are inputs, not weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..model.params import freeze
from ..registry import Method, register

ENCODER_KEY = "prompt_encoder"  # the top-level module holding the method's tensors
FILE_KEY = "prompt_embeddings"  # PEFT's name for the (folded) virtual tokens in the adapter file


# ---------------------------------------------------------------------------- the backbone wrapper


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
                inputs_embeds=None, use_cache=None, **kwargs):
        n = self.num_virtual_tokens
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("give input_ids or inputs_embeds")
        batch, q_len, device = ref.shape[0], ref.shape[1], ref.device
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        fresh = past_len == 0  # the first call of a sequence: the virtual tokens go in now
        block_mask = attention_mask is not None and attention_mask.dim() == 4  # packed rows
        if block_mask and not fresh:
            raise ConfigError("a 4-D attention mask with a KV cache is not supported by prompt and prefix methods")
        if fresh and position_ids is not None and attention_mask is None and q_len > 1 and _is_packed(position_ids):
            raise ConfigError(
                "prompt and prefix methods need the block mask of packed rows to give every packed sequence "
                "the virtual tokens; the mask-free (flash/varlen) path cannot: use attn_implementation=sdpa "
                "or eager, or data.packing=false"
            )
        cache = past_key_values
        if self.prefix is not None and self.training and any(
                getattr(m, "gradient_checkpointing", False) for m in self.base.modules()):
            raise ConfigError(
                "prefix methods (prefix_tuning, p_tuning_v2, mam) put their prefixes in the KV cache, which "
                "gradient checkpointing drops inside every layer; set model.gradient_checkpointing=false"
            )
        if self.prefix is not None and fresh:
            if cache is None:
                from transformers import DynamicCache

                cache = DynamicCache(config=self.base.config)
            param_dtype = next(self.base.parameters()).dtype
            for layer, (k, v) in enumerate(self.prefix(batch, _compute_dtype(device, param_dtype))):
                cache.update(k, v, layer)
            past_len = n
        new = n if (self.prompts is not None and fresh) else 0  # virtual positions this call adds
        kv_len = past_len + new + q_len
        if block_mask:
            attention_mask = _block_mask_with_virtual(attention_mask, n, bool(new))
        elif attention_mask is not None:
            if attention_mask.shape[1] == kv_len - n:  # the caller's mask counts real tokens only
                attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
            elif attention_mask.shape[1] != kv_len:
                raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns; expected "
                                 f"{kv_len - n} (real tokens) or {kv_len} (with the virtual tokens)")
        if position_ids is not None:  # counted over real tokens by the caller: shift past the virtual ones
            position_ids = position_ids.expand(batch, -1) + n
            if new:
                virtual = torch.arange(n, device=device, dtype=position_ids.dtype).expand(batch, n)
                position_ids = torch.cat([virtual, position_ids], dim=1)
        elif attention_mask is not None:  # a token's position = how many unmasked tokens precede it
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -(new + q_len):]
        else:
            position_ids = torch.arange(past_len, kv_len, device=device).unsqueeze(0)
        if new:
            embeds = inputs_embeds if inputs_embeds is not None else self.base.get_input_embeddings()(input_ids)
            virtual = self.prompts(batch).to(device=embeds.device, dtype=embeds.dtype)
            inputs_embeds, input_ids = torch.cat([virtual, embeds], dim=1), None
        if "cache_position" in kwargs:  # older model code: positions in the cache, virtual tokens included
            kwargs["cache_position"] = torch.arange(past_len, kv_len, device=device)
        out = self.base(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        position_ids=position_ids, past_key_values=cache, use_cache=use_cache, **kwargs)
        wants_cache = use_cache if use_cache is not None else getattr(self.base.config, "use_cache", False)
        if past_key_values is None and not wants_cache and not isinstance(out, tuple):
            out.past_key_values = None  # the prefix cache was only a vehicle for this forward
        if new:
            if isinstance(out, tuple):
                return (out[0][:, n:], *out[1:])
            out.last_hidden_state = out.last_hidden_state[:, n:]
            if getattr(out, "hidden_states", None) is not None:
                out.hidden_states = tuple(h[:, n:] for h in out.hidden_states)
        return out


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


# ---------------------------------------------------------------------------- prompt tuning / P-tuning


INITS = ("random", "vocab", "text")
ENCODERS = ("mlp", "lstm")


@dataclass
class PromptTuningConfig:
    method: str = "prompt_tuning"
    num_virtual_tokens: int = 20
    init: str = "random"  # random (N(0, σ_E²), σ_E the embeddings' std) | vocab (random rows of E) | text
    init_text: str | None = None  # for init=text: repeated/cut to n tokens, P = E(tokens)
    tokenizer: str | None = None  # for init=text (default: the model's own directory)

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"peft.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        check_init(self)


@dataclass
class PTuningConfig:
    method: str = "p_tuning"
    num_virtual_tokens: int = 20
    encoder: str = "mlp"  # mlp | lstm (bi-LSTM + MLP, as in the paper)
    encoder_hidden_size: int | None = None  # default: the model's hidden size
    encoder_num_layers: int = 2  # LSTM layers
    encoder_dropout: float = 0.0  # between LSTM layers

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"peft.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"peft.encoder {self.encoder!r} is not one of {', '.join(ENCODERS)}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError(f"peft.encoder_hidden_size must be >= 1, got {self.encoder_hidden_size}")


class PromptEncoder(nn.Module):
    """Produces the virtual tokens P [n, d].

    kind ``none``: P = embedding.weight (prompt tuning, or a folded P-tuning encoder).
    kind ``mlp``:  P = mlp_head(P₀), mlp_head = Linear(d, h) ReLU Linear(h, h) ReLU Linear(h, d).
    kind ``lstm``: P = mlp_head(BiLSTM(P₀)), mlp_head = Linear(2h, 2h) ReLU Linear(2h, d).
    Module names and shapes are PEFT's (``embedding``, ``lstm_head``, ``mlp_head``), so PEFT's
    encoder weights load into it unchanged. fp32 on the model's device.
    """

    def __init__(self, n: int, d: int, kind: str = "none", hidden: int | None = None, lstm_layers: int = 2,
                 dropout: float = 0.0, device=None):
        super().__init__()
        self.kind = kind
        h = hidden or d
        self.embedding = nn.Embedding(n, d, device=device)
        if kind == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(d, h, device=device), nn.ReLU(), nn.Linear(h, h, device=device),
                                          nn.ReLU(), nn.Linear(h, d, device=device))
        elif kind == "lstm":
            self.lstm_head = nn.LSTM(d, h, num_layers=lstm_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True, device=device)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, device=device), nn.ReLU(),
                                          nn.Linear(2 * h, d, device=device))

    def forward(self) -> torch.Tensor:
        """P [n, d]."""
        x = self.embedding.weight
        if self.kind == "none":
            return x
        x = x.unsqueeze(0)
        if self.kind == "lstm":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]

    def virtual_embeddings(self, batch_size: int) -> torch.Tensor:
        """[B, n, d]: the same virtual tokens for every row."""
        p = self.forward()
        return p.unsqueeze(0).expand(batch_size, *p.shape)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the encoder by its output: afterwards kind is ``none`` and P is a plain parameter."""
        if self.kind == "none":
            return
        out = self.forward().detach().clone()
        for name in ("mlp_head", "lstm_head"):
            if hasattr(self, name):
                delattr(self, name)
        self.embedding.weight = nn.Parameter(out, requires_grad=self.embedding.weight.requires_grad)
        self.kind = "none"


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


def _init_prompt(enc: PromptEncoder, model: nn.Module, cfg: PromptTuningConfig) -> None:
    weight = model.get_input_embeddings().weight
    if weight.is_meta:  # shapes only (peftlab params): nothing to initialise
        return
    n = enc.embedding.num_embeddings
    with torch.no_grad():
        if cfg.init == "random":
            enc.embedding.weight.normal_(0.0, float(weight.float().std()))
        else:
            rows = torch.tensor(init_token_ids(model, n, cfg), device=weight.device)
            enc.embedding.weight.copy_(weight[rows].float())


def apply_prompt_tuning(model: nn.Module, cfg: PromptTuningConfig) -> None:
    freeze(model)
    dims = model_dims(model)
    weight = model.get_input_embeddings().weight
    enc = PromptEncoder(cfg.num_virtual_tokens, dims["d"], device=weight.device)
    _init_prompt(enc, model, cfg)
    attach_virtual_tokens(model, enc, cfg.num_virtual_tokens, prompts=enc.virtual_embeddings)


def apply_p_tuning(model: nn.Module, cfg: PTuningConfig) -> None:
    freeze(model)
    dims = model_dims(model)
    weight = model.get_input_embeddings().weight
    enc = PromptEncoder(cfg.num_virtual_tokens, dims["d"], cfg.encoder, cfg.encoder_hidden_size,
                        cfg.encoder_num_layers, cfg.encoder_dropout, device=weight.device)
    attach_virtual_tokens(model, enc, cfg.num_virtual_tokens, prompts=enc.virtual_embeddings)


def finalize(model: nn.Module, cfg) -> None:
    """Fold a reparameterisation (P-tuning's encoder, prefix tuning's MLP) into its output."""
    enc = getattr(model, ENCODER_KEY, None)
    if enc is not None:
        enc.fold()


# ---------------------------------------------------------------------------- adapter files


def to_file_keys(state: dict) -> dict:
    """``prompt_encoder.embedding.weight`` -> PEFT's ``prompt_embeddings``; other tensors keep PEFT's prefix."""
    from ..registry import add_peft_prefix

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
    from ..registry import strip_peft_prefix

    out = strip_peft_prefix({k: v for k, v in state.items() if k != FILE_KEY})
    if FILE_KEY in state:
        out[f"{ENCODER_KEY}.embedding.weight"] = state[FILE_KEY]
    return out


def _common_peft_config(model: nn.Module, peft_type: str, n: int) -> dict:
    dims = model_dims(model)
    return {"peft_type": peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": n, "token_dim": dims["d"],
            "num_transformer_submodules": 1, "num_attention_heads": dims["H"], "num_layers": dims["L"],
            "modules_to_save": None, "inference_mode": True}


def prompt_tuning_to_peft(cfg: PromptTuningConfig, model: nn.Module) -> dict:
    out = _common_peft_config(model, "PROMPT_TUNING", cfg.num_virtual_tokens)
    out["prompt_tuning_init"] = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[cfg.init]
    out["prompt_tuning_init_text"] = cfg.init_text
    out["tokenizer_name_or_path"] = cfg.tokenizer
    return out


def p_tuning_to_peft(cfg: PTuningConfig, model: nn.Module) -> dict:
    out = _common_peft_config(model, "P_TUNING", cfg.num_virtual_tokens)
    out.update({"encoder_reparameterization_type": cfg.encoder.upper(),
                "encoder_hidden_size": cfg.encoder_hidden_size or model_dims(model)["d"],
                "encoder_num_layers": cfg.encoder_num_layers, "encoder_dropout": cfg.encoder_dropout})
    return out


def _check_single_stack(d: dict) -> None:
    if (d.get("num_transformer_submodules") or 1) != 1:
        raise ConfigError(
            f"adapter_config.json has num_transformer_submodules={d['num_transformer_submodules']}; "
            "peftlab loads decoder-only (CAUSAL_LM) prompt adapters only"
        )


def prompt_tuning_from_peft(d: dict) -> PromptTuningConfig:
    """The loaded file replaces any init, so PEFT's TEXT init (and its hub tokenizer) is not replayed."""
    _check_single_stack(d)
    return PromptTuningConfig(num_virtual_tokens=int(d["num_virtual_tokens"]))


def p_tuning_from_peft(d: dict) -> PTuningConfig:
    _check_single_stack(d)
    return PTuningConfig(num_virtual_tokens=int(d["num_virtual_tokens"]),
                         encoder=str(d.get("encoder_reparameterization_type", "MLP")).lower(),
                         encoder_hidden_size=d.get("encoder_hidden_size"),
                         encoder_num_layers=int(d.get("encoder_num_layers", 2)),
                         encoder_dropout=float(d.get("encoder_dropout", 0.0) or 0.0))


register(Method(
    name="prompt_tuning", config_cls=PromptTuningConfig, apply=apply_prompt_tuning, merge=None,
    peft_type="PROMPT_TUNING", state_prefixes=(ENCODER_KEY,), to_peft_config=prompt_tuning_to_peft,
    from_peft_config=prompt_tuning_from_peft, to_peft_keys=to_file_keys, from_peft_keys=from_file_keys,
    finalize=finalize,
))
register(Method(
    name="p_tuning", config_cls=PTuningConfig, apply=apply_p_tuning, merge=None, peft_type="P_TUNING",
    state_prefixes=(ENCODER_KEY,), to_peft_config=p_tuning_to_peft, from_peft_config=p_tuning_from_peft,
    to_peft_keys=to_file_keys, from_peft_keys=from_file_keys, finalize=finalize,
    param_extra=lambda model, cfg: {"saved_params": cfg.num_virtual_tokens * model_dims(model)["d"]},
))
