"""LongLoRA: extending the context of a model with LoRA (Chen et al., 2023, arXiv:2309.12307).

Three parts, all here:

- **Shifted sparse attention (S²-Attn), training only.** The sequence of N tokens is cut into
  groups of G = ``group_ratio`` · N tokens (rounded to even; the sequence padded to a multiple) and
  attention runs causally inside each group. Half the heads see the groups shifted by G/2 tokens
  (their q, k, v rolled by -G/2 along the sequence before grouping, the output rolled back by +G/2),
  so information flows between neighbouring groups:

      heads h < H/2:   out = causal-attention within [g·G, (g+1)·G)
      heads h >= H/2:  out = roll(attention within groups of roll(qkv, -G/2), +G/2), where a token
                       attends the tokens of its group that precede it in the original order

  (the paper's code lets the G/2 tokens rolled from the front to the back attend the end of the
  sequence, their future; here they do not, and padding is never attended).

  Cost per layer falls from O(N²) to O(N·G). In eval mode (and for generation) the model runs its
  ordinary full attention: S²-Attn is a training device, as in the paper.
- **Position interpolation**: ``context_factor`` f > 1 rescales RoPE linearly (positions divided by
  f, the maximum context multiplied by f), so a model trained at N tokens reads f·N.
- **Trainable embeddings and normalisation layers** beside LoRA (on q, k, v, o by default): the
  paper finds LoRA alone does not adapt to long contexts; these are saved with the adapter as
  extra trained modules (PEFT's ``modules_to_save``).

Trainable: LoRA's r·(in + out) per targeted layer + the embedding + every norm's weights.
The adapter merges; the merged model's ``config.json`` carries the linear RoPE scaling, so plain
transformers reads the extended context.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..model.targets import find_targets, set_submodule
from ..registry import register
from . import lora, peft_format

ATTN = "peftlab_s2attn"


@dataclass
class LongLoRAConfig(lora.LoRAConfig):
    method: str = "longlora"
    targets: str | list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    group_ratio: float = 0.25  # S²-Attn group size as a share of the training sequence length
    context_factor: float = 1.0  # position interpolation: RoPE positions divided by this, max context times it
    train_embeddings_and_norms: bool = True  # the paper's "LoRA+" part

    def validate(self) -> None:
        super().validate()
        if not 0 < self.group_ratio <= 1:
            raise ConfigError(f"peft.group_ratio must be in (0, 1] (the paper uses 1/4), got {self.group_ratio}")
        if self.context_factor < 1:
            raise ConfigError(f"peft.context_factor must be >= 1 (the context grows by it), got {self.context_factor}")
        if self.init in ("pissa", "olora") or self.target_parameters:
            raise ConfigError("peft.method=longlora uses LoRA's default init on linear layers")


def group_size(ratio: float, n: int) -> int:
    """S²-Attn's group for a sequence of ``n`` tokens: ``ratio``·n rounded to an even count, at least 2."""
    return max(2, 2 * round(ratio * n / 2))


def s2_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention interface: query [B, H, N, D], key/value [B, Hkv, N, D] -> [B, N, H, D].
    Training mode only; otherwise the model's full attention (sdpa)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n = query.shape[2]
    group = group_size(module.config.s2_group_ratio, n)
    if not module.training or n <= group:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return shifted_sparse_attention(query, key, value, group, scaling, dropout), None


