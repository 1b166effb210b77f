"""Resumable checkpoints, written atomically, read without pickle, and resuming a run from them.

``<output_dir>/checkpoints/step-000100/`` holds
    trainable.safetensors    every trainable tensor and the method's own (frozen) tensors
    optimizer.safetensors    optimiser state tensors, keyed ``state.<i>.<name>``
    optimizer.json           the rest of the optimiser state (param groups, scalars)
    scheduler.json           the LR scheduler's state
    rng.safetensors          torch CPU/CUDA generator states of every rank (``rank<r>.<name>``)
    trainer_state.json       global step, data position, python/numpy RNG per rank, counters,
                             fp16's loss scaler (scale, growth tracker), the method's
                             ``run_fields`` (config values it chose while training)
    MANIFEST.json            sizes and sha256 of all of the above, written last

The directory is built in a temp directory, fsynced and renamed into place (``io.atomic_dir``),
so a kill at any instant leaves either no ``step-N`` or a complete one. A checkpoint whose
manifest does not verify (a file lost or damaged afterwards, or a manifest naming a file outside
its folder, which is never read) is torn: ``latest_checkpoint`` skips it with a warning and falls
back to the previous one. Rotation keeps
``save_total_limit`` complete checkpoints and never deletes the newest good one.

Nothing here unpickles: tensors come from safetensors, everything else from JSON, and a
checkpoint directory holding pickle files (``*.pt``, ``*.bin``, ...) is refused. Under FSDP the
trainable tensors and optimiser state are sharded; every rank takes part in gathering them
(``DistContext.gather_full``) and rank 0 writes.

Resuming (``resume``): the newest good checkpoint is loaded into a fresh ``TrainState`` (a
step-dependent method is first brought to the checkpoint's step, so the tensors and optimiser
groups it holds have the checkpoint's shape; the config fields it chose while training,
``Method.run_fields``, recorded in trainer_state.json, are set back before that), metrics.jsonl is cut back to that step, and the run
continues exactly as an uninterrupted one would. ``finished_run`` spots a run already done and
``resume_notes`` lists what changed in the config since it started.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import rundir
from ..config import Config
from ..errors import ConfigError, PeftlabError
from ..io import atomic_dir, sweep_stale, verify_manifest
from .distributed import DistContext
from .runtime import rng_state, set_rng_state
from .step import TrainState, run_on_step

STEP_DIR = re.compile(r"^step-(\d+)$")
STALE_DIR = re.compile(r"^\.(step-\d+)\.(?:tmp|old)-")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class CheckpointError(PeftlabError):
    """A checkpoint that cannot be used (damaged, foreign, or not made by peftlab)."""


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


def _flatten_optimizer(opt: torch.optim.Optimizer, dist: DistContext) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return dist.gather_full(tensors), {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> dict:
    """The optimiser state dict, each state tensor laid out like its parameter (sharded or not)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        i = int(idx)
        if not 0 <= i < len(params):
            raise CheckpointError(f"optimizer.safetensors has state for parameter {i}; this run has {len(params)}")
        if v.shape == params[i].shape and v.dim() > 0:
            v = DistContext.like(v, params[i])
        state.setdefault(i, {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, trainer_state: dict,
                    prefixes: tuple[str, ...] = (), keep: int = 2, dist: DistContext | None = None) -> Path:
    """Write ``checkpoints/step-<step>``. Every rank calls this (gathers); rank 0 writes."""
    dist = dist or DistContext()
    ckpt_root = Path(run_dir) / "checkpoints"
    target = ckpt_root / f"step-{step:06d}"
    state = dist.gather_full(trainable_state(model, prefixes))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer, dist)
    rng_t, rng_m = rng_state()
    all_rng = dist.all_gather_object((rng_t, rng_m))
    if dist.is_main:
        with atomic_dir(target) as tmp:
            save_file(state, str(tmp / "trainable.safetensors"))
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
            (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict(), default=lambda o: None))
            save_file({f"rank{r}.{k}": v.contiguous() for r, (ts, _) in enumerate(all_rng) for k, v in ts.items()},
                      str(tmp / "rng.safetensors"))
            record = {**trainer_state, "step": step, "world_size": dist.world_size,
                      "rng": [m for _, m in all_rng]}
            (tmp / "trainer_state.json").write_text(json.dumps(record))
        rotate(ckpt_root, keep)
    dist.barrier()
    return target


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def recover(run_dir: Path) -> None:
    """Undo what a kill in the middle of a checkpoint write left behind (rank 0 only)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    for name in sorted({m.group(1) for p in root.iterdir() if (m := STALE_DIR.match(p.name))}):
        sweep_stale(root / name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies; torn ones are reported and skipped.

    Raises ``CheckpointError`` when there are checkpoints but none of them is intact (starting
    over silently would throw the run away).
    """
    problems = []
    for _, path in reversed(list_checkpoints(run_dir)):
        problem = verify_manifest(path)
        if problem is None:
            return path
        problems.append(problem)
        warnings.warn(f"skipping torn checkpoint: {problem}", stacklevel=2)
    if problems:
        raise CheckpointError(
            f"every checkpoint in {Path(run_dir) / 'checkpoints'} is damaged ({'; '.join(problems)}); "
            "delete the checkpoints directory to start this run over, or restore it from a copy"
        )
    return None


