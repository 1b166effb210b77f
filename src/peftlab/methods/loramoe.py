"""LoRAMoE: LoRA experts in the FFN, split into groups, with the localized balancing constraint.

Dou et al., "LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via MoE-Style
Plugin" (2023), arXiv:2312.09979.

    h = W x + s · Σ_i g_i(x) B_i A_i x,    g(x) = softmax(W_r x)      (dense routing over all N experts)
    experts split into groups; group m serves samples of type m (the paper: world knowledge / task)
    Q_{n,m} = Σ_{tokens t of samples of type m} g_n(x_t) / K         (K: the micro-batch's real tokens)
    I_{n,m} = 1 + δ  if expert n is in group m,  else 1 - δ
    Z = I ∘ Q,    L_lbc = σ²(Z) / μ(Z)                               (over all N·M entries; σ² without Bessel)
    L = L_lm + β · mean over adapted layers of L_lbc

The experts and the router are MoE-LoRA's (``moe_lora.MoELoRALinear``: one mechanism); LoRAMoE adds
the grouping, the FFN placement (``targets=ffn``: every linear layer of each decoder layer's FFN)
and this auxiliary loss, which reaches the loop as MoE-LoRA's does (``Method.aux_loss``) and whose
router statistics land in the step's metrics the same way. Q is divided by the token count K (the
paper sums over a batch of fixed size), so the term does not grow with the micro-batch.

Type labels: ``peft.type_field=COLUMN`` has the data pipeline read each record's type from that column
(``peft.type_labels=[world, task]`` names the types in the order of ``expert_groups``; without names
the values are the indices), and the batch carries ``sample_type``: [B], or [B, T] for packed rows
(data/sample_types.py; a missing or unknown label is a ``TypeLabelError`` naming the record). Without
a type field every sample is of type ``peft.sample_type``: then only that column of Q is non-zero
and the term balances the experts' weighted load on that one type, no longer tying a group of
experts to a kind of data. Trainable per adapted linear:
N·r·(in + out) + N·in, as MoE-LoRA. Cannot merge. Files: peft_type ``LORAMOE``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..model.targets import LINEAR_TYPES
from ..registry import Method, register
from . import moe_lora
from .adapter import decoder_layers, sublayer


@dataclass
class LoRAMoEConfig(moe_lora.MoELoRAConfig):
    method: str = "loramoe"
    num_experts: int = 6  # N = Σ expert_groups
    expert_groups: list[int] = field(default_factory=lambda: [3, 3])  # experts per sample type, in order
    lbc_delta: float = 0.1  # δ of the localized balancing constraint
    sample_type: int = 0  # every sample's type when the batch has no ``sample_type``
    type_field: str | None = None  # the records' column holding their type (read by the data pipeline)
    type_labels: list[str] = field(default_factory=list)  # type i's label; []: the column holds 0..M-1
    targets: str | list[str] = "ffn"  # ffn: the FFN's linear layers; or names / a regex / all-linear
    aux_loss_coef: float = 0.1  # β

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.num_experts, int) or self.num_experts != sum(self.expert_groups):
            raise ConfigError(f"peft.num_experts={self.num_experts} must equal the sum of peft.expert_groups="
                              f"{self.expert_groups} (one count for every layer)")
        if not self.expert_groups or min(self.expert_groups) < 1:
            raise ConfigError(f"peft.expert_groups must list at least one group of >= 1 experts, got {self.expert_groups}")
        if self.top_k != 0:
            raise ConfigError(f"peft.top_k={self.top_k}: LoRAMoE routes densely over all experts; use top_k=0")
        if not 0.0 <= self.lbc_delta < 1.0:
            raise ConfigError(f"peft.lbc_delta must be in [0, 1), got {self.lbc_delta}")
        if self.type_labels and (not self.type_field or len(self.type_labels) != len(self.expert_groups)
                                 or len(set(map(str, self.type_labels))) != len(self.type_labels)):
            raise ConfigError(f"peft.type_labels={self.type_labels} must name each of the {len(self.expert_groups)} "
                              "groups of peft.expert_groups once, in order, and needs peft.type_field (the column "
                              "that holds them)")
        if self.type_field is not None and not (isinstance(self.type_field, str) and self.type_field):
            raise ConfigError(f"peft.type_field must be a column name, got {self.type_field!r}")
        if not 0 <= self.sample_type < len(self.expert_groups):
            raise ConfigError(f"peft.sample_type={self.sample_type} must name a group, 0..{len(self.expert_groups) - 1}")


def ffn_linears(model: nn.Module) -> list[str]:
    """Dotted paths of every linear layer inside each decoder layer's FFN."""
    out = []
    for path, layer in decoder_layers(model):
        ffn = f"{path}.{sublayer(path, layer, 'ffn')}"
        out += [f"{ffn}.{n}" for n, m in model.get_submodule(ffn).named_modules() if n and isinstance(m, LINEAR_TYPES)]
    return out


