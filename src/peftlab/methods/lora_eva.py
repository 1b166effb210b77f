"""EVA: LoRA's A from the principal directions of each layer's inputs, ranks redistributed by
explained variance. ``methods/lora_init.py`` puts the result into the layers.

Paulus et al., "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation" (2024), arXiv:2410.07170.

    X_l [tokens, in]   the inputs of target layer l on the init batches (label tokens only)
    X_l - mean ≈ U S V^T   incremental PCA over the batches, k_l = round(rho * r) components
    ratio_l,i = S_i^2 / (tokens * sum of the column variances)        explained variance ratio
    the budget  sum_l r  goes to the largest ratios over all layers:  r_l = #{i: ratio_l,i chosen}
    A_l = V^T[:r_l]   [r_l, in],   B_l = 0,   alpha_l = alpha * r_l / r   (the scaling alpha/r kept)

The batches are cycled until, for every layer, the first r_l components have converged (cosine
similarity to the previous batch's >= tau; a layer whose r_l grows past its converged components
resumes fitting) or ``MAX_CYCLES`` passes were made. Layers whose inputs
are equal (q, k, v; gate, up) share one PCA. Each PCA step is an SVD of
[S V^T; X_batch - mean_batch; mean correction] (Ross et al. 2008, scikit-learn's IncrementalPCA),
randomised (``torch.svd_lowrank``, 2k columns, 4 iterations, seed 42) with signs fixed so each
right singular vector's largest entry is positive; statistics in float64. The same choices as
PEFT 0.21's ``initialize_lora_eva_weights``, so the factors agree (tests/test_lora_inits.py).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

MAX_CYCLES = 20  # passes over the init batches before EVA settles for unconverged components
SEED, NITER = 42, 4


class IncrementalPCA:
    """Principal components of rows fed batch by batch. ``partial_fit(x)``: x [n, d] float32."""

    def __init__(self, k: int):
        self.k, self.count = k, 0
        self.mean = self.var = self.components = self.singular = self.ratio = None

    def _moments(self, x: torch.Tensor):
        """Column mean and variance of everything seen plus ``x`` (Chan et al.'s pairwise update)."""
        n = x.shape[0]
        total = self.count + n
        old_sum = self.mean * self.count if self.mean is not None else torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        new_sum = x.sum(dim=0, dtype=torch.float64)
        centred = x - new_sum / n
        new_ss = centred.square().sum(dim=0, dtype=torch.float64) - centred.sum(dim=0, dtype=torch.float64).square() / n
        if self.var is None:
            var = new_ss / total
        else:
            ratio = self.count / n
            var = (self.var * self.count + new_ss + ratio / total * (old_sum / ratio - new_sum).square()) / total
        return (old_sum + new_sum) / total, var, total

    @torch.no_grad()
    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.clone()
        n = x.shape[0]
        mean, var, total = self._moments(x)
        if self.components is None:
            x -= mean
        else:
            batch_mean = x.mean(dim=0)
            x -= batch_mean
            correction = torch.sqrt(torch.tensor(self.count / total, dtype=torch.float64) * n) * (self.mean - batch_mean)
            x = torch.cat([self.singular[:, None] * self.components, x, correction[None]])
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(SEED)
            _, s, v = torch.svd_lowrank(x, q=2 * self.k, niter=NITER)
        vt = v.mH
        signs = torch.sign(vt[torch.arange(vt.shape[0]), vt.abs().argmax(dim=1)])
        vt = vt * signs[:, None]
        self.components, self.singular = vt[: self.k], s[: self.k]
        self.ratio = (s.square() / torch.sum(var * total))[: self.k]
        self.mean, self.var, self.count = mean, var, total


def _tokens(x: torch.Tensor, batch: dict) -> torch.Tensor:
    """A layer input [B, T, d] -> the rows of label tokens [n, d] (PEFT's use_label_mask)."""
    mask = batch["attention_mask"].bool() & (batch["labels"] != -100)
    return x[mask.nonzero().T.unbind()]


def _distribute(pcas: dict, owner: dict, mapped: dict, budget: int, most: dict) -> dict[str, int]:
    """Per-layer ranks: the ``budget`` largest explained-variance ratios over all layers."""
    keys, values = zip(*[(k, c) for k, name in owner.items() for c in pcas[name].ratio[: most[k]]])
    chosen = [keys[i] for i in torch.stack(values).argsort(descending=True)[:budget].tolist()]
    counts = {k: chosen.count(k) for k in owner}
    for k, first in mapped.items():  # the layer holding a shared PCA gets the larger rank of the two
        if counts[first] < counts[k]:
            counts[first], counts[k] = counts[k], counts[first]
    return counts


@torch.no_grad()
def eva_components(model: nn.Module, layers: dict[str, nn.Module], batches: list[dict], r: int, rho: float,
                   tau: float) -> dict[str, torch.Tensor]:
    """{path: A [r_l, in]} for the plain model ``model`` (adapters off) whose target layers (the
    base layers) are ``layers`` {path: module}; r_l may be 0."""
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items() if k in ("input_ids", "attention_mask", "labels")}
               for b in batches]
    most = {name: round(r * rho) for name in layers}
    seen: dict[str, torch.Tensor] = {}
    current: dict = {}

    def capture(name):
        return lambda mod, args, out: seen.__setitem__(name, _tokens(args[0], current["batch"]).float())

    def run(batch):
        current["batch"] = batch
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    handles = [m.register_forward_hook(capture(n)) for n, m in layers.items()]
    run(batches[0])
    for h in handles:
        h.remove()
    groups: list[list[str]] = []
    for name in layers:  # layers fed the same input share one PCA
        group = next((g for g in groups if torch.equal(seen[g[0]], seen[name])), None)
        group.append(name) if group is not None else groups.append([name])
    mapped = {m: g[0] for g in groups for m in g[1:]}
    for g in groups:
        for n in g:
            most[n] = max(most[m] for m in g)
    seen.clear()
    pcas = {g[0]: IncrementalPCA(most[g[0]]) for g in groups}
    converged = {n: torch.zeros(most[n], dtype=torch.bool) for n in pcas}
    done = dict.fromkeys(pcas, False)
    owner = {**{n: n for n in pcas}, **mapped}
    ranks = dict(most)
    budget = r * len(layers)

    def step(name):
        def hook(mod, args, out):
            x = _tokens(args[0], current["batch"]).float()
            pca = pcas[name]
            if x.shape[0] < pca.k:  # PEFT skips such a batch too
                return
            before = pca.components
            pca.partial_fit(x)
            if before is not None:
                converged[name] = F.cosine_similarity(pca.components, before) >= tau
        return hook

    handles = {n: layers[n].register_forward_hook(step(n)) for n in pcas}
    passes = MAX_CYCLES * len(batches)
    for i in range(passes + 1):
        for n in pcas:  # a layer stops (or restarts) fitting as its first r_l components converge
            now = bool(torch.all(converged[n][: ranks[n]]))  # (or, its r_l having grown, no longer are)
            if now != done[n]:
                if now:
                    handles.pop(n).remove()
                else:
                    handles[n] = layers[n].register_forward_hook(step(n))
                done[n] = now
        if all(done.values()) or i == passes:
            break
        run(batches[i % len(batches)])
        if all(p.components is not None for p in pcas.values()):
            ranks = _distribute(pcas, owner, mapped, budget, most)
    for h in handles.values():
        h.remove()
    if any(p.components is None for p in pcas.values()):
        raise ConfigError(f"peft.init=eva: no init batch had round(eva_rho * r) = {max(most.values())} label tokens "
                          "for a layer's PCA; raise train.batch_size or data.max_length, or lower peft.eva_rho / peft.r")
    if not all(done.values()):
        print(f"EVA: {sum(not d for d in done.values())} layer(s) had not converged (tau={tau}) after "
              f"{MAX_CYCLES} passes over the init batches; using their current components", file=sys.stderr)
    return {n: pcas[owner[n]].components[: ranks[n]].float() for n in layers}
