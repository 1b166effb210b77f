"""Where and how the math runs: CPU threads, mixed precision, seeds.

Threads: OpenMP threads that land on a core another process is using stall the whole op
(2-8x slower than one thread on this class of machine), so ``threads=0`` counts the cores
that are actually idle right now (from /proc/stat over 100 ms) instead of all cores.

Random state: ``seed_everything`` seeds Python, NumPy and torch; ``rng_state``/``set_rng_state``
save and restore all of them (checkpoints, so a resumed run draws what an uninterrupted one would).

Mixed precision: ``auto`` means bf16 autocast where the hardware runs bf16 matmuls natively
(a CUDA device with bf16, or a CPU with AVX512-BF16 or AMX), fp16 autocast on a CUDA device
without bf16 (before Ampere), fp32 otherwise. ``fp16`` can be asked for on CUDA and on CPU (torch
has fp16 autocast there too; without native fp16 arithmetic it is slow, so ``auto`` never picks
it on a CPU). fp16 trains with dynamic loss scaling (``grad_scaler``: torch's GradScaler, see
train/step.py); bf16 has fp32's exponent range and needs none. Master weights and optimiser state
stay fp32 either way.
"""

from __future__ import annotations

import contextlib
import os
import random
import time

import numpy as np
import torch

from ..errors import ConfigError


def _cpu_times() -> dict[str, tuple[int, int]]:
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3:4].isdigit():
                parts = line.split()
                vals = list(map(int, parts[1:]))
                idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
                out[parts[0]] = (idle, sum(vals))
    return out


def free_cores(window: float = 0.1) -> int:
    """Cores of this process's affinity set that were mostly idle over ``window`` seconds."""
    try:
        allowed = os.sched_getaffinity(0)
        a = _cpu_times()
        time.sleep(window)
        b = _cpu_times()
    except (OSError, AttributeError):
        return os.cpu_count() or 1
    free = 0
    for cpu in allowed:
        key = f"cpu{cpu}"
        if key in a and key in b:
            idle = b[key][0] - a[key][0]
            total = b[key][1] - a[key][1]
            if total <= 0 or idle / total > 0.5:
                free += 1
    return max(1, free)


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads (0: the free cores); returns the number used."""
    if threads < 0:
        raise ConfigError(f"train.threads must be >= 0 (0 = automatic), got {threads}")
    n = threads or free_cores()
    torch.set_num_threads(n)
    return n


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.mixed_precision`` on ``device`` (None: fp32)."""
    if name in ("no", "fp32", "none", "false", "off"):
        return None
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        if device.type not in ("cuda", "cpu"):
            raise ConfigError(f"train.mixed_precision=fp16 runs on CUDA or CPU, not {device.type}; use bf16 or no")
        return torch.float16
    raise ConfigError(f"train.mixed_precision {name!r} is not one of auto, bf16, fp16, no")


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 autocast (None for fp32 and bf16).

    torch's defaults, the same as HF Trainer / accelerate use: the loss is multiplied by a scale
    starting at 2**16; a step whose gradients overflow is skipped and the scale halved; after
    2,000 steps in a row without overflow the scale doubles.
    """
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> tuple[dict, dict]:
    """(tensors, JSON-able rest) of every random generator a run draws from, for checkpoints."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
