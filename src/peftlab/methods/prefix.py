"""Prefix tuning and P-tuning v2: trainable key/value prefixes at every attention layer.

Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (2021), arXiv:2101.00190.
Liu et al., "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across Scales
and Tasks" (2022), arXiv:2110.07602.

At every layer l, attention runs over n extra key/value vectors in front of the sequence's own:

    head_l(x) = softmax(q [P_k^l; K_l]^T / sqrt(d_h)) [P_v^l; V_l],    P_k^l, P_v^l ∈ R^{H_kv × n × d_h}

prefix tuning:  [P^1 .. P^L] = MLP(P₀),  MLP = Linear(t, h) tanh Linear(h, 2·L·t),  P₀ ∈ R^{n×t},
                t = H_kv·d_h (the MLP reparameterisation stabilises training; ``finalize`` folds
                it into its output afterwards, so the saved adapter holds P alone)
P-tuning v2:    P ∈ R^{n × 2·L·t} trained directly ("deep prompts", no reparameterisation)

Init: ``random`` is PEFT's (N(0, 1) table, default MLP init). ``vocab`` / ``text`` start from the
keys and values the frozen model computes for n real tokens (random ones, or ``init_text``) at
positions 0..n-1 — Li & Liang's initialisation from real activations: at step 0 the model behaves
exactly as if those tokens were prepended. Behind the MLP this is a frozen offset plus a zero last
layer (P = offset + MLP(P₀)), folded away with the MLP.

The prefixes enter through the model's KV cache (a transformers ``DynamicCache`` filled before the
first forward of a sequence), so the base model's attention code runs unchanged and generation
keeps the prefix in the cache across decoding steps. Real tokens sit at positions n + i, as in
PEFT. The layout of P (``prompt_embeddings`` [n, 2·L·t], per token the layers' key then value,
each H_kv × d_h) is PEFT's, so the adapter files load in PEFT and back. Cannot merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..model.kv_cache import output_cache
from ..model.params import freeze
from ..registry import Method, register
from .virtual_tokens import (
    ENCODER_KEY,
    attach_virtual_tokens,
    check_init,
    check_single_stack,
    common_peft_config,
    finalize,
    from_file_keys,
    init_token_ids,
    model_dims,
    to_file_keys,
)


@dataclass
class PrefixTuningConfig:
    default_lr = 1e-3  # train.lr when unset (not a key): docs/results.md §2b
    method: str = "prefix_tuning"
    num_virtual_tokens: int = 20
    encoder_hidden_size: int | None = None  # h of the reparameterisation MLP (default t = H_kv·d_h)
    init: str = "random"  # random (PEFT's) | vocab | text: start from the K/V of real tokens
    init_text: str | None = None  # for init=text
    tokenizer: str | None = None  # for init=text (default: the model's own directory)

    def validate(self) -> None:
        _check_n(self.num_virtual_tokens)
        check_init(self)
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError(f"peft.encoder_hidden_size must be >= 1, got {self.encoder_hidden_size}")


@dataclass
class PTuningV2Config:
    method: str = "p_tuning_v2"
    num_virtual_tokens: int = 20
    init: str = "random"  # random (PEFT's) | vocab | text: start from the K/V of real tokens
    init_text: str | None = None
    tokenizer: str | None = None

    def validate(self) -> None:
        _check_n(self.num_virtual_tokens)
        check_init(self)


def _check_n(n: int) -> None:
    if n < 1:
        raise ConfigError(f"peft.num_virtual_tokens must be >= 1, got {n}")


class PrefixEncoder(nn.Module):
    """Produces every layer's key/value prefix, flattened: [n, 2·L·t] (t = H_kv·d_h).

    ``projection``: embedding [n, t] -> transform = Linear(t, h) Tanh Linear(h, 2·L·t);
    otherwise (or after ``fold``) embedding [n, 2·L·t] is the prefix itself. Module names and
    init are PEFT's PrefixEncoder's. fp32 on the model's device.
    """

    def __init__(self, n: int, layers: int, kv_heads: int, head_dim: int, projection: bool,
                 hidden: int | None = None, device=None):
        super().__init__()
        self.n, self.layers, self.kv_heads, self.head_dim = n, layers, kv_heads, head_dim
        t = kv_heads * head_dim
        self.projection = projection
        if projection:
            h = hidden or t
            self.embedding = nn.Embedding(n, t, device=device)
            self.transform = nn.Sequential(nn.Linear(t, h, device=device), nn.Tanh(),
                                           nn.Linear(h, 2 * layers * t, device=device))
        else:
            self.embedding = nn.Embedding(n, 2 * layers * t, device=device)

    def forward(self) -> torch.Tensor:
        """P [n, 2·L·t] (+ the frozen ``offset`` of a real-token init, when there is one)."""
        x = self.embedding.weight
        if not self.projection:
            return x
        x = self.transform(x)
        return x + self.offset if hasattr(self, "offset") else x

    @torch.no_grad()
    def start_at(self, p: torch.Tensor) -> None:
        """Make P equal ``p`` [n, 2·L·t] now: copied into the table, or — behind the MLP — kept as a
        frozen offset with the MLP's last layer zeroed, so P = p + MLP(P₀) starts at p exactly."""
        if self.projection:
            self.register_buffer("offset", p.to(self.embedding.weight))
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding.weight.copy_(p)

    def key_values(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value), each [B, H_kv, n, d_h] (a broadcast view; no copy per row)."""
        p = self.forward().to(dtype).view(self.n, 2 * self.layers, self.kv_heads, self.head_dim)
        p = p.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # [2L, B, H_kv, n, d_h]
        return [(p[2 * i], p[2 * i + 1]) for i in range(self.layers)]

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by its output (what PEFT saves and loads in inference mode)."""
        if not self.projection:
            return
        out = self.forward().detach().clone()
        del self.transform
        if hasattr(self, "offset"):
            del self.offset
        self.embedding = nn.Embedding(self.n, out.shape[1], device=out.device)
        self.embedding.weight = nn.Parameter(out)
        self.projection = False


