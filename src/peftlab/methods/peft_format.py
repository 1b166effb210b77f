"""What the LoRA family's PEFT adapter files share (each method's own translation sits beside its
``register()``): the key layout of extra trained modules and the common adapter_config.json fields.

PEFT saves an extra trained module (``modules_to_save``) under the module's own name, so peftlab's
``X.modules_to_save.weight`` is written as ``base_model.model.X.weight`` and read back the same way.
"""

from __future__ import annotations

from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from ..registry import Method, add_peft_prefix, strip_peft_prefix
from .modules_to_save import SAVE


def to_peft_keys(state: dict) -> dict:
    """peftlab names -> file names: ``X.modules_to_save.weight`` is saved as ``X.weight`` (PEFT)."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        out[".".join(p for p in parts if p != SAVE)] = v
    return add_peft_prefix(out)


def make_from_peft_keys(own: tuple[str, ...]):
    """file names -> peftlab names, for a method whose own tensors have components in ``own``.

    Any other tensor in the file is an extra trained module: ``X.weight`` -> ``X.modules_to_save.weight``
    (extra trained modules are leaf modules, so the parameter name is the last component).
    """

    def from_peft_keys(state: dict) -> dict:
        out = {}
        for k, v in strip_peft_prefix(state).items():
            parts = k.split(".")
            if not any(p.startswith(own) for p in parts) and SAVE not in parts:
                parts = parts[:-1] + [SAVE, parts[-1]]
            out[".".join(parts)] = v
        return out

    return from_peft_keys


def additional_targets_for_peft(cfg) -> list[str] | None:
    """``modules_to_save`` of adapter_config.json."""
    names = getattr(cfg, "additional_targets", None)
    return list(names) if names else None


def additional_targets_from_peft(d: dict) -> list[str] | None:
    """``peft.additional_targets`` from adapter_config.json's ``modules_to_save``."""
    return list(d["modules_to_save"]) if d.get("modules_to_save") else None


def peft_targets(d: dict, method: str) -> str | list[str]:
    """``target_modules`` of a PEFT adapter_config.json for a method that keeps no biases; a clear
    error for a bias setting it cannot load or a missing target list."""
    if d.get("bias", "none") not in (None, "none"):
        raise ConfigError(f"adapter_config.json has bias={d['bias']!r}, which peftlab's {method} does not load")
    targets = d.get("target_modules")
    if targets is None:
        raise ConfigError("adapter_config.json has no target_modules")
    return targets if isinstance(targets, str) else list(targets)


def fan_in_fan_out(layers) -> bool:
    """adapter_config.json's ``fan_in_fan_out``: the adapted layers store their weight [in, out]
    (GPT-2's Conv1D, or a quantised copy of one)."""
    return any(isinstance(m.base_layer, Conv1D) or getattr(m.base_layer, "from_conv1d", False) for m in layers)


def family_method(name: str, config_cls: type, apply, own: tuple[str, ...], **fields) -> Method:
    """The ``Method`` of a LoRA-family method whose own tensors have components in ``own``: those
    tensors and any extra trained modules are the adapter, in PEFT's key layout (unless ``fields``
    gives its own ``to_peft_keys`` / ``from_peft_keys``)."""
    fields.setdefault("to_peft_keys", to_peft_keys)
    fields.setdefault("from_peft_keys", make_from_peft_keys(own))
    return Method(name=name, config_cls=config_cls, apply=apply, state_prefixes=(*own, SAVE), **fields)
