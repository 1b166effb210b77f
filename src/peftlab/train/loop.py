"""The one training loop, for every method and every number of processes.

    check the inputs; a finished run asked to resume returns its recorded result
    set up: load the model, apply the method, load the data       (validate.py checks it all fits)
    state = start_training(...)                                    (train/step.py)
    resume from the newest good checkpoint when asked              (train/checkpoint.py)
    until the last step:
        record = train_step(state, grad_accum micro-batches)       (None: a non-finite step, skipped)
        eval loss every eval_every steps and at the end            (train/evaluate.py)
        log (metrics.jsonl, progress bar, callbacks); checkpoint every save_every
    finalize the method; save the adapter (PEFT layout) or, for full fine-tuning, the whole model;
    summary.json, with the verdict on the loss curves (ended still learning, or overfitting;
    train/diagnosis.py), which stderr also gets as a note

Methods plug in through ``apply`` and ``finalize`` here and through ``train_step``'s hooks (see
registry.Method); distribution through ``train/distributed.py`` (the engine the loss is computed
with, gradient sync, reductions). Nothing here branches on the method's name or the engine.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import registry, rundir
from ..config import Config
from ..export.adapter import save_adapter
from ..io import atomic_dir, atomic_write_text, verify_manifest
from ..model.params import ParamReport, param_report
from ..validate import check_run_fits
from . import checkpoint as ckpt
from . import setup
from .diagnosis import diagnose
from .distributed import DistContext
from .distributed import context as dist_context
from .evaluate import evaluate_loss
from .objective import Objective
from .pref_setup import build_objective, precompute_reference, prepare_data
from .preference import reduce_stats
from .runtime import seed_everything, set_threads
from .step import TrainState, start_training, train_step


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


@dataclass
class _Run:
    """One run's setup, shared by the loop and the final save."""

    cfg: Config
    dist: DistContext
    run_dir: Path
    state: TrainState
    data: object  # data.dataset.Datasets
    sampler: object
    tokenizer: object
    report: ParamReport
    total: int  # optimiser steps of the whole run
    started: float


def train(cfg: Config, *, resume: bool = False, model: nn.Module | None = None, tokenizer=None,
          callbacks: list | None = None, objective: Objective | None = None) -> RunResult:
    """Run one training job described by ``cfg``; returns where everything went.

    ``objective`` (train/objective.py) is what the steps minimise and evaluation reports; default
    the causal-LM loss. Under ``torchrun`` every process calls this; rank 0 logs and writes files.
    """
    t, started = cfg.train, time.time()
    setup.check_inputs(cfg)
    run_dir = Path(t.output_dir)
    if resume and (done := ckpt.finished_run(cfg, run_dir)) is not None:
        summary, artifact = done
        return RunResult(run_dir, int(summary["steps"]), rundir.read_metrics(run_dir),
                         summary.get("eval_loss"), artifact, wall_time=0.0)
    dist = dist_context()
    try:
        return _train(cfg, dist, run_dir, resume, model, tokenizer, callbacks, started, objective)
    finally:
        dist.shutdown()


