"""Freezing, counting, grouping and reporting parameters.

The default optimiser grouping lives here (not in train/) so a method's own ``param_groups``
(LoRA+) can fall back to it without importing the training loop. Counts are exact and count a tied weight once (``model.parameters()`` already de-duplicates
shared tensors; we do the same by identity).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import nn


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unique_parameters(model: nn.Module):
    """(name, parameter) pairs, each tensor once (tied embeddings count once)."""
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        yield name, p


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, p in unique_parameters(model) if p.requires_grad]


def default_param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters, in model order: weight decay on matrices,
    none on vectors (biases, norms, scaling vectors). Empty groups are left out."""
    decay, no_decay = [], []
    for p in trainable_parameters(model):
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


@dataclass
class ParamReport:
    trainable: int
    total: int
    by_type: OrderedDict[str, tuple[int, int]]  # module type -> (trainable, total)
    extra: dict  # method-specific figures (e.g. LISA's total cycled-through parameters)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_json(self) -> dict:
        out = {"trainable": self.trainable, "total": self.total}
        out.update(self.extra)
        return out

    def format(self) -> str:
        lines = [
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {self.percent:.4f}",
            "",
            f"{'module type':<28}{'trainable':>16}{'total':>16}",
        ]
        for kind, (t, n) in self.by_type.items():
            lines.append(f"{kind:<28}{t:>16,}{n:>16,}")
        for key, value in self.extra.items():
            lines.append(f"{key}: {value:,}" if isinstance(value, int) else f"{key}: {value}")
        return "\n".join(lines)


def param_report(model: nn.Module, extra: dict | None = None) -> ParamReport:
    """Trainable/total counts and a breakdown by the type of the module owning each tensor."""
    owner: dict[int, str] = {}
    for _, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), type(module).__name__)
    by_type: OrderedDict[str, list[int]] = OrderedDict()
    trainable = total = 0
    for _, p in unique_parameters(model):
        n = p.numel()
        kind = owner.get(id(p), "?")
        entry = by_type.setdefault(kind, [0, 0])
        entry[1] += n
        total += n
        if p.requires_grad:
            entry[0] += n
            trainable += n
    for _, module in model.named_modules():  # a quantised base layer's weight is a buffer: count it, frozen
        n = getattr(module, "quantized_numel", 0)
        if n:
            by_type.setdefault(type(module).__name__, [0, 0])[1] += n
            total += n
    ordered = OrderedDict(sorted(((k, tuple(v)) for k, v in by_type.items()), key=lambda kv: (-kv[1][0], -kv[1][1])))
    return ParamReport(trainable, total, ordered, dict(extra or {}))
