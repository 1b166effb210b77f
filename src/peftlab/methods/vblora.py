"""VB-LoRA: every LoRA factor assembled from a vector bank shared by the whole model.

Li et al., "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks" (NeurIPS 2024),
arXiv:2405.15179.

    h = W x + B A x,   A [r, in] and B [out, r] cut into sub-vectors of length L, each
    sub-vector = Σ_{j ∈ top-k(z)} softmax(z_topk)_j · V[j],   V [N, L] the shared bank

Each sub-vector has its own logits z over the N bank vectors (``vblora_logits_A`` [r, in/L, N],
``vblora_logits_B`` [out/L, r, N]); only the top-k of them mix. The bank V (uniform in ±0.02) and
all logits (N(0, 0.1)) train. B is not zero at init, so the model starts near, not at, the base.
Merging adds B A into W. The bank hangs off the model once (``peftlab_vblora``; PEFT's file key
``base_model.vblora_vector_bank``); layers hold it by reference. Names and files are PEFT's
(peft_type ``VBLORA``); PEFT's ``save_only_topk_weights`` files (top-k indices and weights
instead of logits) load too — the logits are rebuilt as log-weights at the indices, −inf elsewhere,
which gives the same mixture (such an adapter can be served, not trained further).
Trainable: N·L + Σ_layers r·N·(in + out)/L.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from ..model.params import freeze
from ..model.targets import (
    LINEAR_TYPES,
    find_targets,
    layer_dtype_device,
    linear_shape,
    peft_target_modules,
    replace_module,
)
from ..registry import register
from . import peft_format
from .lowrank import factor_dtype, merge_delta, wide
from .merging import merge_wrappers
from .modules_to_save import add_additional_targets

HOLDER = "peftlab_vblora"
BANK = "vblora_vector_bank"
BANK_KEY, FILE_BANK_KEY = f"{HOLDER}.{BANK}", f"base_model.{BANK}"


@dataclass
class VBLoRAConfig:
    method: str = "vblora"
    r: int = 4
    num_vectors: int = 256  # N, the bank's size
    vector_length: int = 256  # L: must divide every target's in and out
    topk: int = 2
    dropout: float = 0.0
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    targets: str | list[str] = "all-linear"
    additional_targets: list[str] | None = None
    init_from: str | None = None
    merge_first: list[str] | None = None

    def validate(self) -> None:
        for key in ("r", "num_vectors", "vector_length", "topk"):
            if getattr(self, key) < 1:
                raise ConfigError(f"peft.{key} must be >= 1, got {getattr(self, key)}")
        if self.topk > self.num_vectors:
            raise ConfigError(f"peft.topk={self.topk} exceeds peft.num_vectors={self.num_vectors}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {self.dropout}")


class VectorBank(nn.Module):
    """The shared bank ``vblora_vector_bank`` [N, L] (trainable)."""

    def __init__(self, cfg: VBLoRAConfig, device, dtype):
        super().__init__()
        bank = torch.empty(cfg.num_vectors, cfg.vector_length, device=device, dtype=dtype)
        nn.init.uniform_(bank, -cfg.init_vector_bank_bound, cfg.init_vector_bank_bound)
        self.vblora_vector_bank = nn.Parameter(bank)


def mix(logits: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """[..., N] logits -> [..., L]: the softmax-weighted sum of the top-k bank vectors."""
    top, idx = logits.topk(k, dim=-1)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[idx]).sum(-2)


class VBLoRALinear(nn.Module):
    """A frozen linear layer plus B A built from the bank. x [..., in] -> [..., out]."""

    def __init__(self, base_layer: nn.Module, bank: VectorBank, cfg: VBLoRAConfig, path: str):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        length = cfg.vector_length
        if self.in_features % length or self.out_features % length:
            raise ConfigError(f"peft.vector_length={length} does not divide the shape (in={self.in_features}, "
                              f"out={self.out_features}) of {path!r}; choose a common divisor of the targets' sizes")
        self.__dict__["bank"] = bank  # shared; not registered as a child
        self.topk = cfg.topk
        dtype, device = layer_dtype_device(base_layer)
        kw = {"device": device, "dtype": factor_dtype(dtype)}
        self.vblora_logits_A = nn.Parameter(torch.randn(cfg.r, self.in_features // length, cfg.num_vectors, **kw)
                                            * cfg.init_logits_std)
        self.vblora_logits_B = nn.Parameter(torch.randn(self.out_features // length, cfg.r, cfg.num_vectors, **kw)
                                            * cfg.init_logits_std)
        self.vblora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def factors(self, wide_: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r])."""
        cast = wide if wide_ else (lambda t: t)
        la, lb, bank = cast(self.vblora_logits_A), cast(self.vblora_logits_B), cast(self.bank.vblora_vector_bank)
        if self.training and torch.isinf(la[0, 0]).any():
            raise ConfigError("this VB-LoRA adapter was loaded from a top-k-only file (PEFT's save_only_topk_weights): "
                              "its logits are -inf outside the top k, so it can be served but not trained further")
        a = mix(la, bank, self.topk).reshape(la.shape[0], -1)
        b = mix(lb, bank, self.topk).transpose(1, 2).reshape(-1, lb.shape[1])
        return a, b

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors(wide_=True)
        delta = b @ a
        return delta.T if isinstance(self.base_layer, Conv1D) else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a, b = self.factors()
        h = F.linear(self.vblora_dropout(x.to(a.dtype)), a)
        return result + F.linear(h, b).to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.vblora_logits_A.shape[0]}, topk={self.topk}, merged={self.merged}"


