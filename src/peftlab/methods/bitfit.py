"""BitFit: train only the bias terms.

Ben Zaken, Goldberg & Ravfogel, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models" (2022), arXiv:2106.10199.

    y = W x + b,    only b trains — every bias in the model, LayerNorm's β included

Trainable: the number of bias values (GPT-2 small: 12·11·768 + 768 = 102,144; per block the
biases of c_attn (3d), attn.c_proj (d), c_fc (4d), mlp.c_proj (d), ln_1 and ln_2 (d each)).

Llama-style models have no biases at all (bias-free linear layers, RMSNorm without β): there BitFit
has nothing to train and ``apply`` says so. ``peft.add_biases=true`` is the explicit way out: it
gives the linear layers in ``peft.targets`` (default all-linear) zero-initialised biases, which
then train with any biases the model already has. Zero biases leave the model unchanged at step 0.

Merging is the identity (the biases are the model's own). ``merge`` additionally makes added biases
exportable: on architectures with ``attention_bias`` / ``mlp_bias`` config flags (Llama, Mistral, ...)
it gives every attention / MLP projection of that family a bias (zero where none was added) and
sets the flag, so the merged model saves and reloads as a plain Hugging Face model.
PEFT has no BitFit method: files use peft_type ``BITFIT`` and hold every bias under PEFT's prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..model.params import freeze
from ..model.targets import find_targets, linear_shape
from ..registry import Method, register

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass
class BitFitConfig:
    method: str = "bitfit"
    add_biases: bool = False  # give bias-free linear layers in peft.targets a zero bias (Llama has none)
    targets: str | list[str] = "all-linear"  # where add_biases adds them


def _biases(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if n.split(".")[-1] == "bias"]


def _add_bias(layer: nn.Module) -> None:
    _, out_f = linear_shape(layer)
    w = layer.weight
    layer.bias = nn.Parameter(torch.zeros(out_f, device=w.device, dtype=w.dtype))


def apply(model: nn.Module, cfg: BitFitConfig) -> None:
    freeze(model)
    if cfg.add_biases:
        for path in find_targets(model, cfg.targets):
            layer = model.get_submodule(path)
            if getattr(layer, "bias", None) is None:
                _add_bias(layer)
    biases = _biases(model)
    if not biases:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise ConfigError(
            f"bitfit: the {kind} model has no bias parameters (its linear layers are bias-free and its "
            "norms have no β), so there is nothing to train; set peft.add_biases=true to add "
            "zero-initialised biases to peft.targets (default all-linear) and train those"
        )
    for _, p in biases:
        p.requires_grad_(True)


def merge(model: nn.Module) -> None:
    """Nothing to fold; make added biases exportable where the config has bias flags (see module doc)."""
    cfg = model.config
    for flag, names in (("attention_bias", ATTN_PROJ), ("mlp_bias", MLP_PROJ)):
        if getattr(cfg, flag, None) is not False:
            continue  # no such flag, or biases already declared
        layers = [m for n, m in model.named_modules() if n.split(".")[-1] in names and isinstance(m, nn.Linear)]
        if any(m.bias is not None for m in layers):
            for m in layers:
                if m.bias is None:
                    _add_bias(m)
            setattr(cfg, flag, True)


def to_peft_config(cfg: BitFitConfig, model: nn.Module) -> dict:
    return {"peft_type": "BITFIT", "task_type": "CAUSAL_LM", "add_biases": cfg.add_biases,
            "target_modules": cfg.targets, "inference_mode": True}


def from_peft_config(d: dict) -> BitFitConfig:
    return BitFitConfig(add_biases=bool(d.get("add_biases", False)), targets=d.get("target_modules", "all-linear"))


register(Method(
    name="bitfit", config_cls=BitFitConfig, apply=apply, merge=merge, peft_type="BITFIT", state_prefixes=("bias",),
    to_peft_config=to_peft_config, from_peft_config=from_peft_config, edits_base=lambda cfg: True,
))
