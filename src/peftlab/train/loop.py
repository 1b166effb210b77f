"""The one training loop, for every method and every number of processes.

    for each optimiser step:
        take grad_accum micro-batches; N = label tokens over all of them (and all ranks)
        for each micro-batch: (sum of token losses * grad_scale / N).backward()   # == one big batch
        clip; skip the step if the loss or gradient is non-finite (stop after max_bad_steps in a row)
        AdamW step, LR schedule step
        log (metrics.jsonl, progress bar); eval loss every eval_every; checkpoint every save_every
    save the adapter (PEFT layout) or, for full fine-tuning, the whole model

Methods plug in through ``apply`` (which modules train), ``param_groups``, ``on_train_start``,
``aux_loss`` (an extra term of each micro-batch's objective), ``on_step`` and ``finalize`` (see
registry.Method); distribution through ``train/distributed.py`` (the engine the loss is computed
with, gradient sync, reductions); resume through ``train/checkpoint.py``. Nothing here branches on
the method's name or the engine. Before any work, ``validate.py`` checks the inputs (paths, values,
the data against the model's context and the batch), so an impossible run stops at once.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from .. import registry
from ..config import Config
from ..data.dataset import build_datasets
from ..data.tokenize import Example
from ..errors import ConfigError, DataError, PeftlabError
from ..export.adapter import save_adapter
from ..io import atomic_dir, atomic_write_text, verify_manifest
from ..model.load import is_config_name, load_model
from ..model.params import param_report, trainable_parameters
from ..validate import check_data_settings, check_output_dir, check_path, check_run_fits, refuse_pickled_model
from . import checkpoint as ckpt
from .distributed import DistContext
from .distributed import context as dist_context
from .loss import causal_lm_loss, count_input_tokens, count_label_tokens
from .optim import build_optimizer, build_scheduler
from .runtime import autocast, resolve_precision, seed_everything, set_threads


class TrainingDiverged(PeftlabError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""


class OutOfMemory(PeftlabError):
    """A training step needed more memory than the device has; the message says what to change."""


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, the CPU allocator's "can't allocate memory", Python's MemoryError."""
    if isinstance(e, MemoryError) or isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg)


def out_of_memory_advice(cfg: Config, micro: list[dict], step: int, device: torch.device, amp) -> str:
    """What to change when step ``step + 1`` did not fit, with the settings of this run."""
    t, rows = cfg.train, micro[0]["input_ids"]
    tips = [f"lower train.batch_size (now {t.batch_size}) and raise train.grad_accum (now {t.grad_accum}) by the "
            "same factor: the optimiser step stays the same"]
    if not cfg.model.gradient_checkpointing:
        tips.append("set model.gradient_checkpointing=true (recompute activations in backward; "
                    "model.checkpoint_layers=0.5 for half of the memory saving at less cost)")
    elif cfg.model.checkpoint_layers < 1:
        tips.append(f"raise model.checkpoint_layers (now {cfg.model.checkpoint_layers}) to 1.0")
    tips.append(f"lower data.max_length (now {cfg.data.max_length})")
    if amp is None and device.type != "cpu":
        tips.append("train in half precision: train.mixed_precision=bf16")
    if cfg.model.quantize is None and cfg.peft.method != "full":
        tips.append("store the frozen base in 4 bits: model.quantize=nf4")
    if device.type == "cuda":
        tips.append("with several GPUs, shard the model: torchrun ... train.distributed=fsdp")
    return (f"out of memory in training step {step + 1} on {device} (micro-batch of {rows.shape[0]} rows x "
            f"{rows.shape[1]} tokens, {len(micro)} micro-batch(es) per step). Checkpoints already written are "
            "intact (--resume continues from the last one). To fit: " + "; ".join(tips) + ".")


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    metrics: list[dict] = field(default_factory=list)
    eval_loss: float | None = None
    artifact: Path | None = None  # adapter/ or model/
    model: nn.Module | None = None
    tokenizer: object = None
    encoder: object = None
    data: object = None  # the Datasets the run trained and evaluated on
    wall_time: float = 0.0


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: list[Example], batch_size: int, collate_fn,
                  device: torch.device, amp: torch.dtype | None, max_batches: int | None = None,
                  engine: nn.Module | None = None, dist: DistContext | None = None) -> float:
    """Token-weighted mean loss over ``examples`` (the model's mode is restored after).

    With several processes each rank scores every world_size-th batch and the sums are reduced.
    ``engine`` (from ``DistContext.wrap``) computes the loss where FSDP must gather weights;
    under FSDP every rank runs the same number of forwards (a rank short of batches repeats its
    first one with weight 0).
    """
    dist = dist or DistContext()
    loss_fn = engine if engine is not None else (lambda b: causal_lm_loss(model, b))
    was_training = model.training
    model.eval()
    starts = list(range(0, len(examples), batch_size))
    if max_batches is not None:
        starts = starts[:max_batches]
    mine = starts[dist.rank::dist.world_size]
    rounds = math.ceil(len(starts) / dist.world_size) if dist.mode.startswith("fsdp") else len(mine)
    total, count = 0.0, 0
    try:
        for r in range(rounds):
            i, weight = (mine[r], 1) if r < len(mine) else (starts[0], 0)
            batch = _to_device(collate_fn(examples[i:i + batch_size]), device)
            with autocast(device, amp):
                loss_sum, n = loss_fn(batch)
            total += weight * float(loss_sum)
            count += weight * n
    finally:
        model.train(was_training)
    sums = dist.all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64, device=device))
    return float(sums[0]) / max(float(sums[1]), 1.0)