def apply(model: nn.Module, cfg: VBLoRAConfig) -> None:
    freeze(model)
    paths = find_targets(model, cfg.targets, kinds=LINEAR_TYPES)
    dtype, device = layer_dtype_device(model.get_submodule(paths[0]))
    bank = VectorBank(cfg, device, factor_dtype(dtype))
    setattr(model, HOLDER, bank)  # one copy, moved with the model by .to()
    for path in paths:
        replace_module(model, path, VBLoRALinear(model.get_submodule(path), bank, cfg, path))
    add_additional_targets(model, cfg.additional_targets)


def merge(model: nn.Module) -> None:
    merge_wrappers(model, (VBLoRALinear,), merge_delta)


def to_peft_config(cfg: VBLoRAConfig, model: nn.Module) -> dict:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, VBLoRALinear)}
    return {
        "peft_type": "VBLORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r, "num_vectors": cfg.num_vectors, "vector_length": cfg.vector_length, "topk": cfg.topk,
        "target_modules": peft_target_modules(model, cfg.targets, list(layers)),
        "save_only_topk_weights": False,
        "vblora_dropout": cfg.dropout,
        "init_vector_bank_bound": cfg.init_vector_bank_bound,
        "init_logits_std": cfg.init_logits_std,
        "fan_in_fan_out": peft_format.fan_in_fan_out(layers.values()),
        "bias": "none",
        "modules_to_save": peft_format.additional_targets_for_peft(cfg),
        "inference_mode": True,
    }


def from_peft_config(d: dict) -> VBLoRAConfig:
    for key in ("layers_to_transform", "exclude_modules"):
        if d.get(key):
            raise ConfigError(f"adapter_config.json has {key}={d[key]!r}, which peftlab's VB-LoRA does not load")
    return VBLoRAConfig(
        r=int(d.get("r", 4)), num_vectors=int(d.get("num_vectors", 256)), vector_length=int(d.get("vector_length", 256)),
        topk=int(d.get("topk", 2)), dropout=float(d.get("vblora_dropout") or 0.0),
        init_vector_bank_bound=float(d.get("init_vector_bank_bound", 0.02)),
        init_logits_std=float(d.get("init_logits_std", 0.1)),
        targets=peft_format.peft_targets(d, "VB-LoRA"), additional_targets=peft_format.additional_targets_from_peft(d),
    )


def to_peft_keys(state: dict) -> dict:
    """The bank under PEFT's model-level name ``base_model.vblora_vector_bank``."""
    state = dict(state)
    bank = state.pop(BANK_KEY)
    return {**peft_format.to_peft_keys(state), FILE_BANK_KEY: bank}


_from_file = peft_format.make_from_peft_keys(("vblora_logits",))


def from_peft_keys(state: dict) -> dict:
    """The bank back under the holder; logits rebuilt from a top-k-only file (see the module doc)."""
    state = dict(state)
    bank = state.pop(FILE_BANK_KEY)
    for key in [k for k in state if k.endswith("_topk_indices")]:
        idx = state.pop(key).long()
        w = state.pop(key.replace("_topk_indices", "_topk_weights")).float()
        w = torch.cat([w, 1 - w.sum(-1, keepdim=True)], dim=-1)
        logits = torch.full((*w.shape[:-1], bank.shape[0]), float("-inf")).scatter(-1, idx, torch.log(w))
        state[key.removesuffix("_topk_indices")] = logits
    return {**_from_file(state), BANK_KEY: bank}


register(peft_format.family_method("vblora", VBLoRAConfig, apply, ("vblora_",), merge=merge, peft_type="VBLORA",
                                   to_peft_config=to_peft_config, from_peft_config=from_peft_config,
                                   to_peft_keys=to_peft_keys, from_peft_keys=from_peft_keys))
