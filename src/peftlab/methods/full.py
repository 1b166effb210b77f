"""Full fine-tuning: every parameter of the model trains (the baseline every method is compared with).

    W <- W - lr * AdamW(dL/dW)   for every W

``peft.freeze`` optionally keeps some modules frozen (names or a regex, as ``peft.targets``
elsewhere), e.g. ``peft.freeze=embed_tokens`` to keep the embeddings. The run saves a whole
Hugging Face model directory (``model/``) instead of an adapter; merging is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..model.targets import find_targets
from ..registry import Method, register


@dataclass
class FullConfig:
    default_lr = 5e-5  # train.lr when unset (not a key): the full-vs-LoRA study's pick, docs/results.md §1
    method: str = "full"
    freeze: str | list[str] | None = None  # modules kept frozen (names or a regex)


def apply(model: nn.Module, cfg: FullConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.freeze:
        for path in find_targets(model, cfg.freeze, kinds=(nn.Module,), what="peft.freeze"):
            for p in model.get_submodule(path).parameters():
                p.requires_grad_(False)


def merge(model: nn.Module) -> None:
    """Nothing to fold: the weights are the model."""


register(Method(name="full", config_cls=FullConfig, apply=apply, merge=merge, peft_type=None, aliases=("full_ft",),
                edits_base=lambda cfg: True))
