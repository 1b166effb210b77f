"""What a run is made of before its first step: the inputs checked, the run directory, the
model with the method applied (and gradient checkpointing), the data, the number of steps.

Failures here are the user's to fix, so they come as ``ConfigError``/``DataError`` naming the
setting, never as a traceback from deep inside a method or a data reader.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

from torch import nn

from .. import registry, rundir
from ..config import Config, default_lr
from ..data import sample_types
from ..data.dataset import build_datasets
from ..errors import ConfigError, DataError, PeftlabError
from ..export.adapter import merge_adapters_first
from ..model.load import is_config_name, load_model, quantize_base
from ..quant.convert import model_is_quantized
from ..validate import check_data_settings, check_output_dir, check_path, refuse_pickled_model
from .runtime import seed_everything


def prepared_model(cfg: Config, model: nn.Module | None, tokenizer) -> tuple[nn.Module, object]:
    """The model (loaded unless given) with the method applied and gradient checkpointing set.

    A method that quantises the base itself (``Method.float_base``: LoftQ) gets the float weights:
    the model is loaded unquantised, the method is applied, and only then is the rest of the base
    quantised to ``model.quantize`` (the layers the method already quantised are left as they are).
    """
    seed_everything(cfg.train.seed)
    method = registry.get(cfg.peft.method)
    kind = method.float_base(cfg.peft) if method.float_base is not None else None
    if kind is not None:
        if str(cfg.model.quantize).lower() != kind:
            raise ConfigError(f"peft.init={cfg.peft.init} initialises against a {kind} base: set model.quantize={kind} "
                              f"(got model.quantize={cfg.model.quantize})")
        if model is not None and model_is_quantized(model):
            raise ConfigError(f"peft.init={cfg.peft.init} needs the base's float weights; pass an unquantised model")
    if model is None:
        model_cfg = dataclasses.replace(cfg.model, quantize=None) if kind else cfg.model
        model, tokenizer = load_model(model_cfg, seed=cfg.train.seed)
    seed_everything(cfg.train.seed)
    apply_method(method, model, cfg)
    if kind is not None:
        quantize_base(model, kind)  # what the method left in float (the other layers) now
    if cfg.model.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"model.gradient_checkpointing: {type(model).__name__} does not support it; "
                              "set model.gradient_checkpointing=false")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _checkpoint_share(model, cfg.model.checkpoint_layers)
    model.config.use_cache = False
    return model, tokenizer


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train over an existing run unless resuming it or told to overwrite (then clear it)."""
    has_run = (run_dir / rundir.METRICS).exists() or (run_dir / "checkpoints").exists()
    if has_run and not resume:
        if not overwrite:
            raise ConfigError(
                f"train.output_dir {str(run_dir)!r} already holds a run; pass --resume to continue it, "
                "choose another train.output_dir, or set train.overwrite=true to replace it"
            )
        for name in ("checkpoints", rundir.METRICS, *rundir.ARTIFACTS, rundir.SUMMARY):
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    check_output_dir(run_dir)


def total_steps(cfg: Config, n_train: int, world_size: int) -> int:
    t = cfg.train
    if t.steps is not None:
        if t.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
        return t.steps
    per_epoch = n_train // (t.batch_size * world_size * t.grad_accum)
    if per_epoch < 1:
        raise ConfigError(
            f"one optimiser step needs batch_size x grad_accum x processes = "
            f"{t.batch_size * t.grad_accum * world_size} examples but there are {n_train}; "
            "lower train.batch_size or train.grad_accum"
        )
    return max(1, math.ceil(t.epochs * per_epoch))



def apply_method(method, model: nn.Module, cfg: Config) -> None:
    """``method.apply`` (after ``peft.merge_first``'s adapters are merged into the base), with
    anything but a PeftlabError reported as an incompatibility."""
    merge_adapters_first(model, getattr(cfg.peft, "merge_first", None))
    try:
        method.apply(model, cfg.peft)
    except PeftlabError:
        raise
    except (AttributeError, TypeError, ValueError, NotImplementedError, KeyError, IndexError, RuntimeError) as e:
        arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(
            f"peft.method={method.name!r} cannot be applied to this {arch} model ({type(e).__name__}: {e}); "
            "check peft.targets, or choose a method that supports this architecture"
        ) from e


def init_batches(method, cfg: Config, data) -> list[dict]:
    """The batches a data-driven init reads (``Method.init_batches``): the first ones of the
    training data's seeded order, drawn by a sampler of their own (the run's order is untouched)
    as one process would draw them, so every rank computes the same init."""
    n = method.init_batches(cfg.peft) if method.init_batches is not None else 0
    if n < 1:
        return []
    t = cfg.train
    sampler = data.sampler(t.batch_size, t.seed, cfg.data.shuffle, 0, 1)
    return [data.collate([data.train[i] for i in sampler.next()]) for _ in range(n)]


def load_data(cfg: Config, tokenizer, seed: int):
    """``build_datasets``, with an unexpected failure reported against the data file, not as a traceback."""
    try:
        return build_datasets(cfg.data, tokenizer, seed, sample_types.from_method_config(getattr(cfg, "peft", None)))
    except PeftlabError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OSError, UnicodeError,
            RecursionError, OverflowError) as e:
        raise DataError(
            f"data.path {cfg.data.path or 'builtin:tasks'!r} could not be read ({type(e).__name__}: {e}); "
            "check the file's format (data.format) and encoding (UTF-8)"
        ) from e


def check_inputs(cfg: Config) -> None:
    """Config values that reach the filesystem, checked before anything is loaded."""
    if cfg.peft is None:
        raise ConfigError("the config names no method (Config.peft is None): pass one, e.g. "
                          "Config(peft=LoRAConfig()), or load a config with peft.method=lora")
    if cfg.train.lr is None:  # a Config built without its method and given one afterwards
        cfg.train.lr = default_lr(cfg.peft, cfg.train.objective)
    cfg.train.validate()
    check_data_settings(cfg.data)
    check_path(cfg.model.name, "model.name")
    if cfg.data.path is not None:
        check_path(cfg.data.path, "data.path")
    if cfg.data.eval_path is not None:
        check_path(cfg.data.eval_path, "data.eval_path")
    if not is_config_name(cfg.model.name):
        refuse_pickled_model(cfg.model.name)


def _checkpoint_share(model: nn.Module, share: float) -> None:
    """Recompute only the first ``round(share * L)`` decoder layers in backward; the rest keep their
    activations (a point between full checkpointing's memory and no checkpointing's speed)."""
    if share >= 1.0:
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    keep = round(share * len(layers))
    for layer in layers[keep:]:
        layer.gradient_checkpointing = False
