"""LoRA's adapter files: its config and tensors in PEFT's layout (``adapter_config.json`` and
``adapter_model.safetensors``), both ways; ``methods/lora.py`` registers them, DoRA, LongLoRA and
the LoRA variants reuse them.

Inits that changed W (PiSSA, OLoRA, CorDA, LoRA-GA) save as a plain LoRA of rank 2r against the
untouched W, s (B A - B0 A0) = s [B, -B0] [A; A0], with the same scaling; EVA saves as a plain
LoRA with its per-layer ranks and alphas (``rank_pattern``, ``alpha_pattern``), as PEFT does. A
PEFT file whose adapter is a delta against PEFT's modified base (``init_lora_weights=pissa``...)
is refused with what to do instead.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..errors import ConfigError
from ..model.targets import peft_target_modules
from ..registry import get
from . import lora_init, peft_format
from .lowrank import WRAPPERS


def _principal(model: nn.Module) -> bool:
    return any(hasattr(m, "lora_A0") for m in model.modules())


def saved_config(cfg, model: nn.Module):
    """Inits that changed W (PiSSA, OLoRA, CorDA, LoRA-GA) are saved as plain LoRA of rank 2r with
    the same scaling; EVA as plain LoRA with its per-layer ranks and alphas (PEFT's patterns)."""
    if cfg.init == "eva":
        layers = [n for n, m in model.named_modules() if isinstance(m, WRAPPERS)]
        ranks, alphas = lora_init.saved_patterns(model, cfg)
        return dataclasses.replace(cfg, init="kaiming", targets=peft_target_modules(model, cfg.targets, layers),
                                   rank_pattern=ranks, alpha_pattern=alphas)
    if cfg.init not in lora_init.RESIDUAL_INITS or not _principal(model):
        return cfg
    alpha = cfg.alpha * (math.sqrt(2) if cfg.use_rslora else 2)
    return dataclasses.replace(cfg, r=2 * cfg.r, alpha=alpha, init="kaiming", pissa_niter=0)


def to_peft_keys(state: dict) -> dict:
    """PEFT's file names; PiSSA/OLoRA factors become [A; A0] and [B, -B0] (a delta against W)."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".lora_A0")]:
        path = key[: -len(".lora_A0")]
        a0, b0 = out.pop(key), out.pop(f"{path}.lora_B0")
        out[f"{path}.lora_A.weight"] = torch.cat([state[f"{path}.lora_A.weight"], a0], dim=0)
        out[f"{path}.lora_B.weight"] = torch.cat([state[f"{path}.lora_B.weight"], -b0], dim=1)
    if any(k.endswith(".lora_A0") for k in state):  # embeddings keep their delta, padded to rank 2r
        for key in [k for k in out if k.endswith(".lora_embedding_A")]:
            out[key] = torch.cat([out[key], torch.zeros_like(out[key])], dim=0)
            bkey = key[: -len("A")] + "B"
            out[bkey] = torch.cat([out[bkey], torch.zeros_like(out[bkey])], dim=1)
    return peft_format.to_peft_keys(out)


def to_peft_config(cfg, model: nn.Module) -> dict:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, WRAPPERS) or hasattr(m, "lora_magnitude_vector")}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": peft_target_modules(model, cfg.targets, list(layers)),
        "fan_in_fan_out": peft_format.fan_in_fan_out(layers.values()),
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.method == "dora",
        "modules_to_save": peft_format.additional_targets_for_peft(cfg),
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else "loftq" if cfg.init == "loftq" else True,
        "inference_mode": True,
        **({"rank_pattern": dict(cfg.rank_pattern)} if cfg.rank_pattern else {}),
        **({"alpha_pattern": dict(cfg.alpha_pattern)} if cfg.alpha_pattern else {}),
        **({"loftq_config": {"loftq_bits": cfg.loftq_bits, "loftq_iter": cfg.loftq_iter}} if cfg.init == "loftq" else {}),
        **({"target_parameters": list(cfg.target_parameters)} if cfg.target_parameters else {}),
    }


UNSUPPORTED = {  # adapter_config.json keys (and the values) peftlab's LoRA cannot load
    "layers_to_transform": lambda v: v is not None,
    "lora_bias": bool,
    "trainable_token_indices": bool,
}


def from_peft_config(d: dict):
    """A PEFT LoRA adapter_config.json -> LoRAConfig (or DoRA's config when ``use_dora``)."""
    targets = peft_format.peft_targets(d, "LoRA")
    for key, bad in UNSUPPORTED.items():
        if key in d and bad(d[key]):
            raise ConfigError(f"adapter_config.json has {key}={d[key]!r}, which peftlab's LoRA does not load")
    init = d.get("init_lora_weights", True)
    if isinstance(init, str) and init not in ("gaussian", "eva", "loftq"):  # EVA's file is plain LoRA
        raise ConfigError(
            f"adapter_config.json has init_lora_weights={init!r}: the adapter is a delta against PEFT's "
            "modified (residual) base, not the original model; save it from PEFT with "
            "path_initial_model_for_weight_conversion so it applies to the untouched base"
        )
    config_cls = get("dora" if d.get("use_dora") else "lora").config_cls
    return config_cls(
        r=int(d["r"]),
        alpha=float(d.get("lora_alpha", d["r"])),
        dropout=float(d.get("lora_dropout", 0.0) or 0.0),
        targets=targets,
        use_rslora=bool(d.get("use_rslora", False)),
        init=init if init in ("gaussian", "loftq") else "kaiming",  # LoftQ: rebuild its base from the float W
        **({f"loftq_{k}": int(d["loftq_config"][f"loftq_{k}"]) for k in ("bits", "iter")} if init == "loftq" else {}),
        rank_pattern=dict(d.get("rank_pattern") or {}),
        alpha_pattern={k: float(v) for k, v in (d.get("alpha_pattern") or {}).items()},
        additional_targets=peft_format.additional_targets_from_peft(d),
        target_parameters=list(d["target_parameters"]) if d.get("target_parameters") else None,
    )
