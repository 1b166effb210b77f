"""GRPO's formulas: group-relative advantages, the k3 KL estimate and the clipped surrogate loss.
Plain tensor functions, no model (train/grpo.py feeds them).

Shao et al. 2024 (DeepSeekMath, "GRPO", eq. 3), with TRL's loss normalisations (``loss_type``):

    advantage   A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)     (scale_rewards=group;
                batch: the std over the whole batch; none: no division); std is the unbiased one
    ratio       ρ_it = exp(logp_it - logp_old_it)
    surrogate   l_it = -min(ρ_it A_i, clip(ρ_it, 1 - ε, 1 + ε_high) A_i) + β KL_it
    KL (k3)     KL_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1   (Schulman 2020; >= 0)

    grpo     loss = mean over completions i of (sum_t l_it / |o_i|)        units: completions
    bnpo     loss = sum_it l_it / sum_i |o_i|                              units: completion tokens
    dr_grpo  loss = sum_it l_it / (completions x max_completion_length)    units: completions x max length
             (Liu et al. 2025, "Dr. GRPO": no per-length or per-std bias)

``token_loss_sum`` returns the SUM the loop divides by the step's units (train/objective.py), so
a step with one micro-batch equals TRL's loss exactly; with accumulation, bnpo averages over all the
step's tokens (TRL averages the micro-batches' means) and grpo/dr_grpo are the same either way.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    """rewards [R] (R = prompts x group, a prompt's completions adjacent) -> advantages [R]."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(1).repeat_interleave(group)
    if scale == "group":
        std = grouped.std(1).repeat_interleave(group)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = None
    adv = rewards - mean
    return adv if std is None else adv / (std + 1e-4)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π || π_ref) estimate (k3): exp(ref - logp) - (ref - logp) - 1."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def per_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                   ref_logps: torch.Tensor | None, beta: float, eps_low: float, eps_high: float
                   ) -> tuple[torch.Tensor, dict]:
    """l [B, T] from per-token log-probs [B, T] and advantages [B]; with the masks' statistics
    (``clipped`` [B, T] bool: the ratio was clipped where it mattered, ``kl`` [B, T] or None)."""
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped_ratio * adv)
    kl = None
    if beta != 0.0:
        kl = k3_kl(logps, ref_logps)
        loss = loss + beta * kl
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return loss, {"clipped": clipped, "kl": kl}


def units(mask: torch.Tensor, loss_type: str, max_completion_length: int) -> int:
    """What ``loss_type`` averages over in a micro-batch with completion mask [B, T]."""
    if loss_type == "grpo":
        return mask.shape[0]
    if loss_type == "bnpo":
        return int(mask.sum())
    return mask.shape[0] * max_completion_length  # dr_grpo


def token_loss_sum(loss: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The sum the loop divides by ``units``: per-completion means summed (grpo), or token sums."""
    mask = mask.to(loss.dtype)
    if loss_type == "grpo":
        return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    return (loss * mask).sum()
