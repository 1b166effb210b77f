"""Checks that run before any work: values that reach the filesystem, and settings a run cannot meet.

Everything here raises ``ConfigError`` (or ``DataError``) with the key, the value received and
what to do, so an impossible run stops in the first second instead of an hour in, or with a
traceback from deep inside torch.

- ``check_path`` / ``check_name``: config values that become paths or file names (no NUL or
  control characters, no path separators or ``..`` in names).
- ``check_output_dir``: the run directory can be created and is not something else.
- ``refuse_pickled_model``: a model directory whose weights exist only as pickles.
- ``check_run_fits``: the data against the model and the batch settings (sequence longer than
  the model's context, a batch larger than the data).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .errors import ConfigError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth",
                  "tf_model.h5", "flax_model.msgpack")


def check_path(value, key: str) -> str:
    """A config value used as a filesystem path: a non-empty string without NUL/control characters."""
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a path (a string), got {value!r}")
    if not value.strip():
        raise ConfigError(f"{key} is empty; give a path")
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ConfigError(f"{key} {value!r} contains the control character {bad!r}; paths may not")
    if len(value.encode("utf-8", "surrogatepass")) > 4096:
        raise ConfigError(f"{key} is {len(value)} characters long; paths are limited to 4096 bytes")
    return value


def check_name(value, key: str) -> str:
    """A name that becomes one path component (an adapter name, a run name)."""
    if not isinstance(value, str) or not NAME.match(value) or value in (".", ".."):
        raise ConfigError(
            f"{key} {value!r} is not a valid name: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', spaces or '..')"
        )
    return value


def check_output_dir(path: str | Path, key: str = "train.output_dir") -> Path:
    """The run directory: creatable, a directory, and not the filesystem root."""
    check_path(str(path), key)
    p = Path(path)
    resolved = p.expanduser().resolve()
    if resolved == Path(resolved.anchor):
        raise ConfigError(f"{key} {str(path)!r} is the filesystem root; choose a directory for the run")
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key} {str(path)!r} exists and is not a directory; choose another train.output_dir")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key} {str(path)!r} cannot be created ({e.strerror}); choose a writable place") from None
    return p


def finite(value: float, key: str, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """A finite number within bounds (``low_open``: strictly above ``low``); ``hint`` says what to do."""
    tail = f"; {hint}" if hint else ""
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}{tail}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{key} must be {'>' if low_open else '>='} {low}, got {value!r}{tail}")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"{key} must be {'<' if high_open else '<='} {high}, got {value!r}{tail}")
    return value


WARMUP_SPELLINGS = "a share of the run's steps below 1 (train.warmup=0.03) or a whole count of steps (train.warmup=10)"


def warmup_setting(value: int | float) -> int | float:
    """``train.warmup`` as the schedule reads it: an int is a count of steps, a float in [0, 1) a
    share of the run's steps (``train/optim.warmup_steps``).

    ``1.0`` could mean one step or the whole run, so it is refused, and so is any other float
    from 1 up that is not a whole number (2.5). A whole float from 2 up (10.0, what configs saved
    before warm-up counts were ints hold) can only be a count and becomes the int.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"train.warmup must be a number, got {value!r}; give {WARMUP_SPELLINGS}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"train.warmup must be >= 0, got {value}; give {WARMUP_SPELLINGS}")
        return value
    finite(value, "train.warmup", 0.0, hint=f"give {WARMUP_SPELLINGS}")
    if value < 1:
        return value
    if value >= 2 and value.is_integer():
        return int(value)
    why = "could mean one step or the whole run" if value == 1 else "is neither a share below 1 nor a whole count"
    raise ConfigError(f"train.warmup={value!r} {why}; give {WARMUP_SPELLINGS} "
                      "(one step: train.warmup=1; nearly all of the run: train.warmup=0.99)")


def check_data_settings(data_cfg) -> None:
    """The numeric ``data.*`` values the loop and the encoder rely on.

    ``data.eval_split`` is a fraction in [0, 1) or a whole count of records (1 and 1.0 are a count
    of one); 1.5 is neither, and used to hold out a single record.
    """
    if data_cfg.max_length < 2:
        raise ConfigError(f"data.max_length must be >= 2 tokens, got {data_cfg.max_length}")
    keep = getattr(data_cfg, "max_prompt_length", None)
    if keep is not None and not 1 <= keep < data_cfg.max_length:
        raise ConfigError(f"data.max_prompt_length must be between 1 and data.max_length - 1 "
                          f"({data_cfg.max_length - 1}) so an answer token fits, got {keep}")
    split = finite(data_cfg.eval_split, "data.eval_split", 0.0,
                   hint="give a fraction below 1 (0.05 holds out 5%) or a count of records (50)")
    if split >= 1 and not float(split).is_integer():
        raise ConfigError(f"data.eval_split={split} is neither a fraction below 1 (0.05 holds out 5%) nor a whole "
                          "count of records (50); give one of the two")


def refuse_pickled_model(directory: str | Path) -> None:
    """Refuse a model directory whose weights exist only as pickle files."""
    d = Path(directory)
    if not d.is_dir():
        return
    names = {p.name for p in d.iterdir()}
    has_safe = any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names)
    pickled = sorted(n for n in names if n in PICKLE_WEIGHTS or n.endswith((".bin", ".pt", ".pth", ".pkl")))
    if pickled and not has_safe:
        raise ConfigError(
            f"model.name {str(d)!r} has weights only as pickle files ({', '.join(pickled)}); peftlab never "
            "unpickles because unpickling runs arbitrary code. Convert them to safetensors where you trust "
            "the files (transformers: model.save_pretrained(dir, safe_serialization=True))"
        )


def context_length(model_config) -> int | None:
    """The longest sequence the model's position scheme supports, when the config says."""
    for key in CONTEXT_KEYS:
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_run_fits(model, data, data_cfg, train_cfg, world_size: int = 1) -> list[str]:
    """Stop before training when the data cannot run on this model with these batch settings.

    Returns warnings (printed by the caller) for settings that are odd but harmless.
    """
    warnings = []
    ctx = context_length(getattr(model, "config", None))
    if ctx is not None:
        # a stream (data.streaming) is not read ahead: its rows are bounded by data.max_length only
        streamed = not isinstance(data.train, list)
        if streamed and data_cfg.max_length > ctx:
            raise ConfigError(
                f"data.max_length={data_cfg.max_length} is longer than the model's context ({ctx} positions) "
                f"and a streamed dataset cannot be checked ahead; set data.max_length={ctx} or lower"
            )
        seen = [*([] if streamed else data.train), *data.eval]
        longest = max(seen, key=len) if seen else None
        if longest is not None and len(longest) > ctx:
            raise ConfigError(
                f"data.max_length={data_cfg.max_length} lets {longest.source or 'an example'} reach "
                f"{len(longest)} tokens, but the model's context is {ctx} positions; set data.max_length={ctx} "
                "or lower"
            )
        if data_cfg.max_length > ctx:
            warnings.append(f"data.max_length={data_cfg.max_length} is above the model's context ({ctx}); "
                            "every example fits now, but longer data would not")
    need = train_cfg.batch_size * world_size
    if len(data.train) < need:
        raise ConfigError(
            f"train.batch_size={train_cfg.batch_size} x {world_size} process(es) needs {need} training "
            f"examples but there are {len(data.train)}; lower train.batch_size or add data"
        )
    return warnings
