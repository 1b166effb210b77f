"""The Python API: thin, typed entry points over the modules that do the work."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import registry
from .config import Config
from .configure import load_config
from .eval.generate import generate
from .export.adapter import load_adapter, merge_adapters_first, save_adapter
from .model.load import load_model as _load_model
from .model.params import ParamReport
from .model.params import param_report as _param_report
from .train.loop import RunResult
from .train.loop import train as _train

__all__ = ["apply_method", "generate", "load_adapter", "load_config", "load_model", "merge",
           "param_report", "save_adapter", "train"]


def load_model(model_cfg, **kwargs):
    """(model, tokenizer) from a ``ModelConfig`` (or a whole ``Config``)."""
    if isinstance(model_cfg, Config):
        model_cfg = model_cfg.model
    return _load_model(model_cfg, **kwargs)


def apply_method(model: nn.Module, peft_cfg) -> nn.Module:
    """Freeze the base and insert the method's modules, in place (after merging ``peft.merge_first``'s
    adapters into the base, as training does); returns the model."""
    merge_adapters_first(model, getattr(peft_cfg, "merge_first", None))
    registry.get(peft_cfg.method).apply(model, peft_cfg)
    return model


def merge(model: nn.Module, peft_cfg) -> nn.Module:
    """Fold the method into plain modules (in place); a clear error if it cannot merge."""
    method = registry.get(peft_cfg.method)
    if method.merge is None:
        from .errors import ConfigError

        raise ConfigError(
            f"method {method.name!r} cannot be merged into the base weights; serve it unmerged "
            "(peftlab generate/serve with the adapter) instead"
        )
    method.merge(model)
    return model


def param_report(model: nn.Module) -> ParamReport:
    return _param_report(model)


def train(cfg: Config | str | Path | None = None, overrides: list[str] | None = None, **kwargs) -> RunResult:
    """Train from a Config, or from a YAML path (or None) plus ``key=value`` overrides."""
    if not isinstance(cfg, Config):
        cfg = load_config(cfg, overrides)
    return _train(cfg, **kwargs)
