"""LoRA: low-rank adaptation of frozen linear layers.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), arXiv:2106.09685.

    h = W x + s * B A x,     s = alpha / r        (rsLoRA, arXiv:2312.03732: s = alpha / sqrt(r))

W [out, in] is frozen; A [r, in] starts Kaiming-uniform (a = sqrt(5)), B [out, r] starts at zero
so the adapted model equals the base at step 0. Dropout (when > 0) applies to the input of the
LoRA path only. Works on ``nn.Linear`` and on GPT-2's ``Conv1D``, whose weight is stored
transposed ([in, out]); the file layout is PEFT's either way (``lora_A.weight`` [r, in],
``lora_B.weight`` [out, r], ``fan_in_fan_out`` set for Conv1D).

Merging is explicit: ``LoRALinear.merge()`` adds s·BA into W, ``unmerge()`` subtracts it, and
neither ``.eval()`` nor ``.train()`` touches it. ``merge(model)`` folds every LoRA layer into
its base and puts the plain base layers back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from ..model.params import freeze
from ..model.targets import find_targets, linear_shape, peft_target_modules, set_submodule
from ..registry import Method, register
from . import lora_kernels

INITS = ("kaiming", "gaussian")


@dataclass
class LoRAConfig:
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"
    use_rslora: bool = False
    init: str = "kaiming"  # kaiming | gaussian

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"peft.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise ConfigError(f"peft.init {self.init!r} is not one of {', '.join(INITS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    x: [..., in] -> [..., out]. ``lora_A`` [r, in] and ``lora_B`` [out, r] are kept in fp32 (or
    the base dtype when that is fp32/fp64) and the input is cast to them, as PEFT does.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming"):
        super().__init__()
        in_f, out_f = linear_shape(base_layer)
        if not 1 <= r <= min(in_f, out_f):
            raise ConfigError(
                f"peft.r={r} does not fit a layer of shape in={in_f}, out={out_f}: "
                f"the rank must be between 1 and {min(in_f, out_f)}"
            )
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Linear(in_f, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=weight.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora(init)

    def reset_lora(self, init: str = "kaiming") -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:  # code that inspects layer.weight (e.g. dtype checks)
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """s·BA in the base weight's layout ([out, in], or [in, out] for Conv1D), fp32."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged and lora_kernels.fast_path_ok(self, x):  # same math, fewer saved tensors
            return lora_kernels.lora_linear(self, x)
        result = self.base_layer(x)
        if self.merged:
            return result
        a = self.lora_A.weight
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))) * self.scaling
        return result + lora.to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply(model: nn.Module, cfg: LoRAConfig) -> None:
    freeze(model)
    for path in find_targets(model, cfg.targets):
        base = model.get_submodule(path)
        set_submodule(model, path, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.init))


def merge(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight and put the plain layers back."""
    for path, layer in lora_layers(model).items():
        layer.merge()
        set_submodule(model, path, layer.base_layer)


def to_peft_config(cfg: LoRAConfig, model: nn.Module) -> dict:
    layers = lora_layers(model)
    found = list(layers)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": peft_target_modules(model, cfg.targets, found),
        "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True if cfg.init == "kaiming" else "gaussian",
        "inference_mode": True,
    }


def from_peft_config(d: dict) -> LoRAConfig:
    unsupported = {
        "bias": lambda v: v not in (None, "none"),
        "use_dora": bool,
        "rank_pattern": bool,
        "alpha_pattern": bool,
        "layers_to_transform": lambda v: v is not None,
        "modules_to_save": bool,
    }
    for key, bad in unsupported.items():
        if key in d and bad(d[key]):
            raise ConfigError(f"adapter_config.json has {key}={d[key]!r}, which the lora method does not load")
    targets = d.get("target_modules")
    if targets is None:
        raise ConfigError("adapter_config.json has no target_modules")
    return LoRAConfig(
        r=int(d["r"]),
        alpha=float(d.get("lora_alpha", d["r"])),
        dropout=float(d.get("lora_dropout", 0.0) or 0.0),
        targets=targets if isinstance(targets, str) else list(targets),
        use_rslora=bool(d.get("use_rslora", False)),
    )


register(
    Method(
        name="lora",
        config_cls=LoRAConfig,
        apply=apply,
        merge=merge,
        peft_type="LORA",
        state_prefixes=("lora_A", "lora_B"),
        to_peft_config=to_peft_config,
        from_peft_config=from_peft_config,
    )
)
