"""MoE-LoRA: several LoRA experts per adapted layer, mixed by a learned router.

Zadouri et al., "Pushing Mixture of Experts to the Limit: Extremely Parameter Efficient MoE for
Instruction Tuning" (MoLoRA, 2023), arXiv:2309.05444 — soft routing.
Gao et al., "Higher Layers Need More LoRA Experts" (MoLA, 2024), arXiv:2402.08562 — top-k routing
with per-layer expert counts.
Fedus et al., "Switch Transformers" (2022), arXiv:2101.03961 — the load-balancing loss.

    h = W x + s · Σ_i g_i(x) B_i A_i x,      A_i ∈ R^{r×in}, B_i ∈ R^{out×r} (zero at init), s = α/r
    soft (top_k = 0):  g(x) = softmax(W_r x)                        over all N experts
    top-k:             g(x) = softmax over the k largest of W_r x    (0 elsewhere)
    L_aux = coef · N · Σ_i f_i · P_i     f_i: share of tokens whose top-k includes expert i (/k),
                                         P_i: mean router probability of expert i (real tokens only)

``num_experts`` is one count for every layer, one per decoder layer, or one per group of
consecutive layers (``[2, 4, 6, 8]`` splits the layers into four groups; MoLA's "▽" shape puts more
experts higher up). Trainable per adapted linear: N·r·(in + out) + N·in (the router has no bias).
Experts are computed as one rank-N·r product whose middle is scaled by the gates, so top-k shapes
learning but does not skip compute. Router statistics (per-expert load, router entropy, L_aux) are
added to the metrics of every optimizer step. Cannot merge (the mixture depends on the input).
PEFT has no MoE-LoRA: files use peft_type ``MOE_LORA`` with PEFT's key prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..model.params import freeze
from ..model.targets import find_targets, layer_dtype_device, linear_shape, peft_target_modules, set_submodule
from ..registry import Method, StepEffects, register
from .adapter import decoder_layers
from .lora import check_alpha


@dataclass
class MoELoRAConfig:
    method: str = "moe_lora"
    r: int = 8  # rank of each expert
    alpha: float = 16.0
    num_experts: int | list[int] = 4  # N: one count, one per layer, or one per group of layers
    top_k: int = 0  # 0: soft routing over all experts (MoLoRA); k >= 1: top-k (MoLA)
    targets: str | list[str] = "all-linear"
    dropout: float = 0.0
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss (0 disables it)

    def validate(self) -> None:
        counts = self.num_experts if isinstance(self.num_experts, list) else [self.num_experts]
        if not counts or min(counts) < 1:
            raise ConfigError(f"peft.num_experts must be >= 1 (or a list of such counts), got {self.num_experts}")
        if self.r < 1:
            raise ConfigError(f"peft.r must be >= 1, got {self.r}")
        check_alpha(self.alpha)
        if self.top_k < 0 or self.top_k > min(counts):
            raise ConfigError(f"peft.top_k={self.top_k} must be 0 (soft) or between 1 and the smallest "
                              f"expert count {min(counts)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {self.dropout}")
        if self.aux_loss_coef < 0:
            raise ConfigError(f"peft.aux_loss_coef must be >= 0, got {self.aux_loss_coef}")


class MoELoRALinear(nn.Module):
    """A frozen linear layer plus N gated LoRA experts.

    x: [..., in] -> [..., out]. ``moe_A.weight`` [N·r, in] stacks A_1..A_N, ``moe_B.weight``
    [out, N·r] stacks B_1..B_N, ``moe_router.weight`` [N, in]; fp32, the input cast to them.
    In training mode the last forward's router probabilities [..., N] and top-k choices are kept
    for the load-balancing loss.
    """

    def __init__(self, base_layer: nn.Module, num_experts: int, r: int, alpha: float, top_k: int = 0,
                 dropout: float = 0.0):
        super().__init__()
        in_f, out_f = linear_shape(base_layer)
        self.base_layer = base_layer
        self.num_experts, self.r, self.top_k = num_experts, r, top_k
        self.scaling = alpha / r
        dtype, device = layer_dtype_device(base_layer)  # a quantised base has no float weight
        kw = {"device": device, "dtype": dtype if dtype in (torch.float32, torch.float64) else torch.float32}
        self.moe_A = nn.Linear(in_f, num_experts * r, bias=False, **kw)
        self.moe_B = nn.Linear(num_experts * r, out_f, bias=False, **kw)
        self.moe_router = nn.Linear(in_f, num_experts, bias=False, **kw)
        self.moe_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            for a in self.moe_A.weight.view(num_experts, r, in_f):  # each expert as LoRA's A
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.moe_B.weight)
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None  # (probs, chosen) of the last forward

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gates g [..., N], router probabilities [..., N], chosen experts as a 0/1 mask [..., N])."""
        logits = self.moe_router(x)
        probs = logits.softmax(-1)
        if self.top_k == 0:
            chosen = F.one_hot(probs.argmax(-1), self.num_experts).to(probs.dtype)
            return probs, probs, chosen
        top, idx = logits.topk(self.top_k, dim=-1)
        g = torch.zeros_like(logits).scatter(-1, idx, top.softmax(-1))
        chosen = torch.zeros_like(logits).scatter(-1, idx, 1.0)
        return g, probs, chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        xa = x.to(self.moe_A.weight.dtype)
        g, probs, chosen = self.gates(xa)
        if self.training:
            self.last_routing = (probs, chosen)
        a = self.moe_A(self.moe_dropout(xa))  # [..., N·r]
        a = (a.unflatten(-1, (self.num_experts, self.r)) * g.unsqueeze(-1)).flatten(-2)
        return result + (self.moe_B(a) * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, r={self.r}, top_k={self.top_k or 'soft'}"


def moe_layers(model: nn.Module) -> dict[str, MoELoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoELoRALinear)}