def apply_speed_options(model: nn.Module, t) -> dict:
    """``train.fast_lora`` (a flag on every LoRA layer) and ``train.compile`` (the backbone);
    returns the loss options (``causal_lm_loss`` keyword arguments) of the other levers."""
    sharded = str(getattr(t, "distributed", "none")).startswith("fsdp")
    for m in model.modules():  # the LoRA function's caches are Python state that dynamo cannot trace
        if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
            m.fast_path = t.fast_lora and not t.compile
            m.cache_weight = not sharded  # no persistent copies of FSDP-unsharded weights
    if t.compile:
        model.base_model.compile()
    return {"chunk_rows": t.loss_chunk, "fused": t.fused_loss, "skip_pad_mask": t.skip_pad_mask}


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    has_run = (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()
    if has_run and not resume:
        if not overwrite:
            raise ConfigError(
                f"train.output_dir {str(run_dir)!r} already holds a run; pass --resume to continue it, "
                "choose another train.output_dir, or set train.overwrite=true to replace it"
            )
        for name in ("checkpoints", "metrics.jsonl", "adapter", "model", "summary.json"):
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    check_output_dir(run_dir)


def _read_metrics(path: Path, step: int | None = None) -> list[dict]:
    """Metric records from ``path`` (up to ``step``), skipping a line torn by a crash."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and (step is None or rec.get("step", 0) <= step):
            kept.append(rec)
    return kept


def _trim_metrics(path: Path, step: int) -> list[dict]:
    """Keep the metric lines up to ``step`` (a resumed run rewrites what came after)."""
    kept = _read_metrics(path, step)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


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


# ---------------------------------------------------------------------------- resume and guards


def _finished_run(cfg: Config, run_dir: Path) -> RunResult | None:
    """The recorded result when ``--resume`` finds the run already done (nothing is retrained)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        done, target = int(summary["steps"]), int(summary.get("target_steps", summary["steps"]))
    except (ValueError, KeyError, TypeError):
        return None  # a damaged summary: resume normally (the checkpoints decide)
    wanted = cfg.train.steps if cfg.train.steps is not None else target
    artifact = run_dir / Path(str(summary.get("artifact") or "")).name  # this run's own adapter/ or model/
    if done < wanted or artifact.name not in ("adapter", "model") or verify_manifest(artifact, deep=False):
        return None
    print(f"{run_dir} already finished at step {done}; nothing to do (raise train.steps to train further)",
          file=sys.stderr)
    return RunResult(run_dir, done, _read_metrics(run_dir / "metrics.jsonl"), summary.get("eval_loss"), artifact,
                     wall_time=0.0)


def _resume_notes(cfg: Config, run_dir: Path) -> list[str]:
    """Config keys that differ from the run being resumed (informational: extending steps is fine)."""
    path = run_dir / "config.yaml"
    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError):
        return [f"{path} is damaged; resuming with the given config"]
    if not isinstance(old, dict):
        return []
    new = cfg.to_dict()
    diffs = []
    for section, values in new.items():
        before = old.get(section) if isinstance(old.get(section), dict) else {}
        for key, value in values.items():
            if key in before and before[key] != value and key not in ("progress", "threads"):
                diffs.append(f"{section}.{key}: {before[key]!r} -> {value!r}")
    return diffs