def shifted_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int,
                             scaling: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """S²-Attn on [B, H, N, D] (k, v may have fewer heads: repeated); returns [B, N, H, D].

    The sequence is padded to a multiple of ``group``. First half of the heads: causal attention
    inside each group. Second half: the groups of the sequence rolled by -group/2, where a token
    attends the tokens of its group that come at or before it in the *original* order — so the
    first group/2 tokens, rolled to the end, do not see the end of the sequence (the paper's
    reference code lets them; here no token sees its future) and padding is never attended."""
    b, h, n, d = q.shape
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
        v = v.repeat_interleave(h // v.shape[1], dim=1)
    half, shift = h // 2, group // 2
    m = -(-n // group) * group
    if m != n:
        q, k, v = (F.pad(t, (0, 0, 0, m - n)) for t in (q, k, v))
    g = m // group

    # groups folded into the batch ([B·g, H', G, D]): 4-D inputs reach SDPA's fused kernels (5-D ones
    # fall back to the math path, which materialises every group's scores: measured 2.8x slower on CPU)
    def grouped(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, t.shape[1], g, group, d).transpose(1, 2).reshape(b * g, t.shape[1], group, d)

    def ungrouped(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, g, t.shape[1], group, d).transpose(1, 2).reshape(b, t.shape[1], m, d)

    plain = ungrouped(F.scaled_dot_product_attention(*(grouped(t[:, :half]) for t in (q, k, v)), is_causal=True,
                                                     scale=scaling, dropout_p=dropout))
    orig = (torch.arange(m, device=q.device) + shift) % m  # original position of rolled index i
    og = orig.view(g, group)
    mask = (og[:, None, :] <= og[:, :, None]) & (og[:, None, :] < n) | torch.eye(group, dtype=torch.bool,
                                                                              device=q.device)
    rolled = F.scaled_dot_product_attention(*(grouped(t[:, half:].roll(-shift, dims=2)) for t in (q, k, v)),
                                            attn_mask=mask[:, None].repeat(b, 1, 1, 1), scale=scaling,
                                            dropout_p=dropout)
    shifted = ungrouped(rolled).roll(shift, dims=2)
    return torch.cat([plain, shifted], dim=1)[:, :, :n].transpose(1, 2).contiguous()


def interpolate_positions(model: nn.Module, factor: float) -> None:
    """Linear RoPE scaling by ``factor`` (positions / factor), the rotary tables rebuilt."""
    if factor == 1:
        return
    config = model.config
    params = dict(getattr(config, "rope_parameters", None) or {})
    if params.get("rope_type", "default") not in ("default", "linear"):
        raise ConfigError(f"peft.context_factor: the model already uses {params['rope_type']!r} RoPE scaling; "
                          "position interpolation here is linear only")
    base = float(params.get("factor", 1.0)) if params.get("rope_type") == "linear" else 1.0
    params.update(rope_type="linear", factor=base * factor)
    config.rope_parameters = params
    config.max_position_embeddings = int(round(config.max_position_embeddings * factor))
    for name, module in [(n, m) for n, m in model.named_modules() if n.endswith("rotary_emb")]:
        set_submodule(model, name, type(module)(config=config).to(module.inv_freq.device))


def embedding_and_norm_names(model: nn.Module) -> list[str]:
    """Last-name components of the input embedding and of every normalisation layer."""
    emb = model.get_input_embeddings()
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is emb}
    names |= {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and "norm" in type(m).__name__.lower()}
    return sorted(names)


def apply(model: nn.Module, cfg: LongLoRAConfig) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if not hasattr(model.config, "rope_parameters") or not find_targets(model, cfg.targets):
        raise ConfigError("peft.method=longlora needs a RoPE decoder (Llama, Qwen2, Mistral, ...) with the targeted "
                          f"projections {cfg.targets}")
    if cfg.train_embeddings_and_norms and not cfg.additional_targets:
        cfg.additional_targets = embedding_and_norm_names(model)  # recorded in the run's config and the file
    lora.apply(model, cfg)
    interpolate_positions(model, cfg.context_factor)
    AttentionInterface.register(ATTN, s2_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN, sdpa_mask)  # eval/generation: sdpa's masks (padding, cache)
    model.config.s2_group_ratio = cfg.group_ratio
    model.set_attn_implementation(ATTN)


def to_peft_config(cfg: LongLoRAConfig, model: nn.Module) -> dict:
    out = lora.to_peft_config(cfg, model)
    out.update(peft_type="LONGLORA", group_ratio=cfg.group_ratio, context_factor=cfg.context_factor)
    return out


def from_peft_config(d: dict) -> LongLoRAConfig:
    base = lora.from_peft_config({**d, "peft_type": "LORA"})
    return LongLoRAConfig(**{**dataclasses.asdict(base), "method": "longlora",
                             "group_ratio": float(d.get("group_ratio", 0.25)),
                             "context_factor": float(d.get("context_factor", 1.0))})


def merge(model: nn.Module) -> None:
    lora.merge(model)
    if getattr(model.config, "_attn_implementation", None) == ATTN:
        model.set_attn_implementation("sdpa")
    if hasattr(model.config, "s2_group_ratio"):
        del model.config.s2_group_ratio


register(
    peft_format.family_method(
        "longlora", LongLoRAConfig, apply, lora.LORA_TENSORS,
        merge=merge,
        peft_type="LONGLORA",
        to_peft_config=to_peft_config,
        from_peft_config=from_peft_config,
        param_groups=lora.param_groups,
        set_speed=lora.set_speed,
    )
)
