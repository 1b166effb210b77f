"""A run's Config: an optional YAML file and ``key=value`` overrides, every key validated.

``config.py`` knows the sections, their types and how overrides and YAML are read, but no method;
the ``peft`` section's keys belong to the method that ``peft.method`` names (default lora), whose
config class the registry holds. This module joins the two, so config.py stays below the registry.
"""

from __future__ import annotations

from pathlib import Path

from . import registry
from .config import (
    DEFAULT_METHOD,
    SECTIONS,
    Config,
    DataConfig,
    GRPOConfig,
    ModelConfig,
    PreferenceConfig,
    TrainConfig,
    apply_overrides,
    build_dataclass,
    read_yaml,
)
from .ds_config import map_deepspeed
from .errors import ConfigError


def config_from_dict(raw: dict) -> Config:
    unknown = [k for k in raw if k not in (*SECTIONS, "peft")]
    if unknown:
        raise ConfigError(
            f"unknown config section {unknown[0]!r}; valid sections: model, peft, data, train, pref, grpo"
        )
    for name in (*SECTIONS, "peft"):
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            raise ConfigError(f"config section {name!r} must be a mapping of keys, got {raw[name]!r}")
    peft_raw = dict(raw.get("peft") or {})
    method = registry.get(str(peft_raw.get("method", DEFAULT_METHOD)))
    peft_raw["method"] = method.name
    train_raw, notes = dict(raw.get("train") or {}), []
    if train_raw.get("deepspeed"):  # mapped once, here: the resolved config keeps the mapped keys, not the file
        mapped, notes = map_deepspeed(str(train_raw.pop("deepspeed")), train_raw)
        train_raw.update(mapped)
    train_raw.pop("deepspeed", None)
    cfg = Config(
        model=build_dataclass(ModelConfig, raw.get("model"), "model"),
        peft=build_dataclass(method.config_cls, peft_raw, "peft"),
        data=build_dataclass(DataConfig, raw.get("data"), "data"),
        train=build_dataclass(TrainConfig, train_raw, "train"),
        pref=build_dataclass(PreferenceConfig, raw.get("pref"), "pref"),
        grpo=build_dataclass(GRPOConfig, raw.get("grpo"), "grpo"),
    )
    cfg.notes = [f"train.deepspeed: {n}" for n in notes]
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read an optional YAML file, apply ``key=value`` overrides, validate everything."""
    raw = read_yaml(path) if path else {}
    raw = apply_overrides(raw, list(overrides or []))
    return config_from_dict(raw)
