"""GRPO (Shao et al. 2024, DeepSeekMath §4) as an objective of the one training loop:
reinforcement learning from verifiable rewards, with no value model.

    every grpo.num_iterations optimiser steps (a "generation"):
        for each of the step's train.grad_accum micro-batches: train.batch_size prompts from the
        sampler, grpo.num_generations completions each, sampled in this process by the model being
        trained (adapters live, no weight copy: train/grpo_rollout.py), scored by the rewards
        (train/rewards.py), advantages relative to each prompt's group
    each step: the clipped surrogate + β·KL over the completion tokens (train/grpo_loss.py),
        through the same ``train_step`` (accumulation, clipping, guards, DDP, checkpoints); the
        log-probabilities run each prompt once for its group where grpo.share_prompt allows it
        (train/grpo_share.py)

The reference (β > 0) is the model with its modules switched off (train/reference.py), or a
frozen copy for methods that change the base; β = 0 runs no reference pass. Units are what
``grpo.loss_type`` averages over (completions, or completion tokens), so accumulation and data
parallelism average the way the formula says (grpo_loss.py).

Evaluation keeps the causal-LM eval loss on the held-out answers (``eval_objective``) and adds
the held-out reward of greedy completions (``eval_reward``) and a few of the last rollout's
sampled completions (``completions``) to the step's record.

Resuming is exact: a generation's completions depend only on the weights and the seed
(grpo_rollout.rollout_seed), and checkpoints fall between generations (train.save_every is a
multiple of grpo.num_iterations). Under torchrun each process samples its own prompts' groups;
the seeds follow the micro-batches' global order, so 2 processes with grad_accum 1 train as one
process with grad_accum 2 (``scale_rewards=batch`` takes the std over one micro-batch's rows).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..data.prompts import prompts_from_examples, stop_token_ids
from ..errors import ConfigError
from ..model.decode import continue_batch, left_pad
from . import grpo_loss
from .grpo_rollout import completion_logps, cut_at_stop, rollout, rollout_seed
from .objective import CausalLM
from .preference import Stats, reduce_stats
from .reference import Reference
from .rewards import build_rewards, score, weights


class GRPO:
    """The GRPO objective; ``batches`` makes its micro-batches (the loop asks it instead of
    collating data), ``evaluate`` adds held-out rewards to an evaluation."""

    def __init__(self, cfg: Config, data, reference: Reference | None, loss_options: dict, share: bool = False):
        g, t = cfg.grpo, cfg.train
        if t.save_every and t.save_every % g.num_iterations:
            raise ConfigError(f"train.save_every={t.save_every} is not a multiple of grpo.num_iterations="
                              f"{g.num_iterations}: a checkpoint must fall between generations to resume exactly; "
                              f"set train.save_every to a multiple of {g.num_iterations}")
        if t.distributed != "ddp":
            raise ConfigError(f"train.objective=grpo runs with train.distributed=ddp (each process samples with its "
                              f"whole model); got {t.distributed}")
        self.g, self.seed = g, t.seed
        self.eps_low = g.epsilon
        self.eps_high = g.epsilon if g.epsilon_high is None else g.epsilon_high
        self.rewards = build_rewards(g)
        self.tokenizer, self.pad_id = data.encoder.tokenizer, data.pad_id
        self.eos_ids = sorted(stop_token_ids(data.encoder.tokenizer, data.encoder))
        self.reference = reference if g.beta != 0.0 else None
        self.share = share  # grpo.share_prompt resolved (grpo_share.resolve): each prompt runs once per group
        self.eval_objective = CausalLM(**loss_options)  # eval loss: the held-out answers' NLL
        self.eval_prompts = prompts_from_examples(data.eval, self.tokenizer, "the eval split") if data.eval else []
        self.stats, self.rollout_stats = Stats(), {}
        self.cached: tuple[int, list[dict]] | None = None
        self.samples: list[dict] = []

    # -- the loop's questions ------------------------------------------------------------

    def batches(self, state, draw, n_micro: int) -> list[dict]:
        """This step's micro-batches: a new generation every grpo.num_iterations steps (``draw()``
        gives the next prompts from the sampler), else the current one again."""
        generation = state.step // self.g.num_iterations
        if self.cached is None or self.cached[0] != generation:
            micro, stats, self.samples = [], {}, []
            for i in range(n_micro):
                seed = rollout_seed(self.seed, generation, i * state.dist.world_size + state.dist.rank)
                batch, s, samples = rollout(self, state, draw(), seed)
                micro.append(batch)
                self.samples += samples
                for k, (v, n) in s.items():
                    total, count = stats.get(k, (0.0, 0))
                    stats[k] = (total + v, count + n)
            self.cached, self.rollout_stats = (generation, micro), stats
        return self.cached[1]

    def units(self, batch: dict) -> int:
        return grpo_loss.units(batch["completion_mask"], self.g.loss_type, self.g.max_completion_length)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        g, mask = self.g, batch["completion_mask"]
        logps = completion_logps(model, batch, g.temperature, self.share)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        per_token, info = grpo_loss.per_token_loss(logps, old, batch["advantages"], batch.get("ref_logps"), g.beta,
                                                   self.eps_low, self.eps_high)
        m = mask.bool()
        self.stats.add(clip_ratio=info["clipped"][m].float())
        if info["kl"] is not None:
            self.stats.add(kl=info["kl"][m])
        return grpo_loss.token_loss_sum(per_token, mask, g.loss_type)

    def pop_stats(self) -> dict[str, tuple[float, int]]:
        """The loss's statistics since the last call, and the current generation's (every step
        trained on it reports them)."""
        return {**self.stats.pop(), **self.rollout_stats}

    @torch.no_grad()
    def evaluate(self, state, dist) -> dict:
        """Held-out rewards of greedy completions (``eval_reward``, per function with several) and a
        few of the last rollout's sampled completions (``completions``)."""
        out = {}
        prompts = self.eval_prompts[dist.rank::dist.world_size]
        cap = state.cfg.train.eval_batches
        if cap is not None:
            prompts = prompts[:cap * state.cfg.train.batch_size]
        model, n_max = state.model, self.g.max_completion_length
        was, use_cache = model.training, getattr(model.config, "use_cache", True)
        model.eval()
        model.config.use_cache = True
        samples = []
        try:
            bs = max(1, state.cfg.train.batch_size * self.g.num_generations)
            for start in range(0, len(prompts), bs):
                part = prompts[start:start + bs]
                ids, mask = left_pad([p.input_ids for p in part], self.pad_id)
                new = continue_batch(model, ids.to(state.device), mask.to(state.device), n_max, self.eos_ids,
                                     self.pad_id)[:, ids.shape[1]:].tolist()
                for p, row in zip(part, new):
                    c = cut_at_stop(row, set(self.eos_ids))
                    samples.append({"completion": self.tokenizer.decode(c, skip_special_tokens=True).strip(),
                                    "answer": p.answer, "prompt": self.tokenizer.decode(p.input_ids),
                                    "completion_tokens": len(c), "max_tokens": n_max, "source": p.source})
        finally:
            model.config.use_cache = use_cache
            model.train(was)
        stats = Stats()
        if samples:
            table = score(self.rewards, samples)
            stats.add(reward=(table @ weights(self.rewards)).float())
            if len(self.rewards) > 1:
                for f, rw in enumerate(self.rewards):
                    stats.add(**{f"reward_{rw.name}": table[:, f].float()})
        out.update(reduce_stats(stats.pop(), dist, state.device, "eval_"))
        if dist.is_main and self.g.log_completions:
            out["completions"] = [{"prompt": s["prompt"][-200:], "completion": s["completion"], "answer": s["answer"],
                                   "reward": round(s["reward"], 4)} for s in self.samples[:self.g.log_completions]]
        return out
