"""LoRA-drop: keep LoRA on the layers whose LoRA output matters, one shared LoRA for the rest.

Zhou et al., "LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation" (2024),
arXiv:2402.07721.

    warm-up (steps 1..W): plain LoRA on every targeted layer, h = W x + s B A x
    importance of decoder layer l, on the inputs x of step W's forward passes (sampled data):
        g_l = Σ_{LoRA modules m of layer l} Σ_tokens ||s B_m A_m x||²,    I_l = g_l / Σ_k g_k
    keep: the fewest layers, most important first, whose Σ I_l reaches ``threshold`` (the paper: 0.9)
    after step W: the kept layers keep their own LoRA (and its warm-up values); every other layer's
        module of kind k (e.g. self_attn.q_proj) uses ONE shared pair (A_k, B_k), fresh (B_k = 0),
        h = W x + s B_k A_k x; the optimiser is regrouped (``StepEffects.regroup``)

Trainable while warming up: LoRA's Σ r·(in + out); after: Σ_{kept layers} r·(in + out) +
Σ_kinds r·(in + out) (one shared pair per kind). Under DDP the sums are added over the ranks first,
so every rank keeps the same layers. ``peft.keep_layers=[...]`` builds the pruned form
directly (no warm-up): saving records the kept layers there, so a saved adapter loads as it was
trained. Merges like LoRA (each layer folds s B A, shared or own, into W); QLoRA bases work as
for LoRA. Resume is exact on either side of step W: the importance is measured on step W's own
forward passes, which a checkpoint cannot replay, so every checkpoint records the kept layers
(``run_fields``: ``keep_layers``, ``importance``); resuming past step W rebuilds the pruned form from
them (a fresh shared pair per kind, then the checkpoint's values of every tensor and of the optimiser).
A checkpoint written before peftlab recorded them is refused with an error that says what to do.
Serving: every module on the shared pair is a plain LoRA with that pair's factors, so
``as_lora_factors`` hands the multi-adapter server one (A, B) per adapted module.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..model.targets import replace_module
from ..registry import StepEffects, register
from . import peft_format
from .lora import LORA_TENSORS, LoRAConfig, param_groups, set_speed, to_peft_config
from .lowrank import LoRALinear, apply_lora_family, merge_delta, reset_factors, wide
from .merging import merge_wrappers

HOLDER = "peftlab_lora_drop"
LAYER_PATH = re.compile(r"^(.*?\.(?:layers|h)\.)(\d+)\.(.+)$")  # (stack., index, module path within the layer)


@dataclass
class LoRADropConfig(LoRAConfig):
    method: str = "lora_drop"
    warmup_steps: int = 10  # W: plain LoRA steps before the importance is measured
    threshold: float = 0.9  # keep layers until their cumulative importance reaches this
    keep_layers: list[int] | None = None  # the pruned form directly (set on save)
    importance: list[float] = field(default_factory=list)  # I_l per layer, recorded on save

    def validate(self) -> None:
        super().validate()
        if self.warmup_steps < 2:  # at step 1 every B is still zero: no LoRA output to measure
            raise ConfigError(f"peft.warmup_steps must be >= 2 (LoRA-drop measures each layer's LoRA output on the "
                              f"last warm-up step, and B is still zero during step 1), got {self.warmup_steps}")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"peft.threshold must be in (0, 1] (the cumulative importance kept), got {self.threshold}")
        if self.init != "kaiming" or self.enable_lora or self.freeze_a or self.sparsity_dropout:
            raise ConfigError("peft.method=lora_drop supports plain LoRA layers (peft.init=kaiming, no enable_lora, "
                              "freeze_a or sparsity_dropout)")


class SharedLoRALinear(nn.Module):
    """A frozen layer plus the shared pair of its kind: h = W x + s B_k A_k x.

    The pair lives once at ``model.peftlab_lora_drop[kind]`` (held here outside the module tree, so it
    is saved and trained once); x: [..., in] -> [..., out].
    """

    def __init__(self, base_layer: nn.Module, pair: nn.ModuleDict, scaling: float, fan_in_fan_out: bool):
        super().__init__()
        self.base_layer = base_layer
        self.shared = [pair]  # a plain list: not a submodule
        self.scaling = scaling
        self.fan_in_fan_out = fan_in_fan_out
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        pair = self.shared[0]
        delta = (wide(pair["lora_B"].weight) @ wide(pair["lora_A"].weight)) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        pair = self.shared[0]
        return y + (pair["lora_B"](pair["lora_A"](x.to(pair["lora_A"].weight.dtype))) * self.scaling).to(y.dtype)


def lora_by_layer(model: nn.Module) -> dict[int, list[tuple[str, str, LoRALinear]]]:
    """decoder layer index -> [(path, kind, LoRALinear)] (kind: the module path within the layer)."""
    out: dict[int, list] = {}
    for path, m in model.named_modules():
        match = LAYER_PATH.match(path)
        if isinstance(m, LoRALinear) and match:
            out.setdefault(int(match.group(2)), []).append((path, match.group(3), m))
    if not out:
        raise ConfigError("peft.method=lora_drop found no LoRA layer inside the decoder layers; "
                          "peft.targets must select linear layers of the decoder layers")
    return out


def prune(model: nn.Module, cfg: LoRADropConfig, keep: list[int]) -> None:
    """Put one shared fresh pair per kind in place of the LoRA of every layer not in ``keep``."""
    layers = lora_by_layer(model)
    holder = nn.ModuleDict()
    for index, mods in layers.items():
        if index in keep:
            continue
        for path, kind, m in mods:
            key = kind.replace(".", "__")
            if key not in holder:
                a, b = m.lora_A.weight, m.lora_B.weight
                pair = nn.ModuleDict({"lora_A": nn.Linear(a.shape[1], a.shape[0], bias=False, device=a.device,
                                                          dtype=a.dtype),
                                      "lora_B": nn.Linear(b.shape[1], b.shape[0], bias=False, device=b.device,
                                                          dtype=b.dtype)})
                reset_factors(pair["lora_A"].weight, pair["lora_B"].weight, "kaiming", m.r)
                holder[key] = pair
            replace_module(model, path, SharedLoRALinear(m.base_layer, holder[key], m.scaling, m.fan_in_fan_out))
    model.add_module(HOLDER, holder)


def apply(model: nn.Module, cfg: LoRADropConfig) -> None:
    apply_lora_family(model, cfg, lambda base, enable: LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora))
    layers = lora_by_layer(model)
    if cfg.keep_layers is not None:
        bad = sorted(set(cfg.keep_layers) - set(layers))
        if bad:
            raise ConfigError(f"peft.keep_layers names layers {bad} that have no LoRA; adapted layers: {sorted(layers)}")
        prune(model, cfg, list(cfg.keep_layers))
        return
    for mods in layers.values():
        for _, _, m in mods:
            m.lora_drop_sq = 0.0  # Σ ||s B A x||² of this step's training forwards (a plain float)
            m.register_forward_hook(_record)


def _record(module: LoRALinear, args, output) -> None:
    if module.training and hasattr(module, "lora_drop_sq"):
        with torch.no_grad():
            module.lora_drop_sq += float(module.lora_forward(args[0]).float().pow(2).sum())


def choose(importance: dict[int, float], threshold: float) -> list[int]:
    """The fewest layers, most important first, whose normalised importance sums to >= threshold."""
    total = sum(importance.values())
    if total <= 0:
        return sorted(importance)
    kept, acc = [], 0.0
    for index in sorted(importance, key=lambda i: (-importance[i], i)):
        kept.append(index)
        acc += importance[index] / total
        if acc >= threshold - 1e-12:
            break
    return sorted(kept)


def on_step(model: nn.Module, cfg: LoRADropConfig, step: int) -> StepEffects | None:
    if getattr(model, HOLDER, None) is not None:
        return None  # pruned already (or built pruned with peft.keep_layers)
    layers = lora_by_layer(model)
    mods = [m for ms in layers.values() for _, _, m in ms]
    if step >= cfg.warmup_steps and cfg.keep_layers is not None:  # resumed past step W: the checkpoint's choice
        return _pruned(model, cfg, mods, list(cfg.keep_layers))
    if step < cfg.warmup_steps:
        for m in mods:
            m.lora_drop_sq = 0.0  # only step W's forwards count
        return None
    measured = {i: sum(m.lora_drop_sq for _, _, m in ms) for i, ms in layers.items()}
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank saw its own shard
        sums = torch.tensor([measured[i] for i in sorted(measured)], dtype=torch.float64,
                            device=next(iter(mods)).lora_A.weight.device)
        torch.distributed.all_reduce(sums)
        measured = dict(zip(sorted(measured), sums.tolist()))
    if step > cfg.warmup_steps or not any(measured.values()):
        raise ConfigError(f"LoRA-drop cannot resume from step {step}: it chose its layers at step {cfg.warmup_steps} "
                          "from that step's activations, and this checkpoint does not record the choice (written "
                          "by an older peftlab). Start the run again, or continue from its saved adapter "
                          "(adapter_config's keep_layers) with peft.keep_layers=[...]")
    total = sum(measured.values())
    cfg.importance = [round(measured[i] / total, 6) for i in sorted(measured)]
    return _pruned(model, cfg, mods, choose(measured, cfg.threshold))


def _pruned(model: nn.Module, cfg: LoRADropConfig, mods: list[LoRALinear], keep: list[int]) -> StepEffects:
    """Prune to ``keep`` (measured now, or recorded by the checkpoint being resumed) and say so."""
    for m in mods:
        m.__dict__.pop("lora_drop_sq", None)  # the kept layers' hooks stop measuring
    prune(model, cfg, keep)
    cfg.keep_layers = keep
    return StepEffects(metrics={"lora_drop_kept_layers": len(keep)}, regroup=True)


def saved_config(cfg: LoRADropConfig, model: nn.Module) -> LoRADropConfig:
    return cfg if getattr(model, HOLDER, None) is None else dataclasses.replace(cfg, keep_layers=list(cfg.keep_layers))


def merge(model: nn.Module) -> None:
    merge_wrappers(model, (LoRALinear, SharedLoRALinear), merge_delta)


def lora_drop_peft_config(cfg: LoRADropConfig, model: nn.Module) -> dict:
    out = to_peft_config(cfg, model)
    shared = [path for path, m in model.named_modules() if isinstance(m, SharedLoRALinear)]
    out.update(peft_type="LORA_DROP", keep_layers=cfg.keep_layers, threshold=cfg.threshold,
               warmup_steps=cfg.warmup_steps, shared_modules=shared)
    return out


def as_lora_tensors(config: dict, tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """A LORA_DROP adapter file's tensors in a plain LoRA's layout (for the multi-adapter server):
    every module of adapter_config's ``shared_modules`` gets its kind's shared pair under its own
    name (the same h = W x + s B_k A_k x); the kept layers' own factors pass through unchanged."""
    shared = config.get("shared_modules")
    if shared is None:
        raise ConfigError(f"{where}: this LoRA-drop adapter does not list its shared_modules (saved by an older "
                          "peftlab); serve it alone with `peftlab generate --adapter`, or merge it with `peftlab merge`")
    prefix = next((k.split(HOLDER + ".")[0] for k in tensors if HOLDER + "." in k), "")
    out = {k: v for k, v in tensors.items() if HOLDER + "." not in k}
    for path in shared:
        match = LAYER_PATH.match(path)
        kind = match.group(3).replace(".", "__") if match else None
        for factor in ("lora_A", "lora_B"):
            key = f"{prefix}{HOLDER}.{kind}.{factor}.weight"
            if key not in tensors:
                raise ConfigError(f"{where}: shared module {path} has no shared factor {key}")
            out[f"{prefix}{path}.{factor}.weight"] = tensors[key]
    return out


register(peft_format.family_method(
    "lora_drop", LoRADropConfig, apply, (*LORA_TENSORS, HOLDER), merge=merge, peft_type="LORA_DROP",
    to_peft_config=lora_drop_peft_config, param_groups=param_groups, on_step=on_step, saved_config=saved_config,
    set_speed=set_speed, run_fields=("keep_layers", "importance"),
))
