"""Compacter: bottleneck adapters whose projections are sums of Kronecker products (PHM layers).

Karimi Mahabadi, Henderson & Ruder, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers"
(2021), arXiv:2106.04647.

    A(h) = W_up f(W_down h + b_down) + b_up                      the bottleneck adapter (adapter.py)
    W    = Σ_{i=1..n} A_i ⊗ B_i,   A_i ∈ R^{n×n},   B_i = s_i t_iᵀ ∈ R^{(o/n)×(i/n)},   s_i [o/n, r], t_i [i/n, r]

Every projection W ∈ R^{o×i} (W_down: o = b, i = d; W_up: o = d, i = b) is a parameterised
hypercomplex multiplication (PHM) layer. The "slow" rules A_1..A_n (``phm_rule`` [n, n, n]) are
shared by every projection of every adapter; the "fast" B_i are per projection and rank r
(``phm_s``, ``phm_t``; the paper uses r = 1). Placement is the bottleneck adapter's, serial
(Houlsby): ``sites=[attn, ffn]`` is Compacter, ``sites=[ffn]`` Compacter++.

Init: A_i ~ N(0, 1/n), s ~ N(0, 1), t ~ N(0, 1/(r·i)) (so W_down's entries have variance ~1/i, as
nn.Linear's); the up projection's s and bias are zero, so W_up = 0 and the model starts as the base.
Trainable: n³ + L·|sites|·(2 r (b + d) + b + d); n must divide d and b.

Cannot merge (the nonlinearity sits between the projections). PEFT has no Compacter: files use
peft_type ``COMPACTER``; the shared rules are held once by the model (``peftlab_compacter.phm_rule``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..model.params import freeze
from ..registry import Method, register
from .adapter import ACTIVATIONS, SITES, add_adapters
from .virtual_tokens import model_dims

HOLDER = "peftlab_compacter"


@dataclass
class CompacterConfig:
    method: str = "compacter"
    sites: list[str] = field(default_factory=lambda: ["attn", "ffn"])  # [ffn]: Compacter++
    bottleneck: int = 64  # b
    phm_dim: int = 4  # n: Kronecker terms, size of each shared rule A_i
    phm_rank: int = 1  # r of each fast B_i = s_i t_iᵀ
    activation: str = "gelu"

    def validate(self) -> None:
        bad = [s for s in self.sites if s not in SITES]
        if bad or not self.sites:
            raise ConfigError(f"peft.sites {self.sites!r}: give one or both of {', '.join(SITES)}")
        for key in ("bottleneck", "phm_dim", "phm_rank"):
            if getattr(self, key) < 1:
                raise ConfigError(f"peft.{key} must be >= 1, got {getattr(self, key)}")
        if self.bottleneck % self.phm_dim:
            raise ConfigError(f"peft.phm_dim={self.phm_dim} must divide peft.bottleneck={self.bottleneck}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"peft.activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")


class PHMRules(nn.Module):
    """The shared slow weights ``phm_rule`` [n, n, n] (A_1..A_n), one copy held by the model."""

    def __init__(self, n: int, device=None):
        super().__init__()
        self.phm_rule = nn.Parameter(torch.randn(n, n, n, device=device) / n**0.5)


class PHMLinear(nn.Module):
    """y = x Wᵀ + b with W = Σ_i A_i ⊗ (s_i t_iᵀ): x [..., in] -> [..., out], fp32.

    ``phm_s`` [n, out/n, r], ``phm_t`` [n, in/n, r], ``bias`` [out]; the rules are the shared ``PHMRules``.
    """

    def __init__(self, in_f: int, out_f: int, rules: PHMRules, r: int, zero: bool):
        super().__init__()
        n = rules.phm_rule.shape[0]
        device = rules.phm_rule.device
        self.__dict__["rules"] = rules  # shared; not registered as a child
        self.in_features, self.out_features = in_f, out_f
        self.phm_s = nn.Parameter(torch.zeros(n, out_f // n, r, device=device) if zero
                                  else torch.randn(n, out_f // n, r, device=device))
        self.phm_t = nn.Parameter(torch.randn(n, in_f // n, r, device=device) / (r * in_f) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_f, device=device))

    def weight(self) -> torch.Tensor:
        """W [out, in] = Σ_i kron(A_i, s_i t_iᵀ)."""
        a = self.rules.phm_rule.to(self.phm_s.dtype)
        b = self.phm_s @ self.phm_t.transpose(1, 2)  # [n, out/n, in/n]
        return torch.einsum("ipu,iqv->pquv", a, b).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, n={self.phm_s.shape[0]}, r={self.phm_s.shape[2]}"


def apply(model: nn.Module, cfg: CompacterConfig) -> None:
    freeze(model)
    d, n = model_dims(model)["d"], cfg.phm_dim
    if d % n:
        raise ConfigError(f"peft.phm_dim={n} must divide the model's hidden size {d}; choose a divisor of {d}")
    device = model.get_input_embeddings().weight.device
    rules = PHMRules(n, device)
    setattr(model, HOLDER, rules)
    add_adapters(model, "serial", cfg.sites, cfg.bottleneck, cfg.activation, 1.0,
                 projection=lambda i, o, zero: PHMLinear(i, o, rules, cfg.phm_rank, zero))


def to_peft_config(cfg: CompacterConfig, model: nn.Module) -> dict:
    return {"peft_type": "COMPACTER", "task_type": "CAUSAL_LM", "sites": list(cfg.sites), "bottleneck": cfg.bottleneck,
            "phm_dim": cfg.phm_dim, "phm_rank": cfg.phm_rank, "activation": cfg.activation, "inference_mode": True}


def from_peft_config(d: dict) -> CompacterConfig:
    return CompacterConfig(sites=list(d["sites"]), bottleneck=int(d["bottleneck"]), phm_dim=int(d["phm_dim"]),
                           phm_rank=int(d["phm_rank"]), activation=d.get("activation", "gelu"))


register(Method(
    name="compacter", config_cls=CompacterConfig, apply=apply, merge=None, peft_type="COMPACTER",
    state_prefixes=("adapter_", HOLDER), to_peft_config=to_peft_config, from_peft_config=from_peft_config,
))
