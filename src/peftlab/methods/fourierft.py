"""FourierFT: the weight update as a few trained coefficients of its 2-D Fourier spectrum.

Gao et al., "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform" (ICML 2024),
arXiv:2405.03003.

    ΔW = α · Re(IDFT2(F)),   F [out, in] zero except at n fixed random positions, where F = c

c (``fourierft_spectrum`` [n]) trains; the n positions are the first n of a random permutation of
the out·in entries drawn from a generator seeded with ``random_loc_seed`` — the same draws as
Hugging Face PEFT (``torch.randperm``), so they are recomputed on load and never stored. The same
n and seed for every layer: each layer trains n numbers whatever its size. α = ``scaling``
(the paper: 150 for RoBERTa, 300 for LLaMA instruction tuning). Init: c ~ N(0, 1) as in the paper
and PEFT (the model does not start as the base), or zeros (``init=zeros``: identity at init).

The forward is y = W x + ΔW x with ΔW rebuilt each call (one inverse FFT per layer, PEFT's way);
merging adds ΔW into W (``lowrank.merge_delta``). Works on nn.Linear and GPT-2's Conv1D (as PEFT).
Names and files are PEFT's (``<layer>.fourierft_spectrum``, peft_type ``FOURIERFT``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

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

INITS = ("gaussian", "zeros")


@dataclass
class FourierFTConfig:
    method: str = "fourierft"
    n_frequency: int = 1000  # trained spectral coefficients per layer
    scaling: float = 150.0  # α
    random_loc_seed: int = 777  # seed of the coefficients' positions
    init: str = "gaussian"  # gaussian (paper, PEFT) | zeros (the model starts as the base)
    targets: str | list[str] = "all-linear"
    additional_targets: list[str] | None = None
    init_from: str | None = None
    merge_first: list[str] | None = None

    def validate(self) -> None:
        if self.n_frequency < 1:
            raise ConfigError(f"peft.n_frequency must be >= 1, got {self.n_frequency}")
        if self.init not in INITS:
            raise ConfigError(f"peft.init must be one of {', '.join(INITS)} for fourierft, got {self.init!r}")


def spectral_positions(out_f: int, in_f: int, n: int, seed: int) -> torch.Tensor:
    """[2, n]: (row, column) of the n trained coefficients — PEFT's draw, bit for bit."""
    flat = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_f, flat % in_f])


class FourierFTLinear(nn.Module):
    """A frozen linear layer plus α Re(IDFT2(F)). x [..., in] -> [..., out]."""

    def __init__(self, base_layer: nn.Module, cfg: FourierFTConfig, path: str):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        if cfg.n_frequency > self.in_features * self.out_features:
            raise ConfigError(f"peft.n_frequency={cfg.n_frequency} exceeds the {self.in_features * self.out_features} "
                              f"entries of {path!r}; lower it or choose larger targets")
        self.scaling = cfg.scaling
        dtype, device = layer_dtype_device(base_layer)
        pos = spectral_positions(self.out_features, self.in_features, cfg.n_frequency, cfg.random_loc_seed)
        self.register_buffer("positions", pos.to(device), persistent=False)
        init = torch.randn(cfg.n_frequency) if cfg.init == "gaussian" else torch.zeros(cfg.n_frequency)
        self.fourierft_spectrum = nn.Parameter(init.to(device=device, dtype=factor_dtype(dtype)))
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def delta(self) -> torch.Tensor:
        """ΔW [out, in] in fp32 (fp64 for fp64 coefficients): the inverse FFT never runs in half precision."""
        c = wide(self.fourierft_spectrum)
        dense = c.new_zeros(self.out_features, self.in_features).index_put((self.positions[0], self.positions[1]), c)
        return torch.fft.ifft2(dense).real * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the base weight's layout (Conv1D: [in, out])."""
        d = self.delta()
        return d.T if isinstance(self.base_layer, Conv1D) else d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        w = self.delta().to(self.fourierft_spectrum.dtype)
        return result + F.linear(x.to(w.dtype), w).to(result.dtype)

    def extra_repr(self) -> str:
        return f"n_frequency={self.fourierft_spectrum.numel()}, scaling={self.scaling:g}, merged={self.merged}"


def apply(model: nn.Module, cfg: FourierFTConfig) -> None:
    freeze(model)
    for path in find_targets(model, cfg.targets, kinds=LINEAR_TYPES):
        replace_module(model, path, FourierFTLinear(model.get_submodule(path), cfg, path))
    add_additional_targets(model, cfg.additional_targets)


def merge(model: nn.Module) -> None:
    merge_wrappers(model, (FourierFTLinear,), merge_delta)


def to_peft_config(cfg: FourierFTConfig, model: nn.Module) -> dict:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FourierFTLinear)}
    return {
        "peft_type": "FOURIERFT",
        "task_type": "CAUSAL_LM",
        "n_frequency": cfg.n_frequency,
        "scaling": cfg.scaling,
        "random_loc_seed": cfg.random_loc_seed,
        "init_weights": cfg.init == "zeros",
        "target_modules": peft_target_modules(model, cfg.targets, list(layers)),
        "fan_in_fan_out": peft_format.fan_in_fan_out(layers.values()),
        "n_frequency_pattern": {},
        "bias": "none",
        "modules_to_save": peft_format.additional_targets_for_peft(cfg),
        "inference_mode": True,
    }


def from_peft_config(d: dict) -> FourierFTConfig:
    for key in ("n_frequency_pattern", "layers_to_transform", "exclude_modules"):
        if d.get(key):
            raise ConfigError(f"adapter_config.json has {key}={d[key]!r}, which peftlab's FourierFT does not load")
    return FourierFTConfig(
        n_frequency=int(d.get("n_frequency", 1000)), scaling=float(d.get("scaling", 150.0)),
        random_loc_seed=int(d.get("random_loc_seed", 777)), init="zeros" if d.get("init_weights") else "gaussian",
        targets=peft_format.peft_targets(d, "FourierFT"), additional_targets=peft_format.additional_targets_from_peft(d),
    )


register(peft_format.family_method("fourierft", FourierFTConfig, apply, ("fourierft_spectrum",), merge=merge,
                                   peft_type="FOURIERFT", to_peft_config=to_peft_config,
                                   from_peft_config=from_peft_config))
