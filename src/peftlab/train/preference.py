"""Preference objectives for the one training loop: DPO (sigmoid, robust, IPO), SimPO, ORPO,
KTO and a Bradley-Terry reward model, each an ``Objective`` (train/objective.py).

Units are pairs (KTO: examples), so gradient accumulation and data parallelism average over
pairs exactly as the causal-LM loss averages over tokens. A pair batch (data/preference.py) holds
the chosen rows then the rejected rows [2B, T]; ONE forward of the policy scores both answers:

    logp(answer) = sum over the answer's label tokens of log p(token | everything before it)

The formulas are in ``pref_loss.py``; the reference policy in ``reference.py``. Each objective
also sums its metrics over the micro-batches of a step (``pop_stats``: the loop reduces them over
processes and divides by the pairs): rewards of chosen and rejected answers (β · log-ratio;
SimPO/ORPO: β · log-prob, as TRL logs them), their margin, the preference accuracy (the chosen
reward above the rejected), and the policy's log-probabilities.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..data.tokenize import IGNORE
from . import pref_loss
from .reference import Reference
from .seq_logps import hidden_states, label_logps, row_logps


class Stats:
    """Metric (sum, count) over the micro-batches of one step (or one evaluation); the loop
    reduces both over processes and reports sum / count (``reduce_stats``)."""

    def __init__(self):
        self.sums: dict[str, tuple[float, int]] = {}

    def add(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            total, n = self.sums.get(k, (0.0, 0))
            self.sums[k] = (total + float(v.detach().float().sum()), n + v.numel())

    def pairs(self, chosen_reward, rejected_reward, pc, pr) -> None:
        self.add(rewards_chosen=chosen_reward, rewards_rejected=rejected_reward,
                 margin=chosen_reward - rejected_reward, accuracy=(chosen_reward > rejected_reward).float(),
                 logps_chosen=pc, logps_rejected=pr)

    def pop(self) -> dict[str, tuple[float, int]]:
        out, self.sums = self.sums, {}
        return out


def reduce_stats(stats: dict[str, tuple[float, int]], dist, device, prefix: str = "") -> dict[str, float]:
    """{prefix + name: mean over every process} of ``pop_stats``' (sum, count) pairs; a ``name__sq``
    entry (the sum of squares of the values summed under ``name``) becomes ``name_std``, the sample
    std over every process's values (pooled, not a mean of per-process stds)."""
    names = sorted(stats)
    if dist.world_size > 1:  # every rank has the same names (same objective, same batch layout)
        flat = torch.tensor([x for k in names for x in stats[k]], dtype=torch.float64, device=device)
        flat = dist.all_reduce_sum(flat).tolist()
        stats = {k: (flat[2 * i], flat[2 * i + 1]) for i, k in enumerate(names)}
    out = {}
    for k in names:
        total, n = stats[k]
        if not n:
            continue
        if k.endswith(SQUARES):  # (sum of squares, n) beside (sum, n) under the base name: a pooled std
            base = k[:-len(SQUARES)]
            if base in stats and n > 1:
                mean = stats[base][0] / n
                out[prefix + base + "_std"] = round(math.sqrt(max(total / n - mean * mean, 0.0) * n / (n - 1)), 6)
            continue
        out[prefix + k] = round(total / n, 6)
    return out


SQUARES = "__sq"  # a stats key ending in this carries the sum of squares of the values under its base name


