"""Data parallelism for the one training loop: DDP or FSDP2 under ``torchrun``, nothing otherwise.

The loop asks this module for four things and never branches on the engine:

    engine = dist.wrap(model, mode)        # a module: engine(batch) -> (loss_sum, label_tokens)
    with dist.accumulating(engine, last):  # gradient sync only on an optimiser step's last micro-batch
        (loss_sum * dist.grad_scale / N_global).backward()
    dist.all_reduce_sum(x)                 # losses, token counts, eval sums
    dist.gather_full(tensors)              # full CPU copies of (possibly sharded) tensors, for saving

The loss of every micro-batch is divided by N_global, the label tokens of the whole optimiser
step over all ranks. DDP and FSDP *average* gradients over the W ranks, so the loss is also
multiplied by ``grad_scale = W``; the synced gradient is then

    (1/W) * sum_r  W * dL_r/dθ / N_global  =  sum_r dL_r/dθ / N_global

— exactly the gradient of one process running the whole global batch (for W a power of two
the x W / W pair is exact in floating point).

Why DDP rather than a hand-written all-reduce: DDP buckets gradients and overlaps their
all-reduce with the rest of the backward pass, broadcasts rank 0's weights at start (so a rank
that initialised differently cannot drift), skips communication on accumulation micro-batches
(``no_sync``), and is what NCCL/Gloo are tuned for. For LoRA the gradients are a few MB and
the difference is small; for full fine-tuning it is most of the step.

FSDP2 (``fully_shard``, ``mode="fsdp"``, the equivalent of DeepSpeed ZeRO-3): every transformer block (the model's ``_no_split_modules`` classes)
is one shard group and the loss module is the root, so embeddings, the final norm and a tied
LM head are sharded too. Frozen base weights and trainable adapter weights live in the same
groups; only the trainable ones get gradients and optimiser state (both sharded). Saving
gathers the trainable tensors (``DTensor.full_tensor``) on every rank and rank 0 writes them,
so an adapter checkpoint never needs the full base on one device. ``mode="fsdp_grad_op"`` keeps
the gathered weights from forward to backward (``reshard_after_forward=False``: one all-gather
per step instead of two, more memory), the equivalent of ZeRO-2.

``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; the process group uses NCCL when CUDA
is available and Gloo on CPU (how this is tested here).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .objective import CausalLM, Objective

MODES = ("ddp", "fsdp", "fsdp_grad_op")
ZERO_EQUIVALENT = {2: "fsdp_grad_op", 3: "fsdp"}


def check_launcher(mode: str) -> None:
    """Refuse a launch that asked for an engine peftlab would not run (never a silent fallback).

    ``accelerate launch --use_deepspeed`` / ``--use_fsdp`` only set environment variables that
    a script using accelerate's ``Accelerator`` reads; peftlab's loop runs PyTorch's own engines,
    so such a launch is stopped with the equivalent setting instead of quietly running DDP.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "?")
        equivalent = ZERO_EQUIVALENT.get(int(stage) if stage.isdigit() else -1, "fsdp")
        raise ConfigError(
            f"launched with DeepSpeed ZeRO stage {stage} (accelerate --use_deepspeed), but peftlab trains with "
            f"PyTorch's engines, not DeepSpeed's. Launch without --use_deepspeed and set "
            f"train.distributed={equivalent} (the FSDP2 equivalent of ZeRO-{stage if stage in '23' else 3}); "
            "see docs/distributed.md"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not mode.startswith("fsdp"):
        raise ConfigError(
            f"launched with accelerate --use_fsdp but train.distributed={mode}; set train.distributed=fsdp "
            "(peftlab applies FSDP2 itself; accelerate's FSDP settings are not read)"
        )


class LossModule(nn.Module):
    """``forward(batch) -> (sum of the objective over the batch's units, units)`` over a model.

    The loss is computed inside ``forward`` so DDP's and FSDP's forward hooks run around it,
    whatever the objective (the causal-LM loss calls the backbone and the LM head separately; see
    ``loss.causal_lm_loss``).
    """

    def __init__(self, model: nn.Module, objective: Objective | None = None):
        super().__init__()
        self.model = model
        self.objective = objective or CausalLM()

    def forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        return self.objective.loss(self.model, batch), self.objective.units(batch)


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    mode: str = "none"  # none | ddp | fsdp | fsdp_grad_op, set by wrap()
    owns_group: bool = False  # this context initialised the process group (and tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_scale(self) -> float:
        """Factor on the loss that undoes the engine's gradient averaging (see module docstring)."""
        return float(self.world_size) if self.mode in MODES else 1.0

    # ------------------------------------------------------------------ collectives

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
        return value

    def all_gather_object(self, obj) -> list:
        """``obj`` from every rank, in rank order (small picklable values between our own ranks)."""
        if self.world_size <= 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world_size <= 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn, *args, **kwargs):
        """``fn`` run on rank 0 only, its result (or its ``PeftlabError``) shared with every rank.

        For checks and file work only rank 0 does: the other ranks raise the same error instead
        of waiting at the next collective for a rank that has already stopped.
        """
        from ..errors import PeftlabError

        result, error = None, None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except PeftlabError as e:
                if self.world_size <= 1:
                    raise
                error = (type(e), str(e))
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise error[0](error[1])
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def shutdown(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False

    # ------------------------------------------------------------------ threads

    def default_threads(self) -> int | None:
        """CPU threads per process when several share a machine (None: let runtime decide)."""
        if self.local_world_size <= 1:
            return None
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        return max(1, cores // self.local_world_size)

    # ------------------------------------------------------------------ the engine

    def wrap(self, model: nn.Module, mode: str = "ddp", objective: Objective | None = None) -> nn.Module:
        """The module the loop calls: ``engine(batch) -> (loss_sum, units)`` of ``objective``
        (default: the causal-LM loss).

        Call after the method has been applied (trainable parameters are final) and before the
        optimiser is built (FSDP replaces parameters by sharded ones).
        """
        if mode not in MODES:
            raise ConfigError(f"train.distributed {mode!r} is not one of {', '.join(MODES)}")
        check_launcher(mode)
        engine = LossModule(model, objective)
        if self.world_size <= 1:
            self.mode = "none"
            return engine
        self.mode = mode
        device = next(model.parameters()).device
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            if not any(p.requires_grad for p in model.parameters()):
                raise ConfigError("train.distributed=ddp: the method left no trainable parameters")
            return DDP(engine, device_ids=[device.index] if device.type == "cuda" else None,
                       broadcast_buffers=False, gradient_as_bucket_view=True)
        return self._fully_shard(engine, model, device, reshard_after_forward=mode == "fsdp")

    def _fully_shard(self, engine: nn.Module, model: nn.Module, device: torch.device,
                     reshard_after_forward: bool) -> nn.Module:
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # pragma: no cover - torch < 2.6
            raise ConfigError(
                f"train.distributed=fsdp needs FSDP2 (torch >= 2.6); this is torch {torch.__version__}. "
                "Use train.distributed=ddp"
            ) from None
        block_names = set(getattr(model, "_no_split_modules", None) or [])
        blocks = [m for m in model.modules() if type(m).__name__ in block_names]
        if not blocks:
            raise ConfigError(
                f"train.distributed=fsdp: {type(model).__name__} does not name its transformer blocks "
                "(_no_split_modules), so there is nothing to shard by; use train.distributed=ddp"
            )
        mesh = init_device_mesh(device.type, (self.world_size,))
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(engine, mesh=mesh, reshard_after_forward=reshard_after_forward)
        return engine

    def accumulating(self, engine: nn.Module, last: bool):
        """Context for one micro-batch's forward+backward: sync gradients only when ``last``."""
        if self.mode == "ddp" and not last:
            return engine.no_sync()
        if self.mode.startswith("fsdp"):
            engine.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ sharded tensors

    def gather_full(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full, contiguous CPU copies; sharded (DTensor) entries are all-gathered.

        A collective under FSDP: every rank must call it with the same keys in the same order.
        """
        out = {}
        for name, t in tensors.items():
            t = t.detach()
            if _is_dtensor(t):
                t = t.full_tensor()
            out[name] = t.to("cpu").contiguous()
        return out

    @contextlib.contextmanager
    def full_weights(self, model: nn.Module, tensors: dict[str, torch.Tensor]):
        """Within the block, rank 0's ``model`` holds full copies of the sharded ``tensors``.

        For saving under FSDP: every rank gathers (a collective), rank 0 swaps the gathered
        tensors in for the shards so ordinary ``state_dict``/``save_pretrained`` code sees whole
        weights, and the shards are put back on exit. Without FSDP this does nothing.
        """
        if not self.mode.startswith("fsdp"):
            yield model
            return
        full = self.gather_full(tensors)
        swapped = []
        try:
            if self.is_main:
                for name, value in full.items():
                    path, _, leaf = name.rpartition(".")
                    module = model.get_submodule(path)
                    table = module._parameters if leaf in module._parameters else module._buffers
                    old = table[leaf]
                    device = old.device_mesh.device_type if _is_dtensor(old) else old.device
                    new = value.to(device)
                    table[leaf] = nn.Parameter(new, requires_grad=old.requires_grad) if table is module._parameters \
                        else new
                    swapped.append((table, leaf, old))
            yield model
        finally:
            for table, leaf, old in reversed(swapped):
                table[leaf] = old

    @staticmethod
    def like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``full`` laid out like ``target``: sharded the same way when ``target`` is a DTensor."""
        if _is_dtensor(target):
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(full.to(target.device_mesh.device_type), target.device_mesh,
                                     target.placements, src_data_rank=None)
        return full

    @staticmethod
    def copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
        """Write the full tensor ``full`` into ``target`` (its local shard when sharded)."""
        if _is_dtensor(target):
            local = DistContext.like(full, target).to_local()
            target.to_local().copy_(local.to(target.dtype))
        else:
            target.copy_(full.to(target.device, target.dtype))


def context() -> DistContext:
    """The current process's place in the job (1 process unless launched by torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    owns = False
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        else:
            backend = "gloo"
        torch.distributed.init_process_group(backend=backend)
        owns = True
    return DistContext(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                       int(os.environ.get("LOCAL_RANK", "0")),
                       int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world),
                       owns_group=owns)