def _apply_method(method, model: nn.Module, cfg: Config) -> None:
    """``method.apply``, with anything but a PeftlabError reported as an incompatibility."""
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


def _load_data(cfg: Config, tokenizer, seed: int):
    """``build_datasets``, with an unexpected failure reported against the data file, not as a traceback."""
    try:
        return build_datasets(cfg.data, tokenizer, seed)
    except PeftlabError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OSError, UnicodeError,
            RecursionError, OverflowError) as e:
        raise DataError(
            f"data.path {cfg.data.path or 'builtin:tasks'!r} could not be read ({type(e).__name__}: {e}); "
            "check the file's format (data.format) and encoding (UTF-8)"
        ) from e


def _check_inputs(cfg: Config) -> None:
    """Config values that reach the filesystem, checked before anything is loaded."""
    cfg.train.validate()
    check_data_settings(cfg.data)
    check_path(cfg.model.name, "model.name")
    if cfg.data.path is not None:
        check_path(cfg.data.path, "data.path")
    if cfg.data.eval_path is not None:
        check_path(cfg.data.eval_path, "data.eval_path")
    if not is_config_name(cfg.model.name):
        refuse_pickled_model(cfg.model.name)


def _trainer_state(sampler, skipped: int, bad_in_row: int, eval_loss: float | None) -> dict:
    return {"sampler": sampler.state_dict(), "skipped_steps": skipped, "bad_in_row": bad_in_row,
            "eval_loss": eval_loss}


def train(cfg: Config, *, resume: bool = False, model: nn.Module | None = None, tokenizer=None,
          callbacks: list | None = None) -> RunResult:
    """Run one training job described by ``cfg``; returns where everything went.

    Under ``torchrun`` every process calls this; rank 0 logs and writes files.
    """
    t, started = cfg.train, time.time()
    _check_inputs(cfg)
    run_dir = Path(t.output_dir)
    if resume and (done := _finished_run(cfg, run_dir)) is not None:
        return done
    dist = dist_context()
    try:
        return _train(cfg, dist, run_dir, resume, model, tokenizer, callbacks, started)
    finally:
        dist.shutdown()