def rotate(ckpt_root: Path, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints; delete older ones and torn ones.

    Completeness here is the cheap check (manifest present, sizes match); the newest complete
    checkpoint is never deleted, whatever ``keep`` is and whatever lies beside it.
    """
    if keep <= 0:
        return
    all_ckpts = [p for _, p in list_checkpoints(ckpt_root.parent)]
    good = [p for p in all_ckpts if verify_manifest(p, deep=False) is None]
    if not good:
        return  # nothing complete: delete nothing
    for path in good[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for path in all_ckpts:
        if path not in good:
            warnings.warn(f"deleting torn checkpoint {path}", stacklevel=2)
            shutil.rmtree(path, ignore_errors=True)


def refuse_pickles(directory: Path, what: str) -> None:
    """A ``CheckpointError`` when ``directory`` holds pickle files (they are never loaded)."""
    found = sorted(p.name for p in Path(directory).iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if found:
        raise CheckpointError(
            f"{directory} holds pickle files ({', '.join(found)}); peftlab never unpickles because "
            f"unpickling runs arbitrary code. It reads {what} only from safetensors and JSON: resume "
            "from a checkpoint written by peftlab, or convert the weights to safetensors where you trust them"
        )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, prefixes: tuple[str, ...] = (),
                    dist: DistContext | None = None) -> dict:
    """Restore model tensors, optimiser, scheduler and this rank's RNG; returns the trainer state."""
    dist = dist or DistContext()
    path = Path(path)
    refuse_pickles(path, "checkpoints")
    saved = _read_tensors(path / "trainable.safetensors")
    targets = trainable_state(model, prefixes)
    missing = sorted(set(targets) - set(saved))
    if missing:
        raise ConfigError(
            f"checkpoint {path} does not match this run (missing {missing[0]} and {len(missing) - 1} more); "
            "was the config changed since it was written?"
        )
    for name, t in targets.items():
        if tuple(saved[name].shape) != tuple(t.shape):
            raise ConfigError(f"checkpoint {path}: tensor {name} has shape {tuple(saved[name].shape)}, "
                              f"this run's is {tuple(t.shape)}; was the config changed since it was written?")
    with torch.no_grad():
        for name, t in targets.items():
            DistContext.copy_into(t, saved[name])
    state = _read_json(path / "trainer_state.json")
    try:
        opt_sd = _unflatten_optimizer(optimizer, _read_tensors(path / "optimizer.safetensors"),
                                      _read_json(path / "optimizer.json"))
        optimizer.load_state_dict(opt_sd)
        scheduler.load_state_dict(_read_json(path / "scheduler.json"))
        rng_tensors = _read_tensors(path / "rng.safetensors")
        metas = state.pop("rng")
        rank = dist.rank
        if state.get("world_size", 1) != dist.world_size:
            warnings.warn(f"{path} was written by {state.get('world_size', 1)} process(es), this run has "
                          f"{dist.world_size}: resuming, but random streams (dropout) will differ", stacklevel=2)
            rank = min(rank, len(metas) - 1)
        mine = {k.split(".", 1)[1]: v for k, v in rng_tensors.items() if k.startswith(f"rank{rank}.")}
        set_rng_state(mine, metas[rank])
        int(state["step"]), int(state["sampler"]["epoch"]), int(state["sampler"]["position"])
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is not a usable peftlab checkpoint ({type(e).__name__}: {e}); "
                              "resume from an earlier one or delete it") from None
    return state


# ---------------------------------------------------------------------------- resuming a run


