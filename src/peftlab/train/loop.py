"""The one training loop, for every method.

    for each optimiser step:
        take grad_accum micro-batches; N = label tokens over all of them (and all ranks)
        for each micro-batch: (sum of token losses / N).backward()      # == one big batch
        clip, skip the step if anything is non-finite, AdamW step, LR schedule step
        log (metrics.jsonl, progress bar); eval loss every eval_every; checkpoint every save_every
    save the adapter (PEFT layout) or, for full fine-tuning, the whole model

Methods plug in through ``apply`` (which modules train), ``param_groups``, ``on_train_start``,
``extra_loss`` (a regulariser added to each micro-batch's loss) and ``on_step``; nothing in here
branches on the method's name.
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
from torch import nn

from .. import registry
from ..config import Config
from ..data.dataset import build_datasets
from ..data.tokenize import Example
from ..errors import ConfigError, PeftlabError
from ..export.adapter import save_adapter
from ..io import atomic_dir, atomic_write_text
from ..model.load import load_model
from ..model.params import param_report, trainable_parameters
from . import checkpoint as ckpt
from .distributed import context as dist_context
from .loss import causal_lm_loss, count_label_tokens
from .optim import build_optimizer, build_scheduler
from .runtime import autocast, resolve_precision, seed_everything, set_threads
from .sampler import BatchSampler


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
                  device: torch.device, amp: torch.dtype | None, max_batches: int | None = None) -> float:
    """Token-weighted mean loss over ``examples`` (the model's mode is restored after)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            if max_batches is not None and i // batch_size >= max_batches:
                break
            batch = _to_device(collate_fn(examples[i:i + batch_size]), device)
            with autocast(device, amp):
                loss_sum, n = causal_lm_loss(model, batch)
            total += float(loss_sum)
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


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
    run_dir.mkdir(parents=True, exist_ok=True)


def _trim_metrics(path: Path, step: int) -> list[dict]:
    """Keep the metric lines up to ``step`` (a resumed run rewrites what came after)."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the crash
        if rec.get("step", 0) <= step:
            kept.append(rec)
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


def train(cfg: Config, *, resume: bool = False, model: nn.Module | None = None, tokenizer=None,
          callbacks: list | None = None) -> RunResult:
    """Run one training job described by ``cfg``; returns where everything went."""
    t, started = cfg.train, time.time()
    for key in ("batch_size", "grad_accum"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    dist = dist_context()
    threads = set_threads(t.threads)
    run_dir = Path(t.output_dir)
    if dist.is_main:
        _prepare_run_dir(run_dir, resume, t.overwrite)
    dist.barrier()

    seed_everything(t.seed)
    if model is None:
        model, tokenizer = load_model(cfg.model, seed=t.seed)
    device = next(model.parameters()).device
    method = registry.get(cfg.peft.method)
    seed_everything(t.seed)
    method.apply(model, cfg.peft)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False

    data = build_datasets(cfg.data, tokenizer, t.seed)
    train_ex, eval_ex, stats, encoder = data.train, data.eval, data.stats, data.encoder
    amp = resolve_precision(t.mixed_precision, device)
    steps = total_steps(cfg, len(train_ex), dist.world_size)
    sampler = BatchSampler(len(train_ex), t.batch_size, t.seed, cfg.data.shuffle, dist.rank, dist.world_size)
    if method.on_train_start is not None:
        method.on_train_start(model, cfg.peft, steps)
    optimizer = build_optimizer(model, method, cfg.peft, t)
    scheduler = build_scheduler(optimizer, t, steps)
    params = trainable_parameters(model)
    prefixes = method.state_prefixes

    step, bad_in_row, skipped = 0, 0, 0
    metrics: list[dict] = []
    if resume:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None:
            state = ckpt.load_checkpoint(latest, model, optimizer, scheduler, prefixes)
            step, skipped = state["step"], state.get("skipped_steps", 0)
            sampler.load_state_dict(state["sampler"])
            print(f"resumed from {latest} at step {step}", file=sys.stderr)
        else:
            print(f"no checkpoint in {run_dir}; starting from step 0", file=sys.stderr)
        metrics = _trim_metrics(run_dir / "metrics.jsonl", step) if dist.is_main else []

    report = param_report(model)
    if dist.is_main:
        cfg.save(run_dir / "config.yaml")
        print(f"data: {stats.summary()}", file=sys.stderr)
        print(f"{cfg.peft.method}: trainable {report.trainable:,} / {report.total:,} "
              f"({report.percent:.4f}%); {steps} steps; threads {threads}; "
              f"precision {amp or torch.float32}".replace("torch.", ""), file=sys.stderr)

    progress = None
    if t.progress and dist.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)
    metrics_file = (run_dir / "metrics.jsonl").open("a") if dist.is_main else None
    model.train()
    eval_loss = None
    try:
        while step < steps:
            t0 = time.perf_counter()
            micro = [data.collate([train_ex[i] for i in sampler.next()]) for _ in range(t.grad_accum)]
            n_local = sum(count_label_tokens(b["labels"]) for b in micro)
            n_tokens = int(dist.all_reduce_sum(torch.tensor(float(n_local), device=device)).item())
            loss_total = torch.zeros((), device=device)
            extra_total = None
            for batch in micro:
                batch = _to_device(batch, device)
                with autocast(device, amp):
                    loss_sum, _ = causal_lm_loss(model, batch)
                extra = method.extra_loss(model, cfg.peft) if method.extra_loss is not None else None
                objective = loss_sum / max(n_tokens, 1)
                if extra is not None:
                    objective = objective + extra.float() / t.grad_accum
                    extra_total = float(extra.detach()) / t.grad_accum + (extra_total or 0.0)
                objective.backward()
                loss_total += loss_sum.detach()
            dist.sync_gradients(params)
            loss_total = dist.all_reduce_sum(loss_total)
            if t.max_grad_norm:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            else:
                grad_norm = torch.linalg.vector_norm(
                    torch.stack([p.grad.detach().float().norm() for p in params if p.grad is not None]))
            loss = float(loss_total) / max(n_tokens, 1)
            if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
                optimizer.zero_grad(set_to_none=True)
                bad_in_row += 1
                skipped += 1
                print(f"step {step + 1}: non-finite loss or gradient; step skipped "
                      f"({bad_in_row} in a row)", file=sys.stderr)
                if bad_in_row >= t.max_bad_steps:
                    raise PeftlabError(
                        f"{bad_in_row} optimiser steps in a row had a non-finite loss or gradient "
                        f"(last loss {loss}); lower train.lr, use train.mixed_precision=no, or check the data"
                    )
                continue
            bad_in_row = 0
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            if method.on_step is not None:  # before zero_grad: AdaLoRA reads this step's gradients
                method.on_step(model, cfg.peft, step, optimizer)
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            n_input = int(dist.all_reduce_sum(torch.tensor(float(sum(int(b["attention_mask"].sum()) for b in micro)),
                                                            device=device)).item())
            record = {"step": step, "loss": round(loss, 6), "lr": lr, "tokens_per_s": round(n_input / dt, 2),
                      "label_tokens": n_tokens, "grad_norm": round(float(grad_norm), 6)}
            if extra_total is not None:
                record["extra_loss"] = round(extra_total, 6)
            is_last = step == steps
            if eval_ex and ((t.eval_every and step % t.eval_every == 0) or is_last):
                eval_loss = evaluate_loss(model, eval_ex, t.batch_size, data.collate, device, amp, t.eval_batches)
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
            if t.save_every and step % t.save_every == 0 and not is_last and dist.is_main:
                ckpt.save_checkpoint(run_dir, step, model, optimizer, scheduler,
                                     {"sampler": sampler.state_dict(), "skipped_steps": skipped},
                                     prefixes, t.save_total_limit)
    finally:
        if progress is not None:
            progress.close()
        if metrics_file is not None:
            metrics_file.close()

    artifact = None
    if dist.is_main:
        if t.save_every:
            ckpt.save_checkpoint(run_dir, step, model, optimizer, scheduler,
                                 {"sampler": sampler.state_dict(), "skipped_steps": skipped}, prefixes,
                                 t.save_total_limit)
        artifact = save_artifact(model, tokenizer, cfg, run_dir)
        summary = {"steps": step, "eval_loss": eval_loss, "skipped_steps": skipped,
                   "trainable": report.trainable, "total": report.total, "data": stats.summary(),
                   "wall_time_s": round(time.time() - started, 2), "artifact": str(artifact)}
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    dist.barrier()
    model.eval()
    return RunResult(run_dir, step, metrics, eval_loss, artifact, model, tokenizer, encoder, data,
                     time.time() - started)


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
