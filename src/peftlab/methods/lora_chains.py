"""Chain of LoRA and PeriodicLoRA: residual chains of LoRA merged into the base and restarted.

Xia, Qin & Hazan, "Chain of LoRA: Efficient Fine-tuning of Language Models via Residual Learning"
(COLA, 2024), arXiv:2401.04151.
Meng et al., "PeriodicLoRA: Breaking the Low-Rank Bottleneck in LoRA Optimization" (PLoRA, 2024),
arXiv:2402.16141.

    W_T = W_0 + Σ_{j=1..M} s B_j A_j          each link (B_j, A_j) a LoRA trained on top of the merged rest

    chain_lora:     T steps split into M links of ceil(T / M) steps; at the end of each link but the
                    last: W <- W + s B A, A <- fresh init, B <- 0, and the AdamW state of A and B
                    dropped (moments and step count: the next link starts with a fresh optimiser)
    periodic_lora:  every k steps: W <- W + (1 - μ) s B A,  B <- μ B  (A kept when μ > 0; with μ = 0,
                    A <- fresh init, B <- 0), and the AdamW state of A and B dropped

μ (``unload_momentum``) is PeriodicLoRA's momentum-based unloading as peftlab reads it: only a
(1 - μ) share of the update is unloaded into W and the rest stays in the adapter for the next
stage, which damps the jump a full unload-and-reset gives the next steps. Both restarts use the one
merge-and-restart mechanism (``relora.restart``, shared with ReLoRA): W + s B A is the same before
and after, so the model's output is unchanged at every restart (tested: logits equal, and a run
resumed across a restart equals one that never stopped). Between restarts both are plain LoRA
(every LoRA field applies, except the PiSSA/OLoRA inits). Trainable at any time: LoRA's r (in + out)
per layer; the total update can reach rank M r (COLA) or (T / k) r (PLoRA).

Like ReLoRA the saved adapter carries the adapted layers' base weights (``peft_type`` CHAIN_LORA /
PERIODIC_LORA; peftlab loads them, PEFT cannot); ``merge`` gives the plain model. A quantised
base is refused: each restart would requantise W + s B A and change the model's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..quant.convert import model_is_quantized
from ..registry import StepEffects
from . import lora, relora


def _check(cfg) -> None:
    if cfg.init not in ("kaiming", "gaussian"):
        raise ConfigError(f"peft.init={cfg.init} re-derives W at every restart; {cfg.method} takes kaiming or gaussian")


@dataclass
class ChainLoRAConfig(lora.LoRAConfig):
    method: str = "chain_lora"
    chain_links: int = 3  # M: LoRA links trained one after another over the run

    def validate(self) -> None:
        super().validate()
        _check(self)
        if self.chain_links < 1:
            raise ConfigError(f"peft.chain_links must be >= 1, got {self.chain_links}")


@dataclass
class PeriodicLoRAConfig(lora.LoRAConfig):
    method: str = "periodic_lora"
    unload_every: int = 100  # k: optimiser steps per stage
    unload_momentum: float = 0.0  # μ: the share of the update kept in the adapter at an unload

    def validate(self) -> None:
        super().validate()
        _check(self)
        if self.unload_every < 1:
            raise ConfigError(f"peft.unload_every must be >= 1, got {self.unload_every}")
        if not 0.0 <= self.unload_momentum < 1.0:
            raise ConfigError(f"peft.unload_momentum must be in [0, 1), got {self.unload_momentum}")


def apply(model: nn.Module, cfg) -> None:
    if model_is_quantized(model):
        raise ConfigError(f"{cfg.method} merges the adapter into the base weights at every restart, and a 4/8-bit "
                          "base would be requantised (the model's output would jump); use model.quantize=none "
                          "(or peft.method=relora, which accepts the lossy requantisation)")
    lora.apply(model, cfg)
    relora.untie_adapted(model)


def chain_start(model: nn.Module, cfg: ChainLoRAConfig, total_steps: int) -> None:
    """Fix the run's link length (training only; set again on resume, before the checkpoint loads)."""
    model.__dict__["_chain"] = (total_steps, math.ceil(total_steps / cfg.chain_links))


def chain_link_steps(model: nn.Module) -> tuple[int, int]:
    """(total steps, steps per link) of the run, from ``chain_start``."""
    if "_chain" not in model.__dict__:
        raise RuntimeError("chain_lora's on_step ran before on_train_start; train through peftlab.train.step")
    return model.__dict__["_chain"]


def chain_step(model: nn.Module, cfg: ChainLoRAConfig, step: int) -> StepEffects | None:
    """At the end of every link but the last: merge, re-initialise, and drop the optimiser state."""
    total, link = chain_link_steps(model)
    if step % link or step >= total:
        return None
    return StepEffects(reset=relora.restart(model, cfg), metrics={"chain_link": step // link + 1})


def periodic_step(model: nn.Module, cfg: PeriodicLoRAConfig, step: int) -> StepEffects | None:
    """Every ``unload_every`` steps: unload (1 - μ) of the update into W, keep μ, drop the optimiser state."""
    if step % cfg.unload_every:
        return None
    return StepEffects(reset=relora.restart(model, cfg, keep=cfg.unload_momentum))


lora.register_variant("chain_lora", ChainLoRAConfig, apply, chain_step, ("chain_links",), on_train_start=chain_start)
lora.register_variant("periodic_lora", PeriodicLoRAConfig, apply, periodic_step, ("unload_every", "unload_momentum"))
