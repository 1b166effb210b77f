"""AdaLoRA's rank allocator: importance scores, the cubic budget schedule, masking E to the budget.

Zhang et al. (2023), arXiv:2303.10512, section 3 (the equations are in ``methods/adalora.py``).
The allocator works on the AdaLoRA layers it is given ({path: layer}, each with ``lora_A`` [r, in],
``lora_B`` [out, r], ``lora_E`` [r, 1] and its rank ``r``) and keeps its state by parameter name.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

STATE = "_peftlab_adalora"  # the allocator's running state, kept on the model object


class Allocator:
    """Importance EMAs (by parameter name), the budget schedule and the final allocation."""

    def __init__(self, layers: dict[str, nn.Module], cfg, total_step: int):
        if total_step - cfg.tfinal - cfg.tinit <= 0:
            raise ConfigError(
                f"AdaLoRA's schedule leaves no budgeting phase: tinit={cfg.tinit} + tfinal={cfg.tfinal} >= "
                f"{total_step} steps; lower peft.tinit/peft.tfinal or train longer"
            )
        self.total_step = total_step
        self.init_bgt = sum(m.r for m in layers.values())
        self.target_bgt = cfg.target_r * len(layers)
        self.ipt: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}
        self.rank_pattern: dict[str, list[bool]] | None = None

    def budget(self, step: int, cfg) -> tuple[int, bool]:
        """(total rank allowed after ``step``, whether to re-mask now): the cubic schedule."""
        if step <= cfg.tinit:
            return self.init_bgt, False
        if step > self.total_step - cfg.tfinal:
            return self.target_bgt, True
        frac = 1 - (step - cfg.tinit) / (self.total_step - cfg.tfinal - cfg.tinit)
        return int((self.init_bgt - self.target_bgt) * frac**3 + self.target_bgt), step % cfg.delta_t == 0

    @torch.no_grad()
    def update_importance(self, layers: dict[str, nn.Module], cfg) -> None:
        for path, layer in layers.items():
            for name in ("lora_A", "lora_B", "lora_E"):
                p = getattr(layer, name)
                if p.grad is None:
                    continue
                key = f"{path}.{name}"
                ipt = (p * p.grad).abs().float()
                if key not in self.ipt:
                    self.ipt[key] = torch.zeros_like(ipt)
                    self.unc[key] = torch.zeros_like(ipt)
                self.ipt[key] = cfg.beta1 * self.ipt[key] + (1 - cfg.beta1) * ipt
                self.unc[key] = cfg.beta2 * self.unc[key] + (1 - cfg.beta2) * (ipt - self.ipt[key]).abs()

    def scores(self, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """S_i per layer [r] (zeros where no gradient has been seen yet)."""
        def s(path: str, name: str, like: torch.Tensor) -> torch.Tensor:
            key = f"{path}.{name}"
            return self.ipt[key] * self.unc[key] if key in self.ipt else torch.zeros_like(like).float()

        return {path: s(path, "lora_E", layer.lora_E).view(-1) + s(path, "lora_A", layer.lora_A).mean(dim=1)
                + s(path, "lora_B", layer.lora_B).mean(dim=0) for path, layer in layers.items()}

    @torch.no_grad()
    def mask_to_budget(self, layers: dict[str, nn.Module], budget: int) -> dict[str, list[bool]]:
        scores = self.scores(layers)
        all_scores = torch.cat(list(scores.values()))
        k = self.init_bgt - budget
        threshold = torch.kthvalue(all_scores, k).values.item() if k > 0 else -float("inf")
        pattern = {}
        for path, layer in layers.items():
            keep = scores[path] > threshold
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[path] = keep.tolist()
        return pattern

    def step(self, layers: dict[str, nn.Module], cfg, step: int) -> bool:
        """After optimiser step ``step`` (gradients still present): importance, budget, masking.
        True at the step the allocation becomes fixed (T - tfinal)."""
        final = self.total_step - cfg.tfinal
        if step < final:
            self.update_importance(layers, cfg)
            budget, now = self.budget(step, cfg)
            if now:
                self.rank_pattern = self.mask_to_budget(layers, budget)
            return False
        if step == final:
            self.update_importance(layers, cfg)
            self.rank_pattern = self.mask_to_budget(layers, self.budget(step, cfg)[0])
            self.ipt, self.unc = {}, {}
            return True
        if self.rank_pattern is None:  # resumed after the allocation was fixed: the zeros of E are the mask
            self.rank_pattern = {p: (m.lora_E != 0).view(-1).tolist() for p, m in layers.items()}
        self.apply_pattern(layers)
        return False

    @torch.no_grad()
    def apply_pattern(self, layers: dict[str, nn.Module]) -> None:
        for path, layer in layers.items():
            keep = torch.tensor(self.rank_pattern[path], device=layer.lora_E.device)
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)


def allocator(model: nn.Module) -> Allocator | None:
    return model.__dict__.get(STATE)