def experts_per_layer(counts: int | list[int], num_layers: int) -> list[int]:
    """N for each decoder layer: one count, one per layer, or one per group of consecutive layers."""
    counts = counts if isinstance(counts, list) else [counts]
    if len(counts) > num_layers:
        raise ConfigError(f"peft.num_experts has {len(counts)} entries but the model has {num_layers} layers")
    return [counts[i * len(counts) // num_layers] for i in range(num_layers)]


def apply(model: nn.Module, cfg: MoELoRAConfig) -> None:
    freeze(model)
    layer_paths = [p for p, _ in decoder_layers(model)]
    per_layer = experts_per_layer(cfg.num_experts, len(layer_paths))
    for path in find_targets(model, cfg.targets):
        owner = [i for i, lp in enumerate(layer_paths) if path.startswith(lp + ".")]
        if not owner and len(set(per_layer)) > 1:
            raise ConfigError(f"peft.targets selects {path!r}, which is in no decoder layer, so per-layer "
                              "expert counts do not apply to it; give one count or adapt layers only")
        n = per_layer[owner[0]] if owner else per_layer[0]
        if cfg.r > min(linear_shape(model.get_submodule(path))):
            raise ConfigError(f"peft.r={cfg.r} does not fit {path} of shape {linear_shape(model.get_submodule(path))}")
        set_submodule(model, path, MoELoRALinear(model.get_submodule(path), n, cfg.r, cfg.alpha, cfg.top_k,
                                                 cfg.dropout))


def _token_mask(batch: dict, shape: torch.Size) -> torch.Tensor | None:
    """[B, T] True on real tokens: the 2-D mask, or the rows of a packed 4-D mask that attend somewhere."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 4:
        mask = mask[:, 0].any(-1) if mask.dtype == torch.bool else (mask[:, 0] == 0).any(-1)
    if mask is not None and mask.dim() == 2 and tuple(mask.shape) == tuple(shape):
        return mask.bool()
    return None


def routings(model: nn.Module, batch: dict):
    """Yield (layer, probs [K, N], chosen [K, N], mask [B, T] or None) of every MoE layer's last training
    forward over the micro-batch's K real tokens (all positions when the batch has no mask), clearing
    it; records the (detached) expert load and router entropy for ``on_step``'s metrics."""
    stats = model.__dict__.setdefault("_moe_stats", {"aux": [], "load": [], "entropy": []})
    for layer in moe_layers(model).values():
        if layer.last_routing is None:
            continue
        probs, chosen = layer.last_routing
        layer.last_routing = None
        mask = _token_mask(batch, probs.shape[:-1])
        if mask is not None:
            probs, chosen = probs[mask], chosen[mask]
        probs, chosen = probs.reshape(-1, layer.num_experts), chosen.reshape(-1, layer.num_experts)
        if probs.shape[0] == 0:
            continue
        f = chosen.mean(0) / chosen.sum(-1).mean()  # share of routed slots per expert, sums to 1
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean() / math.log(max(layer.num_experts, 2))
        stats["load"].append(f.detach())
        stats["entropy"].append(float(entropy.detach()))
        yield layer, probs, chosen, mask


def record_aux(model: nn.Module, aux: torch.Tensor) -> None:
    """The micro-batch's auxiliary loss (before its coefficient), for ``on_step``'s ``moe_aux_loss``."""
    model.__dict__["_moe_stats"]["aux"].append(float(aux.detach()))


def aux_loss(model: nn.Module, cfg: MoELoRAConfig, batch: dict) -> torch.Tensor | None:
    """coef · mean over routers of N · Σ_i f_i P_i for the micro-batch just run (real tokens only)."""
    terms = []
    for layer, probs, chosen, _ in routings(model, batch):
        f = chosen.mean(0) / chosen.sum(-1).mean()
        terms.append(layer.num_experts * (f * probs.mean(0)).sum())
    if not terms:
        return None
    aux = torch.stack(terms).mean()
    record_aux(model, aux)
    return cfg.aux_loss_coef * aux if cfg.aux_loss_coef else None


def on_step(model: nn.Module, cfg: MoELoRAConfig, step: int) -> StepEffects | None:
    """Router statistics of the step just taken: L_aux (before coef), expert load, router entropy."""
    stats = model.__dict__.pop("_moe_stats", None)
    if not stats or not stats["load"]:
        return None
    loads = stats["load"]
    out = {"moe_aux_loss": round(sum(stats["aux"]) / max(len(stats["aux"]), 1), 6),
           "moe_load_max": round(max(float(f.max()) for f in loads), 4),  # 1/N is perfectly balanced
           "moe_load_min": round(min(float(f.min()) for f in loads), 4),
           "moe_router_entropy": round(sum(stats["entropy"]) / len(stats["entropy"]), 4)}  # 1 = uniform
    if len({f.numel() for f in loads}) == 1:
        out["moe_expert_load"] = [round(float(v), 4) for v in torch.stack(loads).mean(0)]
    return StepEffects(metrics=out)


def to_peft_config(cfg: MoELoRAConfig, model: nn.Module) -> dict:
    layers = moe_layers(model)
    return {"peft_type": "MOE_LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
            "num_experts": cfg.num_experts, "top_k": cfg.top_k, "lora_dropout": cfg.dropout,
            "aux_loss_coef": cfg.aux_loss_coef, "target_modules": peft_target_modules(model, cfg.targets, list(layers)),
            "inference_mode": True}


def from_peft_config(d: dict) -> MoELoRAConfig:
    targets = d["target_modules"]
    return MoELoRAConfig(r=int(d["r"]), alpha=float(d["lora_alpha"]), num_experts=d["num_experts"],
                         top_k=int(d.get("top_k", 0)), targets=targets if isinstance(targets, str) else list(targets),
                         dropout=float(d.get("lora_dropout", 0.0)), aux_loss_coef=float(d.get("aux_loss_coef", 0.01)))


register(Method(
    name="moe_lora", config_cls=MoELoRAConfig, apply=apply, merge=None, peft_type="MOE_LORA",
    state_prefixes=("moe_",), to_peft_config=to_peft_config, from_peft_config=from_peft_config,
    aux_loss=aux_loss, on_step=on_step,
))