class DPO:
    """DPO / robust DPO / IPO against a reference policy (``pref.loss``)."""

    def __init__(self, pref, reference: Reference, chunk: int = 1024, fused: bool = True):
        self.pref, self.reference, self.chunk, self.fused = pref, reference, chunk, fused
        self.stats = Stats()

    def units(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        logps, counts = row_logps(model, batch, self.chunk, self.fused)
        ref = self.reference.logps(model, batch, "ref_logps", self.chunk)
        (pc, pr), (rc, rr), (nc, nr) = logps.chunk(2), ref.chunk(2), counts.chunk(2)
        p = self.pref
        losses = pref_loss.dpo_loss(pc, pr, rc, rr, p.beta, p.loss, p.label_smoothing, nc, nr)
        self.stats.pairs(p.beta * (pc - rc), p.beta * (pr - rr), pc, pr)
        return losses.sum()

    def pop_stats(self) -> dict[str, tuple[float, int]]:
        return self.stats.pop()


class SimPO:
    """SimPO: length-normalised log-probabilities, a target margin γ, no reference."""

    def __init__(self, pref, chunk: int = 1024, fused: bool = True):
        self.pref, self.chunk, self.fused, self.stats = pref, chunk, fused, Stats()
        self.reference = None

    def units(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        logps, counts = row_logps(model, batch, self.chunk, self.fused)
        (pc, pr), (nc, nr) = logps.chunk(2), counts.chunk(2)
        p = self.pref
        losses = pref_loss.simpo_loss(pc, pr, nc, nr, p.beta, p.simpo_gamma, p.label_smoothing)
        self.stats.pairs(p.beta * pc / nc.clamp(min=1), p.beta * pr / nr.clamp(min=1), pc, pr)
        return losses.sum()

    def pop_stats(self) -> dict[str, tuple[float, int]]:
        return self.stats.pop()


class ORPO:
    """ORPO: the chosen rows' NLL plus λ times the odds-ratio term, no reference.

    As in TRL, the NLL is the token mean over the micro-batch's chosen rows, prompt tokens
    included; it enters the pair sum as pairs x that mean (so one micro-batch equals TRL's loss;
    with accumulation each micro-batch's mean is weighted by its pairs)."""

    def __init__(self, pref, chunk: int = 1024, fused: bool = True):
        self.pref, self.chunk, self.fused, self.stats = pref, chunk, fused, Stats()
        self.reference = None

    def units(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        hidden = hidden_states(model, batch)
        logps, counts = label_logps(model, hidden, batch["labels"], self.chunk, self.fused)
        b = self.units(batch)
        whole = batch["input_ids"][:b].masked_fill(batch["attention_mask"][:b] == 0, IGNORE)
        nll_sums, nll_counts = label_logps(model, hidden[:b], whole, self.chunk, self.fused)
        nll = -nll_sums.sum() / nll_counts.sum().clamp(min=1)
        (pc, pr), (nc, nr) = logps.chunk(2), counts.chunk(2)
        pc_avg, pr_avg = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
        ratio, log_odds = pref_loss.orpo_odds_term(pc_avg, pr_avg)
        lam = self.pref.orpo_lambda
        self.stats.pairs(lam * pc_avg, lam * pr_avg, pc, pr)
        self.stats.add(nll=nll.expand(b), log_odds=log_odds)
        return nll * b - lam * ratio.sum()

    def pop_stats(self) -> dict[str, tuple[float, int]]:
        return self.stats.pop()


class KTO:
    """KTO on unpaired examples: desirable or not, against a reference, with the KL rows."""

    def __init__(self, pref, reference: Reference, chunk: int = 1024, fused: bool = True):
        self.pref, self.reference, self.chunk, self.fused = pref, reference, chunk, fused
        self.stats = Stats()

    def units(self, batch: dict) -> int:
        return batch["input_ids"].shape[0]

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        kl_rows = {k[3:]: v for k, v in batch.items() if k.startswith("kl_")}
        if "ref_kl_logps" in batch:
            kl_rows["ref_logps"] = batch["ref_kl_logps"]
        with torch.no_grad():  # the KL estimate carries no gradient (as in TRL)
            kl_policy = row_logps(model, kl_rows, self.chunk, False)[0]
        kl_ref = self.reference.logps(model, kl_rows, "ref_logps", self.chunk)
        kl = pref_loss.kto_kl(kl_policy, kl_ref)
        logps, _ = row_logps(model, batch, self.chunk, self.fused)
        ref = self.reference.logps(model, batch, "ref_logps", self.chunk)
        p, good = self.pref, batch["kto_label"]
        losses = pref_loss.kto_loss(logps, ref, good, kl, p.beta, p.desirable_weight, p.undesirable_weight)
        reward = p.beta * (logps - ref)
        self.stats.add(rewards_chosen=reward[good], rewards_rejected=reward[~good], logps_chosen=logps[good],
                       logps_rejected=logps[~good], desirable=good.float(), kl=kl.expand(len(good)))
        return losses.sum()

    def pop_stats(self) -> dict[str, tuple[float, int]]:
        return self.stats.pop()


class RewardModel:
    """A Bradley-Terry reward model: a scalar head (``model.reward_head``, d -> 1, trained with
    the method's parameters) on the hidden state of each answer's last real token."""

    def __init__(self, pref, model: nn.Module):
        self.pref, self.stats, self.reference = pref, Stats(), None
        if not hasattr(model, "reward_head"):
            d = model.get_input_embeddings().weight.shape[1]
            device = model.get_input_embeddings().weight.device
            model.reward_head = nn.Linear(d, 1, bias=False, device=device, dtype=torch.float32)
            nn.init.normal_(model.reward_head.weight, std=1 / (d + 1) ** 0.5)

    def units(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    @staticmethod
    def scores(model: nn.Module, batch: dict) -> torch.Tensor:
        """[R]: the head on each row's last label token (the answer's end-of-turn token)."""
        hidden = hidden_states(model, batch)
        labelled = (batch["labels"] != IGNORE).long()
        last = (labelled * torch.arange(labelled.shape[1], device=labelled.device)).argmax(1)
        h = hidden[torch.arange(len(last), device=last.device), last]
        return model.reward_head(h.float()).squeeze(-1)

    def save(self, model: nn.Module, run_dir) -> None:
        """``reward_head.safetensors`` beside the adapter (or model): the head's weight [1, d]."""
        import os

        from safetensors.torch import save_file

        path = os.path.join(run_dir, "reward_head.safetensors")
        save_file({"weight": model.reward_head.weight.detach().float().cpu().contiguous()}, path + ".tmp")
        os.replace(path + ".tmp", path)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        sc, sr = self.scores(model, batch).chunk(2)
        self.stats.add(rewards_chosen=sc, rewards_rejected=sr, margin=sc - sr, accuracy=(sc > sr).float())
        return pref_loss.bradley_terry_loss(sc, sr, self.pref.center_rewards).sum()

    def pop_stats(self) -> dict[str, tuple[float, int]]:
        return self.stats.pop()
