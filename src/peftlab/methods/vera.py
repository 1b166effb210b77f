"""VeRA: vector-based random matrix adaptation.

Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation" (2024), arXiv:2310.11454.

    h = W x + Λ_b B Λ_d A x,      Λ_b = diag(b) [out], Λ_d = diag(d) [r]

One pair of frozen random matrices A [r, in_max] and B [out_max, r] is shared by every adapted
layer (each layer uses the top-left slice A[:, :in], B[:out, :]); only the scaling vectors b
(zero-initialised, so the model starts as the base) and d (``d_initial``) train. A and B are
Kaiming-uniform draws from a generator seeded with ``projection_prng_key`` — the same draws as
Hugging Face PEFT — so they are regenerated on load and never stored (PEFT's
``save_projection=false``). Trainable parameters per layer: out + r, so r can be large (256).

Mergeable: W <- W + (b ⊙ B)(d ⊙ A).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..model.params import freeze
from ..model.targets import (
    LINEAR_TYPES,
    find_targets,
    layer_dtype_device,
    linear_shape,
    peft_target_modules,
    replace_module,
)
from ..registry import register
from . import peft_format
from .lowrank import factor_dtype, merge_delta, wide
from .merging import merge_wrappers
from .modules_to_save import add_additional_targets

HOLDER = "peftlab_vera"  # the shared projections hang off the model under this name


@dataclass
class VeRAConfig:
    default_lr = 2e-2  # train.lr when unset (not a key): docs/results.md §2b
    method: str = "vera"
    r: int = 256
    targets: str | list[str] = "all-linear"
    dropout: float = 0.0
    d_initial: float = 0.1  # initial value of every entry of d
    projection_prng_key: int = 0  # seed of the shared random A and B
    additional_targets: list[str] | None = None
    init_from: str | None = None
    merge_first: list[str] | None = None

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"peft.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {self.dropout}")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(3) * sqrt(2) / sqrt(fan_in), drawn from ``generator`` (fan_in = shape[1])."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The shared frozen A [r, in_max] and B [out_max, r] (non-persistent buffers: never saved)."""

    def __init__(self, r: int, in_max: int, out_max: int, seed: int, device: torch.device):
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", kaiming_uniform((r, in_max), g).to(device), persistent=False)
        self.register_buffer("vera_B", kaiming_uniform((out_max, r), g).to(device), persistent=False)


class VeRALinear(nn.Module):
    """A frozen linear layer plus b ⊙ B (d ⊙ A x). x [..., in] -> [..., out].

    ``vera_lambda_b`` [out] and ``vera_lambda_d`` [r] train; A and B come from the shared
    ``VeRAProjections`` (held by reference, not as a submodule).
    """

    def __init__(self, base_layer: nn.Module, projections: VeRAProjections, cfg: VeRAConfig):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        self.r = cfg.r
        self.__dict__["projections"] = projections  # shared; not registered as a child
        dtype, device = layer_dtype_device(base_layer)
        dtype = factor_dtype(dtype)
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype))
        self.vera_lambda_d = nn.Parameter(torch.full((cfg.r,), cfg.d_initial, device=device, dtype=dtype))
        self.vera_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def fan_in_fan_out(self) -> bool:
        from transformers.pytorch_utils import Conv1D

        return isinstance(self.base_layer, Conv1D)

    def _ab(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.projections
        return p.vera_A[:, : self.in_features], p.vera_B[: self.out_features, :]

    def delta_weight(self) -> torch.Tensor:
        a, b = self._ab()
        delta = (wide(self.vera_lambda_b)[:, None] * wide(b)) @ (wide(self.vera_lambda_d)[:, None] * wide(a))
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a, b = self._ab()
        d = self.vera_lambda_d
        h = self.vera_dropout(x.to(d.dtype)) @ a.to(d.dtype).T  # [..., r]
        out = (h * d) @ b.to(d.dtype).T * self.vera_lambda_b
        return result + out.to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, merged={self.merged}"


def apply(model: nn.Module, cfg: VeRAConfig) -> None:
    freeze(model)
    paths = find_targets(model, cfg.targets, kinds=LINEAR_TYPES)
    shapes = [linear_shape(model.get_submodule(p)) for p in paths]
    in_max, out_max = max(s[0] for s in shapes), max(s[1] for s in shapes)
    _, device = layer_dtype_device(model.get_submodule(paths[0]))
    projections = VeRAProjections(cfg.r, in_max, out_max, cfg.projection_prng_key, device)
    setattr(model, HOLDER, projections)  # one copy, moved with the model by .to()

    for path in paths:
        replace_module(model, path, VeRALinear(model.get_submodule(path), projections, cfg))
    add_additional_targets(model, cfg.additional_targets)


def merge(model: nn.Module) -> None:
    merge_wrappers(model, (VeRALinear,), merge_delta)


def to_peft_config(cfg: VeRAConfig, model: nn.Module) -> dict:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, VeRALinear)}
    return {
        "peft_type": "VERA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "target_modules": peft_target_modules(model, cfg.targets, list(layers)),
        "projection_prng_key": cfg.projection_prng_key,
        "save_projection": False,
        "vera_dropout": cfg.dropout,
        "d_initial": cfg.d_initial,
        "fan_in_fan_out": peft_format.fan_in_fan_out(layers.values()),
        "bias": "none",
        "modules_to_save": peft_format.additional_targets_for_peft(cfg),
        "inference_mode": True,
    }


def from_peft_config(d: dict) -> VeRAConfig:
    targets = peft_format.peft_targets(d, "VeRA")
    return VeRAConfig(
        r=int(d["r"]),
        targets=targets,
        dropout=float(d.get("vera_dropout", 0.0) or 0.0),
        d_initial=float(d.get("d_initial", 0.1)),
        projection_prng_key=int(d.get("projection_prng_key", 0)),
        additional_targets=peft_format.additional_targets_from_peft(d),
    )


OWN = ("vera_lambda_b", "vera_lambda_d")
_from_file = peft_format.make_from_peft_keys(OWN)


def from_peft_keys(state: dict) -> dict:
    """PEFT files saved with ``save_projection=true`` also hold the shared A/B (``base_model.vera_A``);
    they are regenerated from the seed here, so they are dropped."""
    return _from_file({k: v for k, v in state.items() if k not in ("base_model.vera_A", "base_model.vera_B")})


register(
    peft_format.family_method(
        "vera", VeRAConfig, apply, OWN,
        merge=merge,
        peft_type="VERA",
        to_peft_config=to_peft_config,
        from_peft_config=from_peft_config,
        from_peft_keys=from_peft_keys,
    )
)
