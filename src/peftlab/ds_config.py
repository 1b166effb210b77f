"""A DeepSpeed JSON config a LLaMA-Factory or HF Trainer user brings (``train.deepspeed=ds_z3.json``),
read and mapped onto peftlab's own settings instead of refused.

peftlab trains with PyTorch's engines (DDP, FSDP2), not DeepSpeed's, so a DeepSpeed file is a
description of what the user wants, translated key by key:

    zero_optimization.stage        0 -> ddp, 1 and 2 -> fsdp_grad_op (FSDP's SHARD_GRAD_OP shards
                                   gradients and optimiser state: ZeRO-2; for stage 1 it also shards
                                   the gradients), 3 -> fsdp (FULL_SHARD: ZeRO-3)
    bf16.enabled / fp16.enabled    true -> train.mixed_precision=bf16 / fp16 ("auto": peftlab's own auto)
    train_micro_batch_size_per_gpu a number -> train.batch_size   ("auto": peftlab's value)
    gradient_accumulation_steps    a number -> train.grad_accum
    gradient_clipping              a number -> train.max_grad_norm

Everything else (offloading, buckets, overlap, the optimizer/scheduler blocks, monitors, ...) tunes
DeepSpeed's engine and is listed as ignored. A value the user also set in peftlab's own keys must
agree, or the error names both. ``notes`` says what was mapped and what was ignored; the CLI prints it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError

STAGES = {0: "ddp", 1: "fsdp_grad_op", 2: "fsdp_grad_op", 3: "fsdp"}
NUMBERS = {"train_micro_batch_size_per_gpu": ("batch_size", int), "gradient_accumulation_steps": ("grad_accum", int),
           "gradient_clipping": ("max_grad_norm", float)}
HANDLED = {"zero_optimization", "bf16", "fp16", *NUMBERS, "train_batch_size"}


def _read(path: str) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed: {path!r} does not exist (a DeepSpeed JSON config, e.g. ds_z3_config.json)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.deepspeed: {path!r} is not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"train.deepspeed: {path!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _enabled(block) -> bool | None:
    """True/False from ``{"enabled": ...}``; None for "auto" or absent."""
    if not isinstance(block, dict) or block.get("enabled") in (None, "auto"):
        return None
    return bool(block["enabled"])


def map_deepspeed(path: str, train: dict) -> tuple[dict, list[str]]:
    """(train keys to set, notes) for DeepSpeed file ``path``; ``train`` is the user's own train section."""
    ds = _read(path)
    mapped: dict = {}
    notes: list[str] = []
    zero = ds.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"train.deepspeed: {path!r}: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if stage not in STAGES:
        raise ConfigError(f"train.deepspeed: {path!r}: zero_optimization.stage {stage!r} is not 0, 1, 2 or 3")
    mapped["distributed"] = STAGES[stage]
    notes.append(f"zero_optimization.stage={stage} -> train.distributed={STAGES[stage]}"
                 + (" (also shards gradients: FSDP has no optimiser-only sharding)" if stage == 1 else ""))
    for key in sorted(k for k in zero if k != "stage"):
        notes.append(f"ignored zero_optimization.{key} (tunes DeepSpeed's engine"
                     + ("; peftlab does not offload to CPU" if key.startswith("offload") else "") + ")")
    bf16, fp16 = _enabled(ds.get("bf16")), _enabled(ds.get("fp16"))
    if bf16 and fp16:
        raise ConfigError(f"train.deepspeed: {path!r} enables both bf16 and fp16; enable one")
    if bf16 or fp16:
        mapped["mixed_precision"] = "bf16" if bf16 else "fp16"
        notes.append(f"{'bf16' if bf16 else 'fp16'}.enabled=true -> train.mixed_precision={mapped['mixed_precision']}")
    else:
        notes.append("bf16/fp16 'auto' or off -> train.mixed_precision stays "
                     f"{train.get('mixed_precision', 'auto')}")
    for key, (ours, tp) in NUMBERS.items():
        value = ds.get(key)
        if value is None or value == "auto":
            continue
        try:
            mapped[ours] = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"train.deepspeed: {path!r}: {key}={value!r} is not a number or 'auto'") from None
        notes.append(f"{key}={value} -> train.{ours}={mapped[ours]}")
    if ds.get("train_batch_size") not in (None, "auto"):
        notes.append("ignored train_batch_size (peftlab derives it: batch_size x grad_accum x processes)")
    for key in sorted(set(ds) - HANDLED):
        notes.append(f"ignored {key}" + (" (peftlab's AdamW and train.schedule are used)"
                                          if key in ("optimizer", "scheduler") else ""))
    for ours, value in mapped.items():
        if ours in train and train[ours] != value and not (ours == "mixed_precision" and train[ours] == "auto"):
            raise ConfigError(f"train.deepspeed: {path!r} asks for train.{ours}={value} but the config sets "
                              f"train.{ours}={train[ours]}; drop one of them")
    return mapped, notes
