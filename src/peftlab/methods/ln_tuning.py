"""LN tuning: train only the normalisation layers (a trained copy of each, the original kept frozen).

Zhao et al., "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning" (2024),
arXiv:2312.11420.

    LN(x) = γ ⊙ (x − μ) / σ + β   (RMSNorm: γ ⊙ x / rms(x)),   only γ (and β) train

Each selected module is wrapped: ``base_layer`` is the frozen original, ``ln_tuning_layers`` a
trainable copy that computes the output (PEFT's layout, so the file keys are PEFT's:
``<layer>.ln_tuning_layers.weight``, peft_type ``LN_TUNING``). The copy starts equal to the original,
so the model starts as the base. Default targets: every normalisation layer (a module whose class
name ends in ``Norm``: LayerNorm, LlamaRMSNorm, ...) — for Llama and GPT-2 the same set as PEFT's
defaults (input/post-attention norms and the final norm; ln_1, ln_2, ln_f). Any other module with
parameters can be named in ``peft.targets`` too.

Merging puts the trained copy in place of the original (exact). Trainable: the parameters of the
selected modules — Llama L·2d + d, GPT-2 L·4d + 2d (SmolLM2: 35,136).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..model.params import freeze
from ..model.targets import find_targets, peft_target_modules, replace_module
from ..registry import register
from . import peft_format
from .merging import merge_wrappers
from .modules_to_save import add_additional_targets

ALL_NORMS = "all-norms"


@dataclass
class LNTuningConfig:
    method: str = "ln_tuning"
    targets: str | list[str] = ALL_NORMS  # all-norms, or module names / a regex
    additional_targets: list[str] | None = None
    init_from: str | None = None
    merge_first: list[str] | None = None


class LNTuningLayer(nn.Module):
    """The frozen original (``base_layer``) and the trainable copy that runs (``ln_tuning_layers``)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.ln_tuning_layers = copy.deepcopy(base_layer)
        self.ln_tuning_layers.requires_grad_(True)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, *args, **kwargs):
        return self.ln_tuning_layers(*args, **kwargs)


def is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Norm") and any(True for _ in module.parameters(recurse=False))


def targets_of(model: nn.Module, cfg: LNTuningConfig) -> list[str]:
    if cfg.targets == ALL_NORMS:
        found = [n for n, m in model.named_modules() if n and is_norm(m)]
        if not found:
            raise ConfigError(f"peft.targets={ALL_NORMS} found no normalisation layer in {type(model).__name__}; "
                              "name the modules to train in peft.targets")
        return found
    found = find_targets(model, cfg.targets, kinds=(nn.Module,))
    empty = [p for p in found if not any(True for _ in model.get_submodule(p).parameters())]
    if empty:
        raise ConfigError(f"peft.targets selects {empty[0]!r}, which has no parameters to train")
    return found


def apply(model: nn.Module, cfg: LNTuningConfig) -> None:
    freeze(model)
    for path in targets_of(model, cfg):
        replace_module(model, path, LNTuningLayer(model.get_submodule(path)))
    add_additional_targets(model, cfg.additional_targets)


def _take_copy(layer: LNTuningLayer) -> None:
    layer.ln_tuning_layers.requires_grad_(False)
    layer.base_layer = layer.ln_tuning_layers


def merge(model: nn.Module) -> None:
    """The trained copies replace the originals."""
    merge_wrappers(model, (LNTuningLayer,), _take_copy)


def to_peft_config(cfg: LNTuningConfig, model: nn.Module) -> dict:
    found = [n for n, m in model.named_modules() if isinstance(m, LNTuningLayer)]
    return {
        "peft_type": "LN_TUNING",
        "task_type": "CAUSAL_LM",
        "target_modules": peft_target_modules(model, cfg.targets, found),
        "modules_to_save": peft_format.additional_targets_for_peft(cfg),
        "inference_mode": True,
    }


def from_peft_config(d: dict) -> LNTuningConfig:
    if d.get("exclude_modules"):
        raise ConfigError(f"adapter_config.json has exclude_modules={d['exclude_modules']!r}, which peftlab's "
                          "LN tuning does not load")
    targets = d.get("target_modules")
    if not targets:
        raise ConfigError("adapter_config.json has no target_modules (PEFT fills them in when it saves)")
    return LNTuningConfig(targets=targets if isinstance(targets, str) else list(targets),
                          additional_targets=peft_format.additional_targets_from_peft(d))


register(peft_format.family_method("ln_tuning", LNTuningConfig, apply, ("ln_tuning_layers",), merge=merge,
                                   peft_type="LN_TUNING", to_peft_config=to_peft_config,
                                   from_peft_config=from_peft_config))
