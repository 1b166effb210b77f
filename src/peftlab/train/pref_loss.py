"""The preference losses, per pair (or per example): plain tensor formulas, no model.

Notation: ``pc, pr`` [B] the policy's log-probabilities of the chosen and rejected answers
(summed over answer tokens), ``rc, rr`` the reference's, ``nc, nr`` [B] answer token counts,
σ the logistic function, β ``pref.beta``, ε ``pref.label_smoothing``.

    DPO  (Rafailov et al. 2023, eq. 7):   h = (pc - rc) - (pr - rr)
         sigmoid:  -(1-ε) log σ(β h) - ε log σ(-β h)          (ε > 0: conservative DPO)
         robust :  (-(1-ε) log σ(β h) + ε log σ(-β h)) / (1 - 2ε)   (Chowdhury et al. 2024, rDPO)
    IPO  (Azar et al. 2023, eq. 17):      (h_avg - 1/(2β))^2, h_avg with each log-ratio divided by
                                          its answer's token count (as TRL and the IPO authors do)
    SimPO (Meng et al. 2024, eq. 6):      -(1-ε) log σ(β (pc/nc - pr/nr) - γ) - ε log σ(-(...))
    ORPO (Hong et al. 2024, eq. 6-7):     NLL(chosen) - λ log σ(log odds(pc/nc) - log odds(pr/nr)),
                                          log odds(p) = p - log(1 - e^p)
    KTO  (Ethayarajh et al. 2024, eq. 7): desirable   λ_D (1 - σ(β (p - r - z)))
                                          undesirable λ_U (1 - σ(β (z - (p - r))))
                                          z = max(0, mean over the batch's KL rows of p' - r'), no gradient
    Bradley-Terry reward model:           -log σ(s_c - s_r) + c · (s_c + s_r)^2

Every function returns the loss of each pair (or example); the objective sums them. These are
TRL 1.16's formulas (tests/test_preference.py checks them against TRL's trainers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _smoothed(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float,
             variant: str = "sigmoid", label_smoothing: float = 0.0, nc: torch.Tensor | None = None,
             nr: torch.Tensor | None = None) -> torch.Tensor:
    """[B]: DPO (``sigmoid``), rDPO (``robust``) or IPO (``ipo``, needs the token counts)."""
    chosen, rejected = pc - rc, pr - rr
    if variant == "sigmoid":
        return _smoothed(beta * (chosen - rejected), label_smoothing)
    if variant == "robust":
        eps, h = label_smoothing, beta * (chosen - rejected)
        return (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)
    if variant == "ipo":
        h = chosen / nc.clamp(min=1) - rejected / nr.clamp(min=1)
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO variant {variant!r}")


def simpo_loss(pc: torch.Tensor, pr: torch.Tensor, nc: torch.Tensor, nr: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """[B]: SimPO on length-normalised log-probabilities (no reference)."""
    h = pc / nc.clamp(min=1) - pr / nr.clamp(min=1)
    return _smoothed(beta * (h - gamma / beta), label_smoothing)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, without cancellation (branch at -ln 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_term(pc_avg: torch.Tensor, pr_avg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log σ(log odds ratio) [B], log odds ratio [B]) on per-token average log-probabilities."""
    pc_avg, pr_avg = pc_avg.float(), pr_avg.float()
    log_odds = (pc_avg - pr_avg) - (log1mexp(pc_avg) - log1mexp(pr_avg))
    return F.logsigmoid(log_odds), log_odds


def kto_kl(kl_policy: torch.Tensor, kl_reference: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z: the batch's mean log-ratio on mismatched answers, >= 0, no gradient."""
    return (kl_policy - kl_reference).mean().detach().clamp(min=0)


def kto_loss(p: torch.Tensor, r: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """[B]: each example's KTO loss (``desirable`` [B] bool)."""
    ratio = p - r
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, good, bad)


def bradley_terry_loss(sc: torch.Tensor, sr: torch.Tensor, center: float = 0.0) -> torch.Tensor:
    """[B]: -log σ(s_c - s_r), plus ``center`` · (s_c + s_r)^2 (keeps the rewards centred on 0)."""
    loss = -F.logsigmoid(sc - sr)
    return loss + center * (sc + sr) ** 2 if center else loss
