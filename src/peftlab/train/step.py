"""One optimiser step, the unit every run (and every test of a method) is made of.

    state = start_training(model, cfg, total_steps)     # method.on_train_start, init_from, AdamW, schedule
    record = train_step(state, micro_batches)           # None when the step was skipped

``train_step``:
    N = the step's units (label tokens) over all micro-batches and all ranks
    for each micro-batch: ((objective sum + aux * units) * grad_scale / N).backward()   # == one big batch
    fp16: the loss is multiplied by the loss scale (not grad_scale) before backward; the gradients are
          unscaled (and multiplied by grad_scale) before clipping
    clip; a non-finite loss or gradient skips the step (TrainingDiverged after max_bad_steps in a row)
    AdamW step, schedule step (fp16: the loss scale is updated, lowered after an overflow)
    method.on_step (the gradients are still there) and what its StepEffects ask of the optimiser
    zero_grad

fp16 and skipped steps: a skipped step (an fp16 overflow, or a non-finite loss or gradient in any
precision) is not an optimiser step: ``state.step`` and the learning-rate schedule advance only on
applied updates, as accelerate's scheduler does (it skips ``scheduler.step()`` when GradScaler skipped
the optimiser step), so the schedule keeps its shape over the updates the run makes. The run makes
its ``total`` updates whatever was skipped; the skipped step's micro-batches are consumed (HF Trainer
also counts a skipped step's batches as seen). An fp16 overflow at a loss scale >= 1 is GradScaler's
business: it is counted (``state.overflows``; ``overflow_steps`` in every record and in summary.json,
``loss_scale`` in every record) and reported on stderr, but not towards ``train.max_bad_steps``; once
the scale is below 1 a non-finite gradient is a real divergence and counts like any other.

Methods plug in through ``param_groups``, ``on_train_start``, ``aux_loss``, ``on_step`` and
``set_speed`` (registry.Method); the objective through ``train/objective.py``; distribution
through the engine and ``DistContext`` (``train/distributed.py``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from .. import registry
from ..config import Config
from ..errors import PeftlabError
from ..export.adapter import init_from_adapter
from ..model.params import trainable_parameters
from .distributed import DistContext
from .loss import count_input_tokens
from .objective import CausalLM, Objective
from .optim import build_optimizer, build_scheduler, prune_moments, regroup, reset_state, scale_lr
from .preference import reduce_stats
from .runtime import autocast, grad_scaler, resolve_precision, to_device
from .unpad import unpad_blocker


class TrainingDiverged(PeftlabError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""


class OutOfMemory(PeftlabError):
    """A training step needed more memory than the device has; the message says what to change."""


@dataclass
class TrainState:
    """Everything one optimiser step needs; built by ``start_training``."""

    model: nn.Module
    method: registry.Method
    cfg: Config
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    engine: nn.Module  # engine(batch) -> (objective's sum, units), DDP/FSDP-wrapped when distributed
    objective: Objective
    dist: DistContext
    device: torch.device
    amp: torch.dtype | None  # the autocast dtype (None: fp32)
    params: list[nn.Parameter]  # what trains now (clipped); refreshed when a step regroups
    scaler: torch.amp.GradScaler | None = None  # fp16's dynamic loss scaler (None: fp32, bf16)
    step: int = 0  # optimiser steps done
    skipped: int = 0  # non-finite steps skipped in all (fp16 overflows included)
    bad_in_row: int = 0  # ... and in a row, counting towards train.max_bad_steps
    overflows: int = 0  # fp16 steps skipped because the scaled gradients overflowed


def apply_speed_options(model: nn.Module, method: registry.Method, t) -> dict:
    """``train.fast_lora`` (the method's ``set_speed``) and ``train.compile`` (the backbone);
    returns the causal-LM loss options (``CausalLM``/``causal_lm_loss`` keywords) of the other levers."""
    sharded = str(getattr(t, "distributed", "none")).startswith("fsdp")
    if method.set_speed is not None:  # a fused function's caches are Python state dynamo cannot trace;
        method.set_speed(model, t.fast_lora and not t.compile, not sharded)  # no cached FSDP-gathered weights
    if t.compile:
        model.base_model.compile()
    unpad = bool(t.unpad) and unpad_blocker(model, method.name, compiled=t.compile) is None
    return {"chunk_rows": t.loss_chunk, "fused": t.fused_loss, "skip_pad_mask": t.skip_pad_mask, "unpad": unpad}


def start_training(model: nn.Module, cfg: Config, total_steps: int, *, dist: DistContext | None = None,
                   engine: nn.Module | None = None, objective: Objective | None = None) -> TrainState:
    """Make an applied model ready to train for ``total_steps``: train mode, the method's
    ``on_train_start``, ``peft.init_from``, the engine (default: ``dist.wrap`` of the objective,
    itself by default the causal-LM loss with the run's speed options; one process unless ``dist``
    says otherwise), AdamW over the method's groups and the schedule."""
    dist = dist or DistContext()
    method = registry.get(cfg.peft.method)
    device = next(model.parameters()).device
    amp = resolve_precision(cfg.train.mixed_precision, device)
    scaler = _scaler(device, amp, cfg.train, dist)
    if method.on_train_start is not None:
        method.on_train_start(model, cfg.peft, total_steps)
    if getattr(cfg.peft, "init_from", None):
        init_from_adapter(model, method, cfg.peft.init_from)
        reference = getattr(objective, "reference", None)  # DPO, KTO, GRPO (beta > 0): the copy was made
        if reference is not None and reference.copy is not None:  # before the adapter was loaded
            reference.copy.load_state_dict(model.state_dict())
    loss_options = apply_speed_options(model, method, cfg.train)
    objective = objective or CausalLM(**loss_options)
    if engine is None:
        engine = dist.wrap(model, cfg.train.distributed, objective)
    optimizer = build_optimizer(model, method, cfg.peft, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    model.train()
    return TrainState(model, method, cfg, optimizer, scheduler, engine, objective, dist, device, amp,
                      trainable_parameters(model), scaler)


def _scaler(device: torch.device, amp: torch.dtype | None, t, dist: DistContext):
    """fp16's loss scaler. Under FSDP each rank holds a shard of the gradients, so the overflow
    check must be agreed between ranks: torch's ShardedGradScaler all-reduces it."""
    if amp != torch.float16 or not str(getattr(t, "distributed", "none")).startswith("fsdp") or dist.world_size <= 1:
        return grad_scaler(device, amp)
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(device.type)


def train_step(state: TrainState, micro: list[dict]) -> dict | None:
    """One optimiser step over the collated micro-batches ``micro`` (on any device).

    Returns the step's record (``step, loss, lr, tokens_per_s, input_tokens, label_tokens, grad_norm``, the
    method's metrics, ``aux_loss``), or None when a non-finite loss or gradient skipped the step.
    Raises ``TrainingDiverged`` after ``train.max_bad_steps`` skipped steps in a row and
    ``OutOfMemory`` (with what to change) when the step does not fit.
    """
    t0, dist, device = time.perf_counter(), state.dist, state.device
    pop_stats = getattr(state.objective, "pop_stats", None)  # preference objectives' metrics
    if pop_stats is not None:
        pop_stats()  # nothing left over from an evaluation or a failed attempt
    units = [state.objective.units(b) for b in micro]
    n_units = int(dist.all_reduce_sum(torch.tensor(float(sum(units)), device=device)).item())
    try:
        loss_total, aux_total = _accumulate(state, micro, units, n_units)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(out_of_memory_advice(state.cfg, micro, state.step, device, state.amp)) from None
    loss = float(dist.all_reduce_sum(loss_total)) / max(n_units, 1)
    stats = reduce_stats(pop_stats(), dist, device) if pop_stats is not None else {}
    if aux_total is not None:  # each rank added its share of the unit-weighted mean
        aux_total = float(dist.all_reduce_sum(torch.tensor(aux_total, device=device)))
    scaler = state.scaler
    if scaler is not None:  # clipping and the guard see the true gradients
        scaler.unscale_(state.optimizer)
        if dist.grad_scale != 1.0:  # undo the ranks' averaging here (see _accumulate)
            grads = [p.grad for p in state.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, dist.grad_scale)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.params, state.cfg.train.max_grad_norm or math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    if not _finite_or_skipped(state, loss, float(grad_norm)):
        return None
    lr = state.optimizer.param_groups[0]["lr"]
    # unscaled above and found finite, so this is the step GradScaler.step would take (called directly:
    # GradScaler.step hands a fused optimiser its own inf flag, which ShardedGradScaler shapes wrongly)
    state.optimizer.step()
    if scaler is not None:
        scaler.update()  # the scale grows after growth_interval clean steps
    state.scheduler.step()
    state.step += 1
    extra = run_on_step(state, state.step)  # before zero_grad: AdaLoRA reads this step's gradients
    # the model's, not the optimiser's: parameters a regroup just took out of the optimiser (LISA)
    # must not keep their gradients
    state.model.zero_grad(set_to_none=True)
    n_input = sum(count_input_tokens(b) for b in micro)
    n_input = int(dist.all_reduce_sum(torch.tensor(float(n_input), device=device)).item())
    record = {"step": state.step, "loss": round(loss, 6), "lr": lr,
              "tokens_per_s": round(n_input / (time.perf_counter() - t0), 2), "input_tokens": n_input,
              "label_tokens": n_units,
              "grad_norm": round(float(grad_norm), 6), **stats, **extra}
    if aux_total is not None:
        record["aux_loss"] = round(aux_total, 6)
    if scaler is not None:  # the scale the next step's loss is multiplied by; the overflows so far
        record.update(loss_scale=scaler.get_scale(), overflow_steps=state.overflows)
    return record


def _accumulate(state: TrainState, micro: list[dict], units: list[int], n_units: int
                ) -> tuple[torch.Tensor, float | None]:
    """Forward and backward of one step's micro-batches, gradients accumulated and divided by
    the step's units; returns (this rank's loss sum, its share of the aux loss)."""
    s, method = state, state.method
    loss_total, aux_total = torch.zeros((), device=s.device), None
    for i, (batch, n_micro) in enumerate(zip(micro, units)):
        batch = to_device(batch, s.device)
        with s.dist.accumulating(s.engine, last=i == len(micro) - 1):
            with autocast(s.device, s.amp):
                loss_sum = s.engine(batch)[0]
                aux = method.aux_loss(s.model, s.cfg.peft, batch) if method.aux_loss is not None else None
            objective = loss_sum if aux is None else loss_sum + aux.float() * n_micro
            if aux is not None:
                aux_total = float(aux.detach()) * n_micro / max(n_units, 1) + (aux_total or 0.0)
            # grad_scale undoes DDP/FSDP's averaging over ranks (see train/distributed.py); under fp16
            # it is applied after unscaling instead, so the fp16 activation gradients of each rank are
            # those of one process (a loss x W would overflow where one process does not)
            if s.scaler is None:
                (objective * s.dist.grad_scale / max(n_units, 1)).backward()
            else:
                s.scaler.scale(objective / max(n_units, 1)).backward()
        loss_total += loss_sum.detach()
    return loss_total, aux_total


def _finite_or_skipped(state: TrainState, loss: float, grad_norm: float) -> bool:
    """The guard: a non-finite loss or gradient never reaches the weights (the step is skipped)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        state.bad_in_row = 0
        return True
    state.model.zero_grad(set_to_none=True)
    state.skipped += 1
    step, scaler = state.step + 1, state.scaler
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.update()  # when unscale_ found an inf/nan, the scale is lowered
        if math.isfinite(loss) and scale >= 1.0 and scaler.get_scale() < scale:  # fp16 overflow, not divergence
            state.overflows += 1
            if state.dist.is_main:
                print(f"step {step}: fp16 gradient overflow at loss scale {scale:g}; step skipped, loss scale "
                      f"lowered to {scaler.get_scale():g} ({state.overflows} overflow(s) in all)", file=sys.stderr)
            return False
    state.bad_in_row += 1
    bad = state.bad_in_row
    if state.dist.is_main:
        print(f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'} (loss {loss}, grad "
              f"norm {grad_norm}); step skipped, {bad} in a row, {state.skipped} in all", file=sys.stderr)
    if bad >= state.cfg.train.max_bad_steps:
        raise TrainingDiverged(
            f"{bad} optimiser steps in a row had a non-finite loss or gradient (last loss {loss}, at step {step}); "
            "lower train.lr, set train.max_grad_norm, use train.mixed_precision=no, or check the data. The last "
            "checkpoint is intact; raise train.max_bad_steps to tolerate more"
        )
    return False


def run_on_step(state: TrainState, step: int) -> dict:
    """``method.on_step(model, cfg, step)`` and what its ``StepEffects`` ask of the optimiser
    (also called on resume, with the checkpoint's step); returns the metrics it adds."""
    if state.method.on_step is None:
        return {}
    effects = state.method.on_step(state.model, state.cfg.peft, step)
    if effects is None:
        return {}
    if effects.regroup:
        regroup(state.optimizer, state.model, state.method, state.cfg.peft, state.cfg.train)
        state.params = trainable_parameters(state.model)
    if effects.prune is not None:
        prune_moments(state.optimizer, *effects.prune)
    if effects.reset is not None:
        reset_state(state.optimizer, effects.reset)
    if effects.lr_scale != 1.0:
        scale_lr(state.optimizer, effects.lr_scale)
    return dict(effects.metrics)


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
        tips.append("train in half precision: train.mixed_precision=bf16 (fp16 on a GPU without bf16)")
    if cfg.model.quantize is None and cfg.peft.method != "full":
        tips.append("store the frozen base in 4 bits: model.quantize=nf4")
    if device.type == "cuda":
        tips.append("with several GPUs, shard the model: torchrun ... train.distributed=fsdp")
    return (f"out of memory in training step {step + 1} on {device} (micro-batch of {rows.shape[0]} rows x "
            f"{rows.shape[1]} tokens, {len(micro)} micro-batch(es) per step). Checkpoints already written are "
            "intact (--resume continues from the last one). To fit: " + "; ".join(tips) + ".")
