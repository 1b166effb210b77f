"""Resumable checkpoints, written atomically, read without pickle.

``<output_dir>/checkpoints/step-000100/`` holds
    trainable.safetensors    every trainable tensor and the method's own (frozen) tensors
    optimizer.safetensors    optimiser state tensors, keyed ``state.<i>.<name>``
    optimizer.json           the rest of the optimiser state (param groups, scalars)
    scheduler.json           the LR scheduler's state
    rng.safetensors          torch CPU/CUDA generator states
    trainer_state.json       global step, data position, python/numpy RNG, counters
    MANIFEST.json            sizes and sha256 of all of the above, written last

A checkpoint without an intact manifest is torn: ``latest_checkpoint`` skips it (with a
warning) and falls back to the previous one. Rotation keeps ``save_total_limit`` complete
checkpoints and never deletes the newest good one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_dir, verify_manifest

STEP_DIR = re.compile(r"^step-(\d+)$")


def trainable_state(model: nn.Module, prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Trainable parameters plus tensors owned by the method (by name prefix), by module path.

    A tensor shared under several names (tied embeddings and LM head) is kept once, under its
    first name: safetensors refuses shared storage, and loading one name restores both.
    """
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        owned = prefixes and any(part.startswith(prefixes) for part in name.split("."))
        if owned or (isinstance(t, nn.Parameter) and t.requires_grad):
            out[name] = t
    return out


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict, dict]:
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


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, trainer_state: dict,
                    prefixes: tuple[str, ...] = (), keep: int = 2) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    target = ckpt_root / f"step-{step:06d}"
    with atomic_dir(target) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in trainable_state(model, prefixes).items()}
        save_file(state, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict(), default=lambda o: None))
        rng_t, rng_m = rng_state()
        save_file(rng_t, str(tmp / "rng.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step, "rng": rng_m}))
    rotate(ckpt_root, keep)
    return target


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies; torn ones are reported and skipped."""
    for _, path in reversed(list_checkpoints(run_dir)):
        problem = verify_manifest(path)
        if problem is None:
            return path
        warnings.warn(f"skipping torn checkpoint: {problem}", stacklevel=2)
    return None


def rotate(ckpt_root: Path, keep: int) -> None:
    if keep <= 0:
        return
    good = [p for _, p in list_checkpoints(ckpt_root.parent) if verify_manifest(p) is None]
    for path in good[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    newest_good = good[-1] if good else None
    for _, path in list_checkpoints(ckpt_root.parent):
        if newest_good is not None and path.name < newest_good.name and path not in good:
            shutil.rmtree(path, ignore_errors=True)  # torn and superseded


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, prefixes: tuple[str, ...] = ()) -> dict:
    """Restore model tensors, optimiser, scheduler and RNG; returns the trainer state."""
    path = Path(path)
    saved = load_file(str(path / "trainable.safetensors"))
    targets = trainable_state(model, prefixes)
    missing = sorted(set(targets) - set(saved))
    if missing:
        from ..errors import ConfigError

        raise ConfigError(
            f"checkpoint {path} does not match this run (missing {missing[0]} and {len(missing) - 1} more); "
            "was the config changed since it was written?"
        )
    with torch.no_grad():
        for name, t in targets.items():
            t.copy_(saved[name].to(t.device, t.dtype))
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    state = json.loads((path / "trainer_state.json").read_text())
    set_rng_state(load_file(str(path / "rng.safetensors")), state.pop("rng"))
    return state