def _train(cfg: Config, dist: DistContext, run_dir: Path, resume: bool, model, tokenizer, callbacks,
           started: float, objective: Objective | None) -> RunResult:
    t = cfg.train
    threads = set_threads(t.threads or dist.default_threads() or 0)
    dist.on_main(setup.prepare_run_dir, run_dir, resume, t.overwrite)
    if resume:
        dist.on_main(ckpt.recover, run_dir)
    model, tokenizer = setup.prepared_model(cfg, model, tokenizer)
    data = setup.load_data(cfg, tokenizer, t.seed)
    prepare_data(cfg, data)
    _data_init(cfg, model, data, run_dir, resume, dist)
    notes = check_run_fits(model, data, cfg.data, t, dist.world_size)
    steps = setup.total_steps(cfg, len(data.train), dist.world_size)
    sampler = data.sampler(t.batch_size, t.seed, cfg.data.shuffle, dist.rank, dist.world_size)
    if objective is None and t.objective != "lm":  # the reference copy (if any) is of the model as it starts
        objective = build_objective(cfg, model, {"chunk_rows": t.loss_chunk, "fused": t.fused_loss}, data)
    report = param_report(model)  # before wrapping: FSDP turns parameters into shards
    state = start_training(model, cfg, steps, dist=dist, objective=objective)
    precompute_reference(state.objective, model, data, t.batch_size, state.device, state.amp)
    seed_everything(t.seed + dist.rank)  # the training stream (dropout) differs between ranks
    run = _Run(cfg, dist, run_dir, state, data, sampler, tokenizer, report, steps, started)
    metrics, eval_loss = [], None
    if resume:
        notes += ckpt.resume_notes(cfg, run_dir)
    if dist.is_main:  # the config as given: resuming may set back fields the method chose (run_fields)
        cfg.save(run_dir / rundir.CONFIG)
    if resume:
        metrics, eval_loss = ckpt.resume(state, sampler, run_dir)
    if dist.is_main:
        _announce(run, notes, threads)
    with _Log(run, metrics, callbacks) as log:
        eval_loss = _loop(run, log, eval_loss)
    artifact = _finish(run, eval_loss, metrics)
    return RunResult(run_dir, state.step, metrics, eval_loss, artifact, model, tokenizer, data.encoder, data,
                     time.time() - started)


def _data_init(cfg: Config, model: nn.Module, data, run_dir: Path, resume: bool, dist: DistContext) -> None:
    """A data-driven init (``Method.init_from_data``: EVA, CorDA, LoRA-GA) reads its batches once,
    before the optimiser exists; a resumed run gives it the checkpoint's tensors instead, so the
    init is not redone (the checkpoint holds its result)."""
    method = registry.get(cfg.peft.method)
    if method.init_from_data is None or not (method.init_batches and method.init_batches(cfg.peft)):
        return
    saved = ckpt.latest_tensors(run_dir, dist) if resume else None
    batches = None if saved is not None else setup.init_batches(method, cfg, data)
    method.init_from_data(model, cfg.peft, batches, saved)


def _loop(run: _Run, log: _Log, eval_loss: float | None) -> float | None:
    """Optimiser steps until the run's last, with evaluation, logging and checkpoints; returns the
    last eval loss."""
    state, data, t = run.state, run.data, run.cfg.train
    state.model.train()
    batches = getattr(state.objective, "batches", None)  # an objective that makes its own (GRPO's rollouts)
    while state.step < run.total:
        def draw():
            return [data.train[i] for i in run.sampler.next()]
        if batches is not None:
            micro = batches(state, draw, t.grad_accum)
        else:
            micro = [data.collate(draw()) for _ in range(t.grad_accum)]
        record = train_step(state, micro)
        if record is None:  # skipped (non-finite); train_step stops the run when too many in a row
            continue
        step, is_last = state.step, state.step == run.total
        if t.threads == 0 and run.dist.world_size == 1 and step % 25 == 0:  # neighbours come and go
            set_threads(0)
        if data.eval and ((t.eval_every and step % t.eval_every == 0) or is_last):
            objective = state.objective
            own = getattr(objective, "eval_objective", None)  # GRPO: the held-out answers' NLL (no engine needed)
            eval_loss = evaluate_loss(state.model, data.eval, t.batch_size, data.collate, state.device, state.amp,
                                      t.eval_batches, state.engine if own is None else None, state.dist,
                                      own or objective)
            record["eval_loss"] = round(eval_loss, 6)
            if hasattr(objective, "evaluate"):  # GRPO: held-out rewards, sampled completions
                record.update(objective.evaluate(state, run.dist))
            elif hasattr(objective, "pop_stats"):  # preference accuracy, margin, rewards on held-out pairs
                record.update(reduce_stats(state.objective.pop_stats(), run.dist, state.device, "eval_"))
        log.write(record, step % max(t.log_every, 1) == 0 or "eval_loss" in record or is_last, eval_loss)
        if t.save_every and step % t.save_every == 0 and not is_last:
            ckpt.save(state, run.run_dir, run.sampler, eval_loss)
    return eval_loss