@torch.no_grad()
def real_token_prefix(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """The keys and values the (frozen) model computes for ``ids`` at positions 0..n-1, in P's
    layout [n, 2·L·t]: a prefix that makes the model behave as if those tokens were prepended
    (Li & Liang's initialisation from the activations of real words)."""
    was_training = model.training
    model.eval()
    try:
        device = model.get_input_embeddings().weight.device
        cache = output_cache(model.base_model(input_ids=torch.tensor([ids], device=device), use_cache=True))
    finally:
        model.train(was_training)
    kv = [t for layer in cache.layers for t in (layer.keys[0], layer.values[0])]  # 2L x [H_kv, n, d_h]
    return torch.stack(kv).permute(2, 0, 1, 3).reshape(len(ids), -1).float()


def attach_prefix(model: nn.Module, n: int, projection: bool, hidden: int | None, init_cfg=None) -> PrefixEncoder:
    """Give ``model`` a prefix encoder; ``init_cfg`` (with init, init_text, tokenizer) picks its start."""
    dims = model_dims(model)
    device = model.get_input_embeddings().weight.device
    enc = PrefixEncoder(n, dims["L"], dims["H_kv"], dims["head_dim"], projection, hidden, device=device)
    if init_cfg is not None and init_cfg.init != "random" and device.type != "meta":
        enc.start_at(real_token_prefix(model, init_token_ids(model, n, init_cfg)))
    attach_virtual_tokens(model, enc, n, prefix=enc.key_values)
    return enc


def apply_prefix_tuning(model: nn.Module, cfg: PrefixTuningConfig) -> None:
    freeze(model)
    attach_prefix(model, cfg.num_virtual_tokens, True, cfg.encoder_hidden_size, cfg)


def apply_p_tuning_v2(model: nn.Module, cfg: PTuningV2Config) -> None:
    freeze(model)
    attach_prefix(model, cfg.num_virtual_tokens, False, None, cfg)


def prefix_peft_config(model: nn.Module, n: int, projection: bool, hidden: int | None) -> dict:
    dims = model_dims(model)
    t = dims["H_kv"] * dims["head_dim"]
    out = common_peft_config(model, "PREFIX_TUNING", n)
    out.update({"token_dim": t, "num_attention_heads": dims["H_kv"], "encoder_hidden_size": hidden or t,
                "prefix_projection": projection, "init_weights": None})
    return out


def prefix_tuning_to_peft(cfg: PrefixTuningConfig, model: nn.Module) -> dict:
    return prefix_peft_config(model, cfg.num_virtual_tokens, True, cfg.encoder_hidden_size)


def p_tuning_v2_to_peft(cfg: PTuningV2Config, model: nn.Module) -> dict:
    return prefix_peft_config(model, cfg.num_virtual_tokens, False, None)


def from_peft(d: dict):
    """PEFT's PREFIX_TUNING: prefix_tuning when it was trained with the MLP, else p_tuning_v2."""
    check_single_stack(d)
    n = int(d["num_virtual_tokens"])
    if d.get("prefix_projection"):
        return PrefixTuningConfig(num_virtual_tokens=n, encoder_hidden_size=d.get("encoder_hidden_size"))
    return PTuningV2Config(num_virtual_tokens=n)


def saved_params(model: nn.Module, cfg) -> dict:
    """What the saved (folded) adapter holds: n·2·L·t values, whatever trained."""
    dims = model_dims(model)
    return {"saved_params": cfg.num_virtual_tokens * 2 * dims["L"] * dims["H_kv"] * dims["head_dim"]}


register(Method(
    name="prefix_tuning", config_cls=PrefixTuningConfig, apply=apply_prefix_tuning, merge=None,
    peft_type="PREFIX_TUNING", state_prefixes=(ENCODER_KEY,), to_peft_config=prefix_tuning_to_peft,
    from_peft_config=from_peft, to_peft_keys=to_file_keys, from_peft_keys=from_file_keys, finalize=finalize,
    param_extra=saved_params,
))
register(Method(
    name="p_tuning_v2", config_cls=PTuningV2Config, apply=apply_p_tuning_v2, merge=None,
    peft_type="PREFIX_TUNING", state_prefixes=(ENCODER_KEY,), to_peft_config=p_tuning_v2_to_peft,
    from_peft_config=from_peft, to_peft_keys=to_file_keys, from_peft_keys=from_file_keys, param_extra=saved_params,
))
