"""UniPELT: LoRA, prefix tuning and a bottleneck adapter in every layer, each behind a learned gate.

Mao et al., "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning" (2022),
arXiv:2110.07577.

    gate(x) = sigmoid(W_g x + b_g),  W_g ∈ R^{1×d}: one scalar per token, from the sub-module's input
    LoRA    (q, v):  h = W x + G_L(x) · s B A x                     G_L from the projection's input
    adapter (FFN):   y = F(x) + G_A(F(x)) · A(F(x))                  serial (Houlsby) after the FFN
    prefix  (attn):  o_i = Σ_{j real} a_ij v_j + G_P(x_i) · Σ_{j prefix} a_ij P_v,j

a_ij is the softmax over [P_k; K] as in prefix tuning, so G_P = 1 is plain prefix tuning and G_P = 0
removes what the prefix values add for that query (its keys keep their share of the softmax; the
paper applies G_P to the prefix vectors,
computed from the layer input; per query here, so position i never sees a later token through the
gate). The prefix term is computed exactly with one more call of the model's own attention kernel:
o = o(V0) + G_P · (o(V) - o(V0)) with V0 the values whose prefix rows are zero (attention is linear
in the values), through an attention implementation registered with transformers that wraps the
model's (eager or SDPA) one. The LoRA, adapter and prefix modules are peftlab's own
(``LoRALinear``, ``BottleneckAdapter``, ``attach_prefix``), called, not copied.

Trainable: Σ_lora-targets (r·(in + out) + in + 1) + L·(2·d·b + b + d + d + 1)
         + prefix tuning's n·t + t·h + h + h·2Lt + 2Lt + L·(d + 1).
Cannot merge (the gates depend on the input). File: peft_type ``UNIPELT`` (peftlab only); the
prefix MLP is folded on save as for prefix tuning.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..errors import ConfigError
from ..model.params import freeze
from ..model.targets import find_targets, linear_shape, replace_module
from ..registry import Method, register
from .adapter import BottleneckAdapter, _check_common, _mam_from_keys, _mam_to_keys, decoder_layers, sublayer
from .lora import check_alpha
from .lowrank import LoRALinear
from .prefix import attach_prefix
from .virtual_tokens import ENCODER_KEY, check_init, finalize, model_dims


@dataclass
class UniPELTConfig:
    method: str = "unipelt"
    r: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA alpha (s = alpha / r)
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # the paper's W_q, W_v
    bottleneck: int = 64  # b of the FFN adapter
    activation: str = "relu"
    num_virtual_tokens: int = 10  # prefix length n
    encoder_hidden_size: int | None = 512  # the prefix MLP's hidden size h
    init: str = "random"  # the prefix's start: random | vocab | text (see prefix_tuning)
    init_text: str | None = None
    tokenizer: str | None = None

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"peft.r must be >= 1, got {self.r}")
        check_alpha(self.alpha)
        if not self.lora_targets:
            raise ConfigError("peft.lora_targets is empty; name the projections LoRA adapts (q_proj, v_proj; GPT-2: c_attn)")
        _check_common(self.bottleneck, self.activation)
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"peft.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        check_init(self)


def _gate(d: int, device) -> nn.Linear:
    return nn.Linear(d, 1, device=device, dtype=torch.float32)


def _open(gate: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """sigmoid(W_g x + b_g): [..., d] -> [..., 1] in fp32."""
    return torch.sigmoid(gate(x.to(gate.weight.dtype)))


class GatedLoRA(nn.Module):
    """h = W x + G_L(x) · s B A x around peftlab's ``LoRALinear`` (``base``; it keeps W as its
    ``base_layer``, so ``base_only.adapters_off`` finds the frozen layer through both)."""

    def __init__(self, lora: LoRALinear):
        super().__init__()
        self.base = lora
        self.gate_lora = _gate(lora.in_features, lora.lora_A.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base.base_layer(x)
        return y + (_open(self.gate_lora, x) * self.base.lora_forward(x)).to(y.dtype)


class GatedAdapter(nn.Module):
    """y = F(x) + G_A(F(x)) · A(F(x)) around peftlab's serial ``BottleneckAdapter`` (``base``, which
    keeps F as its own ``base``)."""

    def __init__(self, adapter: BottleneckAdapter, d: int):
        super().__init__()
        self.base = adapter
        self.gate_adapter = _gate(d, adapter.adapter_up.weight.device)

    def forward(self, *args, **kwargs):
        out = self.base.base(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        y = y + (_open(self.gate_adapter, y) * self.base.adapt(y)).to(y.dtype)
        return (y, *out[1:]) if isinstance(out, tuple) else y


class GatedPrefixAttention(nn.Module):
    """The attention sublayer (``base``, called) with G_P computed from its input hidden states
    [B, T, d]; the registered attention function reads it from the attention module."""

    def __init__(self, base: nn.Module, d: int, n: int, device):
        super().__init__()
        self.base = base
        self.gate_prefix = _gate(d, device)
        base._peftlab_prefix_len = n

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.base._peftlab_prefix_gate = _open(self.gate_prefix, x)  # [B, T, 1]
        try:
            return self.base(*args, **kwargs)
        finally:
            self.base._peftlab_prefix_gate = None


GATED = "peftlab_gated_prefix_"


def _inner_attention(module: nn.Module, impl: str):
    if impl == "eager":  # each model file has its own eager function
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def _gated_attention(impl: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        """query [B, H, T, d_h], key/value [B, H_kv, n + S, d_h] (the prefix first) -> [B, T, H, d_h]."""
        inner = _inner_attention(module, impl)
        out, weights = inner(module, query, key, value, attention_mask, **kwargs)
        gate = getattr(module, "_peftlab_prefix_gate", None)
        if gate is None:
            return out, weights
        n = module._peftlab_prefix_len
        no_prefix = torch.cat([torch.zeros_like(value[:, :, :n]), value[:, :, n:]], dim=2)
        real, _ = inner(module, query, key, no_prefix, attention_mask, **kwargs)
        return real + (gate[:, :, None, :].to(out.dtype)) * (out - real), weights

    return attention


def _use_gated_attention(model: nn.Module) -> None:
    impl = model.config._attn_implementation or "eager"
    if impl.startswith(GATED):
        return
    if impl not in ("eager", "sdpa"):
        raise ConfigError(f"peft.method=unipelt gates the prefix inside the attention and supports eager and sdpa "
                          f"attention; this model uses {impl!r}: load it with model.attn_implementation=sdpa")
    AttentionInterface.register(GATED + impl, _gated_attention(impl))
    ALL_MASK_ATTENTION_FUNCTIONS.register(GATED + impl, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    model.config._attn_implementation = GATED + impl


def apply(model: nn.Module, cfg: UniPELTConfig) -> None:
    freeze(model)
    dims = model_dims(model)
    d, device = dims["d"], model.get_input_embeddings().weight.device
    for path in find_targets(model, cfg.lora_targets, what="peft.lora_targets"):
        base = model.get_submodule(path)
        in_f, out_f = linear_shape(base)
        enable = [True, False, True] if out_f == 3 * in_f and path.endswith("c_attn") else None  # GPT-2: q|k|v
        replace_module(model, path, GatedLoRA(LoRALinear(base, cfg.r, cfg.alpha, enable=enable)))
    for path, layer in decoder_layers(model):
        ffn, attn = sublayer(path, layer, "ffn"), sublayer(path, layer, "attn")
        adapter = BottleneckAdapter(getattr(layer, ffn), d, cfg.bottleneck, cfg.activation, "serial", device=device)
        setattr(layer, ffn, GatedAdapter(adapter, d))
        setattr(layer, attn, GatedPrefixAttention(getattr(layer, attn), d, cfg.num_virtual_tokens, device))
    _use_gated_attention(model)
    attach_prefix(model, cfg.num_virtual_tokens, True, cfg.encoder_hidden_size, cfg)


def to_peft_config(cfg: UniPELTConfig, model: nn.Module) -> dict:
    return {"peft_type": "UNIPELT", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
            "lora_targets": list(cfg.lora_targets), "bottleneck": cfg.bottleneck, "activation": cfg.activation,
            "num_virtual_tokens": cfg.num_virtual_tokens, "encoder_hidden_size": cfg.encoder_hidden_size,
            "inference_mode": True}


def from_peft_config(d: dict) -> UniPELTConfig:
    return UniPELTConfig(r=int(d["r"]), alpha=float(d["lora_alpha"]), lora_targets=list(d["lora_targets"]),
                         bottleneck=int(d["bottleneck"]), activation=d.get("activation", "relu"),
                         num_virtual_tokens=int(d["num_virtual_tokens"]),
                         encoder_hidden_size=d.get("encoder_hidden_size"))


register(Method(
    name="unipelt", config_cls=UniPELTConfig, apply=apply, merge=None, peft_type="UNIPELT",
    state_prefixes=("lora_", "adapter_", "gate_", ENCODER_KEY), to_peft_config=to_peft_config,
    from_peft_config=from_peft_config, to_peft_keys=_mam_to_keys, from_peft_keys=_mam_from_keys,
    finalize=finalize,
))