def apply(model: nn.Module, cfg: LoRAMoEConfig) -> None:
    targets = ffn_linears(model) if cfg.targets == "ffn" else cfg.targets
    moe_lora.apply(model, dataclasses.replace(cfg, targets=targets))


def coefficients(groups: list[int], delta: float, device=None) -> torch.Tensor:
    """I [N, M]: 1 + δ where expert n belongs to group m, else 1 - δ."""
    owner = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(groups))
    same = owner[:, None] == torch.arange(len(groups))[None, :]
    return torch.where(same, 1.0 + delta, 1.0 - delta).to(device)


def localized_balance(probs: torch.Tensor, types: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """σ²(Z) / μ(Z), Z = I ∘ Q, Q [N, M] = Σ over tokens of type m of probs[:, n] / K.
    probs [K, N], types [K] (0..M-1), coef I [N, M]."""
    onehot = torch.nn.functional.one_hot(types, coef.shape[1]).to(probs.dtype)
    z = coef.to(probs.dtype) * (probs.T @ onehot) / probs.shape[0]
    return z.var(unbiased=False) / z.mean()


def token_types(batch: dict, mask: torch.Tensor | None, shape: torch.Size, default: int) -> torch.Tensor:
    """The sample type of every real token, [K], in the order ``moe_lora.routings`` keeps them;
    ``batch["sample_type"]`` is [B] (one per row) or [B, T] (packed rows: one per token)."""
    types = batch.get("sample_type")
    types = torch.full(shape[:1], default, dtype=torch.long) if types is None else torch.as_tensor(types).long()
    types = types.to(mask.device if mask is not None else "cpu")
    per_token = types if types.dim() == 2 else types[:, None].expand(*shape)
    return per_token[mask] if mask is not None else per_token.reshape(-1)


def aux_loss(model: nn.Module, cfg: LoRAMoEConfig, batch: dict) -> torch.Tensor | None:
    """β · mean over adapted layers of L_lbc for the micro-batch just run (real tokens only)."""
    terms = []
    shape = batch["input_ids"].shape
    for _, probs, _, mask in moe_lora.routings(model, batch):
        types = token_types(batch, mask, shape, cfg.sample_type).to(probs.device)
        terms.append(localized_balance(probs, types, coefficients(cfg.expert_groups, cfg.lbc_delta, probs.device)))
    if not terms:
        return None
    aux = torch.stack(terms).mean()
    moe_lora.record_aux(model, aux)
    return cfg.aux_loss_coef * aux if cfg.aux_loss_coef else None


def to_peft_config(cfg: LoRAMoEConfig, model: nn.Module) -> dict:
    return {**moe_lora.to_peft_config(cfg, model), "peft_type": "LORAMOE", "expert_groups": list(cfg.expert_groups),
            "lbc_delta": cfg.lbc_delta, "sample_type": cfg.sample_type}


def from_peft_config(d: dict) -> LoRAMoEConfig:
    base = moe_lora.from_peft_config(d)
    return LoRAMoEConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name != "method"},
                         expert_groups=list(d["expert_groups"]), lbc_delta=float(d["lbc_delta"]),
                         sample_type=int(d.get("sample_type", 0)))


register(Method(
    name="loramoe", config_cls=LoRAMoEConfig, apply=apply, merge=None, peft_type="LORAMOE",
    state_prefixes=("moe_",), to_peft_config=to_peft_config, from_peft_config=from_peft_config,
    aux_loss=aux_loss, on_step=moe_lora.on_step,
))
