"""LoRA adapter directories as multi-adapter serving reads them: the factors per module and the
scaling of each.

``read_lora_dir`` returns (adapter_config, {module path: (A [r, in], B [out, r])}) of a peftlab or
Hugging Face PEFT LoRA directory (LoRA-drop's too: LoRA with shared factors) and refuses, naming
the key, what the stacked layers cannot represent. ``module_scalings`` gives each module its s,
per-layer ranks and alphas (``rank_pattern``, ``alpha_pattern``) included.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import ConfigError
from ..export.adapter import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from ..methods.lora_init import pattern_value
from ..methods.lowrank import lora_scaling
from ..registry import PEFT_PREFIX

SERVED_TYPES = ("LORA", "LORA_DROP")  # adapter_config peft_types whose tensors are (A, B) per module


def read_lora_dir(adapter_dir: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter_config dict, {module path: (A [r, in], B [out, r])}) of a LoRA adapter directory.

    Refuses what the stacked layers cannot represent, naming the key: other methods, DoRA,
    biases, modules_to_save and embedding LoRA. Per-layer ranks and alphas (``rank_pattern``,
    ``alpha_pattern``: EVA's adapters, PEFT's) are served; ``module_scalings`` reads them.
    """
    d = Path(adapter_dir)
    config, _ = read_adapter_config(d)
    if config.get("peft_type") not in SERVED_TYPES:
        raise ConfigError(
            f"{d} is a {config.get('peft_type')!r} adapter; multi-adapter serving runs LoRA adapters only "
            "(and LoRA-drop's, which are LoRA with shared factors; serve it alone with `peftlab generate "
            "--adapter`, or merge it with `peftlab merge`)"
        )
    for key, bad in (("use_dora", bool), ("modules_to_save", bool), ("bias", lambda v: v not in (None, "none"))):
        if key in config and bad(config[key]):
            raise ConfigError(f"{d / CONFIG_NAME}: {key}={config[key]!r} is not supported by multi-adapter "
                              "serving; merge this adapter (peftlab merge) or retrain without it")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ConfigError(f"{d / CONFIG_NAME} has no {key!r}")
    try:
        tensors = load_file(str(d / WEIGHTS_NAME))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ConfigError(f"{d / WEIGHTS_NAME} cannot be read as safetensors ({e}); is the file damaged?") from None
    if config["peft_type"] == "LORA_DROP":  # each module on a shared pair is a LoRA with that pair's factors
        from ..methods.lora_drop import as_lora_tensors

        tensors = as_lora_tensors(config, tensors, str(d))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        key = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        parts = key.split(".")
        if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
            raise ConfigError(f"{d / WEIGHTS_NAME}: tensor {name!r} is not a LoRA factor (<module>.lora_A.weight or "
                              "lora_B.weight); embedding LoRA and extra tensors are not supported when serving")
        pairs.setdefault(".".join(parts[:-2]), {})[parts[-2]] = t
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ConfigError(f"{d / WEIGHTS_NAME}: module {module} has only {sorted(ab)}")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ConfigError(f"{d / WEIGHTS_NAME}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                              "expected [r, in] and [out, r]")
        out[module] = (a, b)
    if not out:
        raise ConfigError(f"{d / WEIGHTS_NAME} holds no LoRA tensors")
    module_scalings(config, out, d / CONFIG_NAME)  # a rank that is not the pattern's is refused here
    return config, out


def module_scalings(config: dict, factors: dict, where: str | Path = CONFIG_NAME) -> dict[str, float]:
    """{module path: s}: s = alpha / r (alpha / sqrt(r) with ``use_rslora``), r and alpha the module's
    entry in PEFT's ``rank_pattern`` / ``alpha_pattern`` (the first key matching the end of its
    path) or else the file's ``r`` and ``lora_alpha``. A module whose factors' rank is not that r
    is refused: its scaling would be wrong."""
    r0, alpha0 = int(config["r"]), float(config["lora_alpha"])
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    out = {}
    for path, (a, _) in factors.items():
        r, alpha = int(pattern_value(ranks, path, r0)), float(pattern_value(alphas, path, alpha0))
        if a.shape[0] != r:
            raise ConfigError(f"{where}: {path} has rank {a.shape[0]} in the weights file but r={r} in the config "
                              f"({'rank_pattern' if ranks else 'r'}); the two files do not belong together")
        out[path] = lora_scaling(alpha, r, bool(config.get("use_rslora", False)))
    return out
