"""KronA: a Kronecker-product weight update, mergeable.

Edalati et al., "KronA: Parameter Efficient Tuning with Kronecker Adapter" (2022), arXiv:2212.10650.

    h = W x + s · (A ⊗ B) x,     A [a, c],  B [b, d],  out = a b,  in = c d

(a, b) and (c, d) are ``lycoris.factorization(out, factor)`` / ``factorization(in, factor)``: the
divisor pair nearest the square root (``factor`` = -1), or (f, n / f) with ``factor`` = f, so A is
[f, f] and B [out / f, in / f] (where f does not divide n, LoKr's rule: the nearest pair whose smaller
member is at most f). A starts at zero and B Kaiming-uniform, so the model starts as the
base. Trainable per adapted layer: a c + b d.

KronA is LoKr (``methods/lycoris.py``) with both Kronecker factors kept whole (LoKr factors W2 as
a rank-r product whenever r < max(b, d) / 2) and the scale given directly: the layer *is* a
``LycorisLinear`` of kind ``lokr`` (one mechanism: its forward, ΔW and merge), built here with a rank no
layer reaches. Tensor names are LoKr's (``lokr_w1`` = A, ``lokr_w2`` = B); PEFT has no KronA, so
files use peft_type ``KRONA`` (PEFT's LoKr with r >= max(b, d) / 2 and alpha = s r computes the
same ΔW: tests/test_survey_methods.py proves the logits equal). Works on nn.Linear, GPT-2's Conv1D
and a quantised base (QLoRA: the merge dequantises W first).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..model.params import freeze
from ..model.targets import LINEAR_TYPES, find_targets, peft_target_modules, replace_module
from ..registry import register
from . import peft_format
from .lycoris import LOKR, LoKrConfig, LycorisLinear, merge
from .modules_to_save import add_additional_targets

WHOLE = 2**31  # a LoKr "rank" no layer reaches: W1 and W2 stay whole Kronecker factors


@dataclass
class KronAConfig:
    method: str = "krona"
    factor: int = -1  # -1: A and B near square; f > 0: A [f, f], B [out / f, in / f]
    scale: float = 1.0  # s
    targets: str | list[str] = "all-linear"
    additional_targets: list[str] | None = None
    init_from: str | None = None
    merge_first: list[str] | None = None

    def validate(self) -> None:
        if self.factor == 0 or self.factor < -1:
            raise ConfigError(f"peft.factor must be -1 (near the square root) or a positive integer, got {self.factor}")


def krona_layer(base: nn.Module, cfg: KronAConfig) -> LycorisLinear:
    """A LoKr layer with whole factors A = ``lokr_w1`` (zero) and B = ``lokr_w2`` (Kaiming), scale s."""
    layer = LycorisLinear(base, LoKrConfig(r=WHOLE, alpha=1.0, decompose_factor=cfg.factor))
    layer.r, layer.scaling = 0, cfg.scale  # no rank: ΔW = s · A ⊗ B
    return layer


def apply(model: nn.Module, cfg: KronAConfig) -> None:
    freeze(model)
    for path in find_targets(model, cfg.targets, kinds=LINEAR_TYPES):
        replace_module(model, path, krona_layer(model.get_submodule(path), cfg))
    add_additional_targets(model, cfg.additional_targets)


def to_peft_config(cfg: KronAConfig, model: nn.Module) -> dict:
    found = [n for n, m in model.named_modules() if isinstance(m, LycorisLinear)]
    return {"peft_type": "KRONA", "task_type": "CAUSAL_LM", "factor": cfg.factor, "scale": cfg.scale,
            "target_modules": peft_target_modules(model, cfg.targets, found),
            "modules_to_save": peft_format.additional_targets_for_peft(cfg), "inference_mode": True}


def from_peft_config(d: dict) -> KronAConfig:
    return KronAConfig(factor=int(d.get("factor", -1)), scale=float(d.get("scale", 1.0)),
                       targets=peft_format.peft_targets(d, "KronA"),
                       additional_targets=peft_format.additional_targets_from_peft(d))


register(peft_format.family_method("krona", KronAConfig, apply, LOKR, merge=merge, peft_type="KRONA",
                                   to_peft_config=to_peft_config, from_peft_config=from_peft_config))