def _train(cfg: Config, dist: DistContext, run_dir: Path, resume: bool, model, tokenizer, callbacks,
           started: float) -> RunResult:
    t = cfg.train
    threads = set_threads(t.threads or dist.default_threads() or 0)
    dist.on_main(_prepare_run_dir, run_dir, resume, t.overwrite)
    if resume:
        dist.on_main(ckpt.recover, run_dir)

    seed_everything(t.seed)
    if model is None:
        model, tokenizer = load_model(cfg.model, seed=t.seed)
    device = next(model.parameters()).device
    method = registry.get(cfg.peft.method)
    seed_everything(t.seed)
    _apply_method(method, model, cfg)
    if cfg.model.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"model.gradient_checkpointing: {type(model).__name__} does not support it; "
                              "set model.gradient_checkpointing=false")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _checkpoint_share(model, cfg.model.checkpoint_layers)
    model.config.use_cache = False

    data = _load_data(cfg, tokenizer, t.seed)
    train_ex, eval_ex, stats, encoder = data.train, data.eval, data.stats, data.encoder
    notes = check_run_fits(model, data, cfg.data, t, dist.world_size)
    amp = resolve_precision(t.mixed_precision, device)
    steps = total_steps(cfg, len(train_ex), dist.world_size)
    sampler = data.sampler(t.batch_size, t.seed, cfg.data.shuffle, dist.rank, dist.world_size)
    if method.on_train_start is not None:
        method.on_train_start(model, cfg.peft, steps)
    report = param_report(model)  # before wrapping: FSDP turns parameters into shards
    engine = dist.wrap(model, t.distributed, **apply_speed_options(model, t))
    optimizer = build_optimizer(model, method, cfg.peft, t)
    scheduler = build_scheduler(optimizer, t, steps)
    params = trainable_parameters(model)
    prefixes = method.state_prefixes
    seed_everything(t.seed + dist.rank)  # the training stream (dropout) differs between ranks

    step, bad_in_row, skipped, eval_loss = 0, 0, 0, None
    metrics: list[dict] = []
    if resume:
        notes += [f"config changed since the run started: {d}" for d in _resume_notes(cfg, run_dir)]
        latest = dist.on_main(ckpt.latest_checkpoint, run_dir)
        if latest is not None:
            if method.on_step is not None:  # bring a step-dependent method (LISA) to the checkpoint's state
                method.on_step(model, cfg.peft, int(ckpt.STEP_DIR.match(latest.name).group(1)), optimizer)
                params = trainable_parameters(model)
            state = ckpt.load_checkpoint(latest, model, optimizer, scheduler, prefixes, dist)
            step, skipped = int(state["step"]), int(state.get("skipped_steps", 0))
            bad_in_row, eval_loss = int(state.get("bad_in_row", 0)), state.get("eval_loss")
            sampler.load_state_dict(state["sampler"])
            if dist.is_main:
                print(f"resumed from {latest} at step {step}", file=sys.stderr)
        elif dist.is_main:
            print(f"no checkpoint in {run_dir}; starting from step 0", file=sys.stderr)
        metrics = _trim_metrics(run_dir / "metrics.jsonl", step) if dist.is_main else []

    if dist.is_main:
        cfg.save(run_dir / "config.yaml")
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"data: {stats.summary()}", file=sys.stderr)
        engine_note = f"; {dist.world_size} processes ({dist.mode})" if dist.world_size > 1 else ""
        print(f"{cfg.peft.method}: trainable {report.trainable:,} / {report.total:,} "
              f"({report.percent:.4f}%); {steps} steps; threads {threads}{engine_note}; "
              f"precision {amp or torch.float32}".replace("torch.", ""), file=sys.stderr)

    progress = None
    if t.progress and dist.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)
    metrics_file = (run_dir / "metrics.jsonl").open("a") if dist.is_main else None
    model.train()
    try:
        while step < steps:
            t0 = time.perf_counter()
            micro = [data.collate([train_ex[i] for i in sampler.next()]) for _ in range(t.grad_accum)]
            n_local = sum(count_label_tokens(b["labels"]) for b in micro)
            n_tokens = int(dist.all_reduce_sum(torch.tensor(float(n_local), device=device)).item())
            try:
                loss_total, aux_total = _accumulate(micro, engine, method, model, cfg, dist, device, amp, n_tokens)
            except (RuntimeError, MemoryError) as e:
                if not is_out_of_memory(e):
                    raise
                raise OutOfMemory(out_of_memory_advice(cfg, micro, step, device, amp)) from None
            loss_total = dist.all_reduce_sum(loss_total)
            if aux_total is not None:  # each rank added its share of the token-weighted mean
                aux_total = float(dist.all_reduce_sum(torch.tensor(aux_total, device=device)))
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
                grad_norm = grad_norm.full_tensor()
            loss = float(loss_total) / max(n_tokens, 1)
            # --- guard: a non-finite loss or gradient never reaches the weights
            if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
                model.zero_grad(set_to_none=True)
                bad_in_row += 1
                skipped += 1
                if dist.is_main:
                    print(f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'} "
                          f"(loss {loss}, grad norm {float(grad_norm)}); step skipped, {bad_in_row} in a row, "
                          f"{skipped} in all", file=sys.stderr)
                if bad_in_row >= t.max_bad_steps:
                    raise TrainingDiverged(
                        f"{bad_in_row} optimiser steps in a row had a non-finite loss or gradient (last loss "
                        f"{loss}, at step {step + 1}); lower train.lr, set train.max_grad_norm, use "
                        "train.mixed_precision=no, or check the data. The last checkpoint is intact; raise "
                        "train.max_bad_steps to tolerate more"
                    )
                continue
            bad_in_row = 0
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            if t.threads == 0 and dist.world_size == 1 and step % 25 == 0:  # neighbours come and go
                threads = set_threads(0)
            # before zero_grad: AdaLoRA reads this step's gradients
            extra = method.on_step(model, cfg.peft, step, optimizer) if method.on_step is not None else None
            if method.on_step is not None:
                params = trainable_parameters(model)  # the method may have changed what trains
            # the model's, not the optimiser's: a method that just moved parameters out of the
            # optimiser (LISA) must not leave their gradients behind
            model.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            n_input = int(dist.all_reduce_sum(torch.tensor(float(sum(count_input_tokens(b) for b in micro)),
                                                            device=device)).item())
            record = {"step": step, "loss": round(loss, 6), "lr": lr, "tokens_per_s": round(n_input / dt, 2),
                      "label_tokens": n_tokens, "grad_norm": round(float(grad_norm), 6), **(extra or {})}
            if aux_total is not None:
                record["aux_loss"] = round(aux_total, 6)
            is_last = step == steps
            if eval_ex and ((t.eval_every and step % t.eval_every == 0) or is_last):
                eval_loss = evaluate_loss(model, eval_ex, t.batch_size, data.collate, device, amp, t.eval_batches,
                                          engine, dist)
                record["eval_loss"] = round(eval_loss, 6)
            if dist.is_main and (step % max(t.log_every, 1) == 0 or "eval_loss" in record or is_last):
                metrics.append(record)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                for cb in callbacks or []:
                    cb(record)
            if progress is not None:
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_input / dt:.0f}",
                                     **({"eval": f"{eval_loss:.4f}"} if eval_loss is not None else {}))
                progress.update(1)
            if t.save_every and step % t.save_every == 0 and not is_last:
                ckpt.save_checkpoint(run_dir, step, model, optimizer, scheduler,
                                     _trainer_state(sampler, skipped, bad_in_row, eval_loss), prefixes,
                                     t.save_total_limit, dist)
    finally:
        if progress is not None:
            progress.close()
        if metrics_file is not None:
            metrics_file.close()

    artifact = None
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    if t.save_every and not dist.broadcast_object(final.is_dir() and verify_manifest(final) is None):
        ckpt.save_checkpoint(run_dir, step, model, optimizer, scheduler,
                             _trainer_state(sampler, skipped, bad_in_row, eval_loss), prefixes, t.save_total_limit,
                             dist)
    if method.finalize is not None:
        method.finalize(model, cfg.peft)
    whole = method.peft_type is None  # the artifact is the whole model (full fine-tuning)
    to_gather = dict(model.state_dict(keep_vars=True)) if whole else ckpt.trainable_state(model, prefixes)
    with dist.full_weights(model, to_gather):
        if dist.is_main:
            artifact = save_artifact(model, tokenizer, cfg, run_dir)
    if dist.is_main:
        summary = {"steps": step, "target_steps": steps, "eval_loss": eval_loss, "skipped_steps": skipped,
                   "trainable": report.trainable, "total": report.total, "data": stats.summary(),
                   "world_size": dist.world_size, "wall_time_s": round(time.time() - started, 2),
                   "artifact": str(artifact), **peak_memory(device)}
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    dist.barrier()
    model.eval()
    return RunResult(run_dir, step, metrics, eval_loss, artifact, model, tokenizer, encoder, data,
                     time.time() - started)