def save(state: TrainState, run_dir: Path, sampler, eval_loss: float | None) -> Path:
    """``save_checkpoint`` of a training state at its step, with the loop's own counters."""
    trainer = {"sampler": sampler.state_dict(), "skipped_steps": state.skipped, "bad_in_row": state.bad_in_row,
               "overflow_steps": state.overflows, "eval_loss": eval_loss,
               "run_fields": {k: getattr(state.cfg.peft, k) for k in state.method.run_fields}}
    if state.scaler is not None:  # fp16: the loss scale and its growth tracker (plain numbers)
        trainer["grad_scaler"] = state.scaler.state_dict()
    t = state.cfg.train
    return save_checkpoint(run_dir, state.step, state.model, state.optimizer, state.scheduler, trainer,
                           state.method.state_prefixes, t.save_total_limit, state.dist)


def resume(state: TrainState, sampler, run_dir: Path) -> tuple[list[dict], float | None]:
    """Bring ``state`` and ``sampler`` to the newest good checkpoint in ``run_dir`` (if any) and
    cut metrics.jsonl back to its step; returns (the metric records kept, the last eval loss)."""
    dist, eval_loss = state.dist, None
    latest = dist.on_main(latest_checkpoint, run_dir)
    if latest is not None:
        # a step-dependent method (LISA) first takes the checkpoint's shape, then its values; one whose
        # shape was chosen from data (LoRA-drop's kept layers) gets its recorded choice back first
        for key, value in _read_json(latest / "trainer_state.json").get("run_fields", {}).items():
            if key in state.method.run_fields:
                setattr(state.cfg.peft, key, value)
        run_on_step(state, int(STEP_DIR.match(latest.name).group(1)))
        saved = load_checkpoint(latest, state.model, state.optimizer, state.scheduler,
                                state.method.state_prefixes, dist)
        state.step, state.skipped = int(saved["step"]), int(saved.get("skipped_steps", 0))
        state.bad_in_row, eval_loss = int(saved.get("bad_in_row", 0)), saved.get("eval_loss")
        state.overflows = int(saved.get("overflow_steps", 0))
        if state.scaler is not None and saved.get("grad_scaler"):
            state.scaler.load_state_dict(saved["grad_scaler"])
        elif state.scaler is not None and dist.is_main:
            print(f"note: {latest} was written without fp16 loss scaling; the loss scale starts at "
                  f"{state.scaler.get_scale():g}", file=sys.stderr)
        sampler.load_state_dict(saved["sampler"])
        if dist.is_main:
            print(f"resumed from {latest} at step {state.step}", file=sys.stderr)
    elif dist.is_main:
        print(f"no checkpoint in {run_dir}; starting from step 0", file=sys.stderr)
    metrics = rundir.trim_metrics(run_dir, state.step) if dist.is_main else []
    return metrics, eval_loss


def latest_tensors(run_dir: Path, dist: DistContext) -> dict[str, torch.Tensor] | None:
    """The model tensors of the checkpoint a resume will load (None when there is none): what a
    data-driven init rebuilds its layers from instead of reading data again."""
    latest = dist.on_main(latest_checkpoint, run_dir)
    if latest is None:
        return None
    refuse_pickles(Path(latest), "checkpoints")
    return _read_tensors(Path(latest) / "trainable.safetensors")


def finished_run(cfg: Config, run_dir: Path) -> tuple[dict, Path] | None:
    """(summary.json, the artifact) when ``--resume`` finds the run already done, else None."""
    summary = rundir.read_summary(run_dir)
    if summary is None:
        return None
    try:
        done, target = int(summary["steps"]), int(summary.get("target_steps", summary["steps"]))
    except (ValueError, KeyError, TypeError):
        return None  # a damaged summary: resume normally (the checkpoints decide)
    wanted = cfg.train.steps if cfg.train.steps is not None else target
    artifact = run_dir / Path(str(summary.get("artifact") or "")).name  # this run's own adapter/ or model/
    if done < wanted or artifact.name not in rundir.ARTIFACTS or verify_manifest(artifact, deep=False):
        return None
    print(f"{run_dir} already finished at step {done}; nothing to do (raise train.steps to train further)",
          file=sys.stderr)
    return summary, artifact


def resume_notes(cfg: Config, run_dir: Path) -> list[str]:
    """Config keys that differ from the run being resumed (informational: extending steps is fine)."""
    try:
        old = rundir.saved_config(run_dir)
    except ConfigError:
        return [f"{run_dir / rundir.CONFIG} is damaged; resuming with the given config"]
    if old is None:
        return []
    diffs = []
    for section, values in cfg.to_dict().items():
        before = old.get(section) if isinstance(old.get(section), dict) else {}
        for key, value in values.items():
            if key in before and before[key] != value and key not in ("progress", "threads"):
                diffs.append(f"{section}.{key}: {before[key]!r} -> {value!r}")
    return [f"config changed since the run started: {d}" for d in diffs]
