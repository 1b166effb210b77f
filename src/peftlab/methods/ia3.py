"""(IA)3: learned vectors that rescale keys, values and the FFN's intermediate activation.

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (2022), arXiv:2205.05638.

    k = l_k ⊙ (W_k x),   v = l_v ⊙ (W_v x),   FFN(x) = W_down (l_ff ⊙ act(W_up x))

Each l starts at ones (the model equals the base at step 0). On a key/value projection the
vector scales the output rows (``ia3_l`` [out, 1]); on the FFN's down projection ("feed-forward"
target) it scales the input, i.e. the intermediate activation (``ia3_l`` [1, in]). Trainable:
Σ over targets of out (attention) or in (FFN) — for a Llama layer 2·H_kv·d_h + d_ff.

Default targets follow the paper: k_proj, v_proj and down_proj (feed-forward) where the
architecture has them; GPT-2 fuses q, k and v into ``c_attn``, so there the whole fused output is
scaled (PEFT's choice too) and ``mlp.c_proj`` is the feed-forward target.

Mergeable: W' = diag(l) W (b' = l ⊙ b) for output scaling, W' = W diag(l) for input scaling.
Module and file names are PEFT's (``<layer>.ia3_l``, peft_type ``IA3``), so adapters move
between PEFT and peftlab unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from ..model.params import freeze
from ..model.targets import (
    find_targets,
    layer_dtype_device,
    linear_shape,
    peft_target_modules,
    set_submodule,
    set_weight_matrix,
    weight_matrix,
)
from ..registry import Method, register
from .merging import merge_wrappers

# architecture -> (targets, feed-forward targets); others use the Llama names when present
DEFAULTS = {
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
}


@dataclass
class IA3Config:
    default_lr = 1e-2  # train.lr when unset (not a key): docs/results.md §2b
    method: str = "ia3"
    targets: str | list[str] | None = None  # default: keys, values and the FFN down projection
    feedforward: str | list[str] | None = None  # targets whose *input* is scaled (default: the FFN down proj)


class IA3Linear(nn.Module):
    """A frozen linear layer whose output (or, for feed-forward targets, input) is scaled by ``ia3_l``.

    x: [..., in] -> [..., out]. ``ia3_l`` is [out, 1] or [1, in] in fp32 (PEFT's shapes), ones at init.
    """

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__()
        in_f, out_f = linear_shape(base_layer)
        self.base_layer = base_layer
        self.feedforward = feedforward
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        shape = (1, in_f) if feedforward else (out_f, 1)
        _, device = layer_dtype_device(base_layer)  # a quantised base has no float weight
        self.ia3_l = nn.Parameter(torch.ones(shape, device=device, dtype=torch.float32))
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        y = self.base_layer(x)
        return (y.to(scale.dtype) * scale).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W' = diag(l) W, b' = l ⊙ b (output scaling) or W' = W diag(l) (input scaling); a quantised
        base layer is requantised (lossy); ``merge`` below dequantises the base first."""
        if self.merged:
            return
        base = self.base_layer
        w = weight_matrix(base)  # [out, in]
        scale = self.ia3_l.flatten().to(w.device)
        if self.feedforward:
            factor = scale[None, :]
        else:
            factor = scale[:, None]
            if base.bias is not None:
                b = base.bias
                b.copy_((b.float() * scale).to(b.dtype))
        set_weight_matrix(base, (w.float() * factor).to(w.dtype))
        self.merged = True

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, merged={self.merged}"


def resolve_targets(model: nn.Module, cfg) -> tuple[list[str], list[str]]:
    """(targets, feed-forward targets) as names or a regex, from the config or the architecture."""
    if cfg.targets is not None:
        targets = cfg.targets
        feedforward = cfg.feedforward if cfg.feedforward is not None else []
        return targets, feedforward
    kind = model.config.model_type
    if kind in DEFAULTS:
        return DEFAULTS[kind]
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    if {"k_proj", "v_proj", "down_proj"} <= names:
        return DEFAULTS["llama"]
    raise ConfigError(
        f"peft.targets has no default for model type {kind!r}; name the key, value and FFN-output layers, "
        "e.g. peft.targets=[k_proj,v_proj,down_proj] peft.feedforward=[down_proj]"
    )


def placements(model: nn.Module, cfg) -> list[tuple[str, bool]]:
    """(path, feed-forward?) of every layer (IA)3 scales — also MoV's placement (methods/mov.py)."""
    targets, feedforward = resolve_targets(model, cfg)
    paths = find_targets(model, targets)
    ff_paths = set(find_targets(model, feedforward, what="peft.feedforward")) if feedforward else set()
    if ff_paths - set(paths):
        extra = sorted(ff_paths - set(paths))[0]
        raise ConfigError(f"peft.feedforward selects {extra!r}, which peft.targets does not adapt; "
                          "feed-forward layers must be among the targets")
    return [(path, path in ff_paths) for path in paths]


def apply(model: nn.Module, cfg: IA3Config) -> None:
    freeze(model)
    for path, feedforward in placements(model, cfg):
        set_submodule(model, path, IA3Linear(model.get_submodule(path), feedforward))


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}


def merge(model: nn.Module) -> None:
    """Fold every scaling vector into its layer's weights and put the plain layers back (a quantised
    base is dequantised first: a merged model is plain)."""
    merge_wrappers(model, (IA3Linear,), lambda layer: layer.merge())


def to_peft_config(cfg: IA3Config, model: nn.Module) -> dict:
    layers = ia3_layers(model)
    found = list(layers)
    ff = [n for n, m in layers.items() if m.feedforward]
    return {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "target_modules": peft_target_modules(model, "all-linear", found),
        "feedforward_modules": peft_target_modules(model, "all-linear", ff) if ff else [],
        "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "init_ia3_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def from_peft_config(d: dict) -> IA3Config:
    if d.get("modules_to_save"):
        raise ConfigError(f"adapter_config.json has modules_to_save={d['modules_to_save']!r}, which ia3 does not load")
    if d.get("target_modules") is None:
        raise ConfigError("adapter_config.json has no target_modules")
    ff = d.get("feedforward_modules") or []
    return IA3Config(targets=d["target_modules"], feedforward=ff if isinstance(ff, str) else list(ff))


register(Method(
    name="ia3", config_cls=IA3Config, apply=apply, merge=merge, peft_type="IA3", state_prefixes=("ia3_l",),
    to_peft_config=to_peft_config, from_peft_config=from_peft_config,
))