def _finish(run: _Run, eval_loss: float | None, metrics: list[dict]) -> Path | None:
    """The final checkpoint (unless the last step's exists), the artifact, summary.json with the
    verdict on the curves (train/diagnosis.py; also a note on stderr)."""
    state, dist, cfg = run.state, run.dist, run.cfg
    model, method = state.model, state.method
    final = run.run_dir / "checkpoints" / f"step-{state.step:06d}"
    if cfg.train.save_every and not dist.broadcast_object(final.is_dir() and verify_manifest(final) is None):
        ckpt.save(state, run.run_dir, run.sampler, eval_loss)
    if method.finalize is not None:
        method.finalize(model, cfg.peft)
    whole = method.peft_type is None  # the artifact is the whole model (full fine-tuning)
    to_gather = dict(model.state_dict(keep_vars=True)) if whole else ckpt.trainable_state(model, method.state_prefixes)
    artifact = None
    with dist.full_weights(model, to_gather):
        if dist.is_main:
            artifact = save_artifact(model, run.tokenizer, cfg, run.run_dir)
            if hasattr(state.objective, "save"):  # the objective's own trained tensors (a reward model's head)
                state.objective.save(model, run.run_dir)
    if dist.is_main:
        verdict = diagnose(metrics)
        summary = {"steps": state.step, "target_steps": run.total, "eval_loss": eval_loss,
                   "skipped_steps": state.skipped,
                   **({"overflow_steps": state.overflows, "loss_scale": state.scaler.get_scale()}
                      if state.scaler is not None else {}), "trainable": run.report.trainable, "total": run.report.total,
                   "data": run.data.stats.summary(), "world_size": dist.world_size,
                   "wall_time_s": round(time.time() - run.started, 2), "artifact": str(artifact),
                   **peak_memory(state.device), "diagnosis": verdict and verdict.to_dict()}
        atomic_write_text(run.run_dir / rundir.SUMMARY, json.dumps(summary, indent=2))
        if verdict is not None:
            print(f"note: {verdict.message}; {verdict.advice}", file=sys.stderr)
    dist.barrier()
    model.eval()
    return artifact


class _Log:
    """Where the step records go (rank 0): metrics.jsonl, ``metrics``, the callbacks and the
    progress bar (every step; the file and callbacks get the steps the loop keeps)."""

    def __init__(self, run: _Run, metrics: list[dict], callbacks: list | None):
        self.metrics, self.callbacks = metrics, callbacks or []
        main = run.dist.is_main
        self.file = (run.run_dir / rundir.METRICS).open("a") if main else None
        self.progress = None
        if run.cfg.train.progress and main:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=run.total, initial=run.state.step, desc="train", dynamic_ncols=True,
                                 file=sys.stderr)

    def __enter__(self) -> _Log:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.file is not None:
            self.file.close()

    def write(self, record: dict, keep: bool, eval_loss: float | None) -> None:
        if self.file is not None and keep:
            self.metrics.append(record)
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            for cb in self.callbacks:
                cb(record)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                      tok_s=f"{record['tokens_per_s']:.0f}",
                                      **({"eval": f"{eval_loss:.4f}"} if eval_loss is not None else {}))
            self.progress.update(1)


def _announce(run: _Run, notes: list[str], threads: int) -> None:
    """The notes, the data and the run's shape, on stderr before the first step."""
    cfg, dist, report = run.cfg, run.dist, run.report
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"data: {run.data.stats.summary()}", file=sys.stderr)
    engine_note = f"; {dist.world_size} processes ({dist.mode})" if dist.world_size > 1 else ""
    print(f"{cfg.peft.method}: trainable {report.trainable:,} / {report.total:,} "
          f"({report.percent:.4f}%); {run.total} steps at lr {cfg.train.lr:g} ({cfg.train.schedule}); "
          f"threads {threads}{engine_note}; "
          f"precision {run.state.amp or torch.float32}".replace("torch.", "")
          + (" with dynamic loss scaling" if run.state.scaler is not None else ""), file=sys.stderr)


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