def _accumulate(micro: list[dict], engine, method, model: nn.Module, cfg: Config, dist: DistContext,
                device: torch.device, amp, n_tokens: int) -> tuple[torch.Tensor, float | None]:
    """Forward and backward of one optimiser step's micro-batches, gradients accumulated and
    divided by the step's label tokens; returns (this rank's loss sum, its share of the aux loss)."""
    loss_total, aux_total = torch.zeros((), device=device), None
    for i, batch in enumerate(micro):
        batch = _to_device(batch, device)
        with dist.accumulating(engine, last=i == len(micro) - 1):
            with autocast(device, amp):
                loss_sum, n_micro = engine(batch)
                aux = method.aux_loss(model, cfg.peft, batch) if method.aux_loss is not None else None
            objective = loss_sum if aux is None else loss_sum + aux.float() * n_micro
            if aux is not None:
                aux_total = float(aux.detach()) * n_micro / max(n_tokens, 1) + (aux_total or 0.0)
            # grad_scale undoes DDP/FSDP's averaging over ranks (see train/distributed.py)
            (objective * dist.grad_scale / max(n_tokens, 1)).backward()
        loss_total += loss_sum.detach()
    return loss_total, aux_total


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


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process so far (MiB): resident set size and, on CUDA, peak allocated."""
    out = {}
    try:
        import resource  # Unix only

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        out["peak_rss_mb"] = round(rss / (2**20 if sys.platform == "darwin" else 1024), 1)
    except (ImportError, OSError):
        pass
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def save_artifact(model: nn.Module, tokenizer, cfg: Config, run_dir: Path) -> Path:
    """adapter/ in the PEFT layout, or model/ (a plain HF directory) for full fine-tuning."""
    method = registry.get(cfg.peft.method)
    if method.peft_type is not None:
        return save_adapter(model, cfg.peft, run_dir / "adapter", base_model_name=cfg.model.name)
    out = run_dir / "model"
    with atomic_dir(out) as tmp:
        model.config.use_cache = True
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
