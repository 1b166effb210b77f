"""Build what ``peftlab chat`` and ``peftlab serve`` run on: base + adapters + template + engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Config, split_config_args
from ..configure import load_config
from ..errors import ConfigError
from ..rundir import is_run_dir, run_config
from .engine import Engine
from .multi_lora import MultiLoRAModel
from .store import AdapterStore


@dataclass
class Serving:
    cfg: Config
    mm: MultiLoRAModel
    tokenizer: object
    encoder: object
    store: AdapterStore
    engine: Engine
    base_name: str


def parse_named(items: list[str]) -> dict[str, str]:
    """``["name=DIR", "DIR"]`` -> {name: DIR}; a bare DIR is named after its last component."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item.rstrip("/")).name, item
        if name in out:
            raise ConfigError(f"adapter name {name!r} is given twice; name them NAME=DIR")
        if not Path(path).is_dir():
            raise ConfigError(f"--adapter {item!r}: {path!r} is not a directory")
        out[name] = path
    return out


def build_serving(cfg_args: list[str], *, run: str | None = None, adapters: list[str] | None = None,
                  adapters_dir: str | None = None, max_loaded: int = 8, host_max: int = 1024, max_batch: int = 8,
                  max_queue: int = 64,
                  max_context: int | None = None, served_name: str | None = None, mode: str = "auto",
                  lookup: int = 0) -> Serving:
    from ..data.tokenize import Encoder
    from ..eval.generate import stop_token_ids
    from ..model.load import load_model

    path, overrides = split_config_args(cfg_args)
    pinned = parse_named(adapters or [])
    if run:
        run_dir = Path(run)
        if is_run_dir(run_dir) and not (run_dir / "adapter").is_dir():
            raise ConfigError(f"--run {run!r} has no adapter/ (a full fine-tuning run: serve its model/ as the base, "
                              f"model.name={run_dir / 'model'})")
        cfg = run_config(run, overrides)
        pinned.setdefault(run_dir.resolve().name, str(run_dir / "adapter"))
    else:
        cfg = load_config(path, overrides)
    seed = cfg.model.seed if cfg.model.seed is not None else cfg.train.seed
    model, tok = load_model(cfg.model, seed=seed)
    encoder = Encoder(tok, cfg.data.template, cfg.data.max_length, cfg.data.system)
    mm = MultiLoRAModel(model, mode=mode)
    base_name = served_name or (Path(cfg.model.name).name if Path(cfg.model.name).is_dir() else cfg.model.name)
    if base_name in pinned:
        raise ConfigError(f"adapter name {base_name!r} is the base model's name; rename the adapter")
    store = AdapterStore(mm, adapters_dir, max_loaded=max(max_loaded, len(pinned)), pinned=pinned, host_max=host_max)
    engine = Engine(mm, tok, store=store, max_batch=max_batch, max_queue=max_queue, eos_ids=stop_token_ids(tok, encoder),
                    max_context=max_context, lookup=lookup)
    return Serving(cfg, mm, tok, encoder, store, engine, base_name)
