"""GRPO's rollouts: sample a group of completions per prompt with the model being trained, score
them, and lay them out as one micro-batch for ``GRPO.loss`` (train/grpo.py).

    prompts [P] -> each repeated G times (adjacent) -> left-padded -> the project's decoder
    (model/decode.py: the lean KV-cache decoder with the adapters live, or HF generate) with a
    generator seeded from (train.seed, generation, the micro-batch's place in the step's global
    order): the same seed gives the same completions, so a resumed run samples exactly what the
    killed one would have, and N processes sample what one process does with N x the accumulation
    -> each completion cut after its first stop token (kept, as TRL keeps EOS) -> rewards -> advantages
    -> rows [prompt ; completion ; pad] (right padding, so positions are 0..n as in the decoder),
       labels on the completion only, completion_mask [R, Lc], advantages [R],
       old_logps [R, Lc] (grpo.num_iterations > 1: the policy that sampled), ref_logps (grpo.beta > 0)
    -> with grpo.share_prompt on, also the P unique prompts and the completions alone
       (grpo_share.share_layout): the log-probabilities then run each prompt once for its group
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokenize import IGNORE
from ..model.decode import continue_batch, forget, left_pad
from . import grpo_loss
from .grpo_share import share_layout, shared_hidden
from .loss import _head_logits
from .rewards import score, weights
from .runtime import autocast, to_device
from .seq_logps import hidden_states

SEED_STRIDE = 1_000_003  # a prime: distinct (seed, generation, index) give distinct seeds


def rollout_seed(seed: int, generation: int, index: int) -> int:
    """The sampling seed of the micro-batch at ``index`` in generation ``generation``'s global
    order (micro-batch j of rank r of W processes: index j * W + r, as the sampler deals them)."""
    return ((seed * SEED_STRIDE + generation) * SEED_STRIDE + index) % (2**63 - 1)


def completion_logps(model: nn.Module, batch: dict, temperature: float, shared: bool = False) -> torch.Tensor:
    """[R, Lc] log p(completion token | everything before it) at ``temperature`` (TRL scores the
    logits divided by the sampling temperature); 0 where ``completion_mask`` is 0. ``shared``: each
    prompt runs once for its group (train/grpo_share.py; the batch has ``share_layout``'s fields)."""
    mask = batch["completion_mask"].bool()
    if shared:
        h, y = shared_hidden(model, batch)[mask], batch["completion_ids"][mask]
    else:
        hidden = hidden_states(model, batch)
        keep = batch["labels"][:, 1:] != IGNORE
        h, y = hidden[:, :-1][keep], batch["labels"][:, 1:][keep]
    logits = _head_logits(model, h).float() / temperature
    flat = -F.cross_entropy(logits, y, reduction="none")
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    return out.masked_scatter(mask, flat)


def cut_at_stop(row: list[int], stop: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stop:
            return row[:i + 1]
    return row


def layout(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """Rows [prompt ; completion] right-padded: input_ids, attention_mask, labels [R, T];
    completion_mask [R, Lc] (Lc = the longest completion, at least 1)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    lc = max(1, max(len(c) for c in completions))
    r = len(prompts)
    ids = torch.full((r, width), pad_id, dtype=torch.long)
    mask = torch.zeros((r, width), dtype=torch.long)
    labels = torch.full((r, width), IGNORE, dtype=torch.long)
    cmask = torch.zeros((r, lc), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(c, dtype=torch.long)
        cmask[i, :len(c)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "completion_mask": cmask}


def rollout(objective, state, examples: list, seed: int) -> tuple[dict, dict, list[dict]]:
    """(the micro-batch, its statistics as (sum, count), its samples) for prompt examples
    (data/prompts.PromptExample) under ``objective``'s settings (train/grpo.GRPO)."""
    g, model, device = objective.g, state.model, state.device
    t0 = time.perf_counter()
    prompts = [list(e.input_ids) for e in examples for _ in range(g.num_generations)]
    ids, mask = left_pad(prompts, objective.pad_id)
    was_training, use_cache = model.training, getattr(model.config, "use_cache", True)
    model.eval()
    model.config.use_cache = True
    forget(model)  # the weights changed since the last generation (every optimiser step changes them)
    try:
        generator = torch.Generator(device).manual_seed(seed)
        out = continue_batch(model, ids.to(device), mask.to(device), g.max_completion_length, objective.eos_ids,
                             objective.pad_id, g.temperature, g.top_p, generator)
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    stop = set(objective.eos_ids)
    completions = [cut_at_stop(row, stop) for row in out[:, ids.shape[1]:].tolist()]
    gen_s = time.perf_counter() - t0
    decode = objective.tokenizer.decode
    samples = []
    for k, c in enumerate(completions):
        e = examples[k // g.num_generations]
        samples.append({"completion": decode(c, skip_special_tokens=True).strip(), "answer": e.answer,
                        "prompt": decode(e.input_ids, skip_special_tokens=False), "completion_tokens": len(c),
                        "max_tokens": g.max_completion_length, "source": e.source or f"prompt {k // g.num_generations}"})
    table = score(objective.rewards, samples)  # [R, F]
    total = table @ weights(objective.rewards)
    adv = grpo_loss.group_advantages(total, g.num_generations, g.scale_rewards).float()
    for s, r in zip(samples, total.tolist()):
        s["reward"] = r
    batch = layout(prompts, completions, objective.pad_id)
    if objective.share:
        batch.update(share_layout([list(e.input_ids) for e in examples], completions, objective.pad_id))
    batch["advantages"] = adv
    dev_batch = to_device(batch, device)
    with torch.no_grad(), autocast(device, state.amp):
        if g.num_iterations > 1:  # the sampling policy's log-probs, fixed for the generation's μ steps
            was = model.training
            model.eval()
            try:
                batch["old_logps"] = completion_logps(model, dev_batch, g.temperature, objective.share).cpu()
            finally:
                model.train(was)
        if objective.reference is not None:
            with objective.reference.model_for(model) as ref:
                batch["ref_logps"] = completion_logps(ref, dev_batch, g.temperature, objective.share).cpu()
    stats = _stats(objective, table, total, completions, gen_s, time.perf_counter() - t0)
    return batch, stats, samples


def _stats(objective, table: torch.Tensor, total: torch.Tensor, completions: list, gen_s: float, all_s: float
           ) -> dict[str, tuple[float, int]]:
    """Reward mean and std (in all, and per function), completion length, zero-std groups, timing."""
    g, n = objective.g, len(completions)
    groups = total.view(-1, g.num_generations)
    out = {"reward": (float(total.sum()), n), "reward_std": (float(groups.std(1).mean()) * n, n),
           "completion_length": (float(sum(len(c) for c in completions)), n),
           "frac_reward_zero_std": (float((groups.std(1) == 0).float().sum()), groups.shape[0]),
           "rollout_s": (all_s, 1), "completions_per_s": (n / max(gen_s, 1e-9), 1)}
    if len(objective.rewards) > 1:
        for f, rw in enumerate(objective.rewards):
            col = table[:, f]
            out[f"reward_{rw.name}"] = (float(col.sum()), n)
            out[f"reward_{rw.name}__sq"] = (float((col.double() ** 2).sum()), n)  # -> reward_<name>_std, pooled
    return out
