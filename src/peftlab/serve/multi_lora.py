"""Many LoRA adapters on one frozen base, and batches that mix them row by row.

``MultiLoRAModel`` holds the base and names: ``load`` / ``add`` / ``delete`` adapters, ``replace``
one in place (hot-swap: its slot gets the new version's factors, the base is never reloaded),
``set_active``, ``disabled()``, ``route(names)`` for per-row adapters, ``combine`` (PEFT's
``linear``, ``cat`` and ``svd`` combinations) and ``save`` (a PEFT LoRA directory). The layers it
wraps, the slots and the three ways to run a mixed batch (``gather``, ``grouped``, ``auto``) are
``serve/stacked.py``; reading an adapter directory is ``serve/lora_dir.py``. The base's own
``LoRALinear`` (training) is untouched: this module wraps plain linear layers itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import ConfigError
from ..export.adapter import (
    CONFIG_NAME,
    PEFTLAB_NAME,
    WEIGHTS_NAME,
    base_fingerprint,
    check_fingerprint,
    read_adapter_config,
)
from ..io import atomic_dir
from ..model.decode import split_products
from ..model.params import freeze
from ..model.targets import is_linear, linear_shape, peft_target_modules, set_submodule
from ..registry import PEFT_PREFIX
from ..version import __version__
from .lora_dir import SERVED_TYPES, module_scalings, read_lora_dir
from .stacked import MODES, MultiLoRALinear, Router

__all__ = ["MODES", "SERVED_TYPES", "AdapterInfo", "MultiLoRALinear", "MultiLoRAModel", "Router", "read_lora_dir"]
NAME_RX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
COMBINATIONS = ("linear", "cat", "svd")


@dataclass
class AdapterInfo:
    name: str
    slot: int
    r: int  # the adapter's (largest) rank
    alpha: float
    use_rslora: bool
    modules: list[str]  # dotted paths of the layers it adapts
    source: str | None = None  # directory it was loaded from
    meta: dict = field(default_factory=dict)


def _validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RX.match(name) or ".." in name:
        raise ConfigError(
            f"adapter name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (no '/', no '..')"
        )
    return name


class MultiLoRAModel(nn.Module):
    """A frozen causal LM with any number of named LoRA adapters, used one at a time or per row.

    ``model(input_ids, ...)`` runs with the active adapter (``set_active``; None = the base);
    ``with mm.route(["a", None, "b"]): model(...)`` gives each batch row its own adapter.
    """

    def __init__(self, model: nn.Module, mode: str = "auto", adapter_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        freeze(model)
        split_products(model)  # decode steps at batch 1: one-row products over the threads, the same bits
        self.router = Router(mode)
        self.adapters: dict[str, AdapterInfo] = {}
        self.active: str | None = None
        self._adapter_dtype = adapter_dtype
        self._slots = 2  # capacity of every wrapped layer (slot 0 = no adapter); doubles as needed

    # -- plumbing ------------------------------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def layers(self) -> dict[str, MultiLoRALinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, MultiLoRALinear)}

    def _dtype_for(self, weight: torch.Tensor) -> torch.dtype:
        if self._adapter_dtype is not None:
            return self._adapter_dtype
        return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32

    def _layer(self, path: str) -> MultiLoRALinear:
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise ConfigError(f"the base model has no layer {path!r} (an adapter for another base model?)") from None
        if isinstance(module, MultiLoRALinear):
            return module
        if not is_linear(module):
            raise ConfigError(f"layer {path!r} is a {type(module).__name__}; LoRA serving adapts linear layers only")
        wrapped = MultiLoRALinear(module, self.router, self._dtype_for(module.weight))
        wrapped.ensure_slots(self._slots)
        set_submodule(self.model, path, wrapped)
        return wrapped

    def _free_slot(self) -> int:
        used = {a.slot for a in self.adapters.values()}
        slot = 1
        while slot in used:
            slot += 1
        return slot

    # -- adapters -------------------------------------------------------------------------

    def add(self, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float | dict[str, float],
            *, alpha: float | None = None, use_rslora: bool = False, source: str | None = None,
            meta: dict | None = None) -> AdapterInfo:
        """Add adapter ``name`` from {module path: (A [r, in], B [out, r])} and its scaling s
        (one number, or one per module)."""
        _validate_name(name)
        if name in self.adapters:
            raise ConfigError(f"an adapter named {name!r} is already loaded; delete it first or pick another name")
        self.check_factors(name, factors)  # check everything before touching any layer
        slot = self._free_slot()
        if slot >= self._slots:
            self._slots = max(slot + 1, 2 * self._slots)
            for layer in self.layers().values():
                layer.ensure_slots(self._slots)
        r = max(a.shape[0] for a, _ in factors.values())
        for path, (a, b) in factors.items():
            s = scaling[path] if isinstance(scaling, dict) else scaling
            self._layer(path).set_slot(slot, a.to(self.device), b.to(self.device), s)
        info = AdapterInfo(name, slot, r, alpha if alpha is not None else float(r), use_rslora, list(factors),
                           source, dict(meta or {}))
        self.adapters[name] = info
        return info

    def check_factors(self, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Raise ConfigError unless every (A [r, in], B [out, r]) fits a linear layer of this base."""
        for path, (a, b) in factors.items():
            module = self.model.get_submodule(path) if _has(self.model, path) else None
            if module is None:
                raise ConfigError(f"adapter {name!r}: the base model has no layer {path!r} "
                                  "(trained on another base model?)")
            base = module.base_layer if isinstance(module, MultiLoRALinear) else module
            if not is_linear(base):
                raise ConfigError(f"adapter {name!r}: {path!r} is a {type(base).__name__}, not a linear layer")
            in_f, out_f = linear_shape(base)
            if a.shape[1] != in_f or b.shape[0] != out_f:
                raise ConfigError(f"adapter {name!r}: {path} has A {tuple(a.shape)}, B {tuple(b.shape)} but the layer "
                                  f"is in={in_f}, out={out_f} (trained on another base model?)")

    def check_dir(self, name: str, adapter_dir: str | Path) -> tuple[dict, dict]:
        """(config, factors) of a LoRA adapter directory that fits this base; ConfigError otherwise
        (another method, a damaged file, another base's shapes or weights). Changes nothing."""
        adapter_dir = Path(adapter_dir)
        config, factors = read_lora_dir(adapter_dir)
        _, record = read_adapter_config(adapter_dir)
        if record:
            check_fingerprint(adapter_dir, record, self.model)
        self.check_factors(name, factors)
        return config, factors

    def load(self, name: str, adapter_dir: str | Path) -> AdapterInfo:
        """Load a LoRA adapter directory (peftlab's or Hugging Face PEFT's) as ``name``."""
        adapter_dir = Path(adapter_dir)
        config, factors = self.check_dir(name, adapter_dir)
        return self.load_checked(name, config, factors, adapter_dir)

    def load_checked(self, name: str, config: dict, factors: dict, source: str | Path) -> AdapterInfo:
        """``load`` from what ``check_dir`` returned (an adapter server keeps those in host memory)."""
        alpha, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora", False))
        return self.add(name, factors, module_scalings(config, factors), alpha=alpha, use_rslora=rslora,
                        source=str(source), meta={"target_modules": config.get("target_modules")})

    def replace(self, name: str, adapter_dir: str | Path) -> AdapterInfo:
        """Hot-swap: the LoRA adapter in ``adapter_dir`` takes the place of loaded adapter ``name``, in
        its slot, in place — the base is not reloaded or touched, the other adapters keep their slots,
        and routing by name (``set_active``, ``route``) goes on working. Its rank, alpha and targets may
        differ from the old version's. Everything is checked first: a directory that does not fit
        raises ConfigError and leaves the old weights serving."""
        info = self._info(name)
        adapter_dir = Path(adapter_dir)
        config, factors = self.check_dir(name, adapter_dir)
        alpha, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora", False))
        scalings = module_scalings(config, factors)
        for path, layer in self.layers().items():
            if path not in factors:
                layer.clear_slot(info.slot)
        for path, (a, b) in factors.items():
            self._layer(path).set_slot(info.slot, a.to(self.device), b.to(self.device), scalings[path])
        new = AdapterInfo(name, info.slot, max(a.shape[0] for a, _ in factors.values()), alpha, rslora,
                          list(factors), str(adapter_dir), {"target_modules": config.get("target_modules")})
        self.adapters[name] = new
        return new

    def delete(self, name: str) -> None:
        info = self._info(name)
        for layer in self.layers().values():
            layer.clear_slot(info.slot)
        del self.adapters[name]
        if self.active == name:
            self.active = None
            self.router.single = 0

    def _info(self, name: str) -> AdapterInfo:
        if name not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none loaded"
            raise ConfigError(f"no adapter named {name!r}; loaded adapters: {known}")
        return self.adapters[name]

    def slot_of(self, name: str | None) -> int:
        return 0 if name is None else self._info(name).slot

    def set_active(self, name: str | None) -> None:
        """The adapter every row uses (None: the base model)."""
        self.router.single = self.slot_of(name)
        self.active = name

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model with every adapter off (the active one comes back after)."""
        saved, rows = self.router.single, self.router.rows
        self.router.single, self.router.rows = 0, None
        try:
            yield
        finally:
            self.router.single, self.router.rows = saved, rows

    @contextlib.contextmanager
    def route(self, names: Sequence[str | None]) -> Iterator[None]:
        """Give batch row i the adapter ``names[i]`` (None: the base) for the forwards inside."""
        slots = [self.slot_of(n) for n in names]
        saved_single, saved_rows = self.router.single, self.router.rows
        if len(set(slots)) == 1 and self.router.mode == "auto":
            self.router.single, self.router.rows = slots[0], None
        else:
            self.router.rows = torch.tensor(slots, dtype=torch.long, device=self.device)
        try:
            yield
        finally:
            self.router.single, self.router.rows = saved_single, saved_rows

    # -- inspection -------------------------------------------------------------------------

    def factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """{module path: (A [r, in], B [out, r], s)} of adapter ``name``."""
        slot = self._info(name).slot
        out = {}
        for path, layer in self.layers().items():
            f = layer.factors(slot)
            if f is not None:
                out[path] = f
        return out

    def delta_weight(self, name: str, path: str) -> torch.Tensor:
        """s·BA [out, in] (fp32) of adapter ``name`` at layer ``path``."""
        return self.layers()[path].delta_weight(self._info(name).slot)

    # -- combining ---------------------------------------------------------------------------

    @torch.no_grad()
    def combine(self, new_name: str, names: Sequence[str], weights: Sequence[float], how: str = "cat",
                rank: int | None = None) -> AdapterInfo:
        """A new adapter from weighted adapters, with PEFT's ``add_weighted_adapter`` math (scaling 1):

        - ``linear`` (same rank): A = Σ sign(w_i s_i)·sqrt|w_i s_i|·A_i, B = Σ sqrt|w_i s_i|·B_i
          (cheap; ΔW = BA has cross terms, so it is not Σ w_i ΔW_i);
        - ``cat``: A = [w_1 s_1 A_1; ...], B = [B_1 ... B_n]: exactly ΔW = Σ w_i s_i B_i A_i, rank Σ r_i;
        - ``svd``: the best rank-``rank`` approximation of Σ w_i s_i B_i A_i (truncated SVD,
          B = U_k Σ_k, A = V_kᵀ), default rank = max r_i.
        """
        if how not in COMBINATIONS:
            raise ConfigError(f"combination {how!r} is not one of {', '.join(COMBINATIONS)}")
        names, weights = list(names), [float(w) for w in weights]
        if not names or len(names) != len(weights):
            raise ConfigError(f"combine needs one weight per adapter; got {len(names)} adapters, {len(weights)} weights")
        infos = [self._info(n) for n in names]
        _validate_name(new_name)
        if new_name in self.adapters:
            raise ConfigError(f"an adapter named {new_name!r} is already loaded")
        if how == "linear":
            ranks = {layer.ranks[i.slot] for layer in self.layers().values() for i in infos if i.slot in layer.ranks}
            if len(ranks) != 1:
                raise ConfigError(f"linear combination needs adapters of one rank; got ranks {sorted(ranks)} "
                                  "(use how='cat' or how='svd')")
        if how == "svd" and rank is not None and rank < 1:
            raise ConfigError(f"svd rank must be >= 1, got {rank}")
        new_rank = {"linear": infos[0].r, "cat": sum(i.r for i in infos),
                    "svd": rank or max(i.r for i in infos)}[how]
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for path, layer in self.layers().items():
            parts = [(layer.factors(i.slot), w, i) for i, w in zip(infos, weights)]
            if all(f is None for f, _, _ in parts):
                continue
            if how == "linear":
                a = sum(math.copysign(math.sqrt(abs(w * f[2])), w * f[2]) * f[0].float() for f, w, _ in parts if f)
                b = sum(math.sqrt(abs(w * f[2])) * f[1].float() for f, w, _ in parts if f)
            elif how == "cat":
                a_blocks, b_blocks = [], []
                for f, w, info in parts:
                    if f is None:  # this adapter skips the layer: a zero block keeps ranks aligned
                        a_blocks.append(torch.zeros(info.r, layer.in_features, device=layer.stack_A.device))
                        b_blocks.append(torch.zeros(layer.out_features, info.r, device=layer.stack_A.device))
                    else:
                        pad = info.r - f[0].shape[0]
                        a_blocks.append(nn.functional.pad(f[0].float() * (w * f[2]), (0, 0, 0, pad)))
                        b_blocks.append(nn.functional.pad(f[1].float(), (0, pad)))
                a, b = torch.cat(a_blocks, 0), torch.cat(b_blocks, 1)
            else:
                delta = sum(w * (f[1].float() @ f[0].float()) * f[2] for f, w, _ in parts if f)
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
                k = min(new_rank, s.shape[0])
                b, a = u[:, :k] * s[:k], vh[:k]
                if k < new_rank:  # a layer narrower than the rank: pad so the file has one rank
                    a = nn.functional.pad(a, (0, 0, 0, new_rank - k))
                    b = nn.functional.pad(b, (0, new_rank - k))
            factors[path] = (a, b)
        return self.add(new_name, factors, 1.0, alpha=float(new_rank),
                        meta={"combined_from": names, "weights": weights, "how": how})

    # -- saving ------------------------------------------------------------------------------

    def save(self, name: str, out_dir: str | Path, base_model_name: str | None = None) -> Path:
        """Write adapter ``name`` as a PEFT LoRA directory (loads in peftlab, PEFT and vLLM)."""
        info = self._info(name)
        factors = self.factors(name)
        ranks = {a.shape[0] for a, _, _ in factors.values()}
        scales = {s for _, _, s in factors.values()}
        if len(ranks) != 1 or len(scales) != 1:
            raise ConfigError(f"adapter {name!r} has per-layer ranks {sorted(ranks)} or scalings; "
                              "a PEFT file needs one rank and one alpha")
        r, s = ranks.pop(), scales.pop()
        alpha = s * (math.sqrt(r) if info.use_rslora else r)
        state = {}
        for path, (a, b, _) in factors.items():
            state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.detach().float().cpu().contiguous()
            state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.detach().float().cpu().contiguous()
        fan_in_fan_out = any(type(self.layers()[p].base_layer).__name__ == "Conv1D" for p in factors)
        targets = peft_target_modules(_Unwrapped(self.model), list(factors), list(factors))
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
            "target_modules": targets, "fan_in_fan_out": fan_in_fan_out, "bias": "none",
            "use_rslora": info.use_rslora, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model_name,
        }
        record = {"peftlab_version": __version__,
                  "method": {"method": "lora", "r": r, "alpha": alpha, "dropout": 0.0,
                             "targets": targets, "use_rslora": info.use_rslora},
                  "base_model": base_model_name, "base_fingerprint": base_fingerprint(self.model),
                  "serve": info.meta}
        with atomic_dir(out_dir) as tmp:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
            (tmp / PEFTLAB_NAME).write_text(json.dumps(record, indent=2))
        return Path(out_dir)


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


class _Unwrapped:
    """named_modules()/get_submodule() of a model as if its MultiLoRALinear layers were plain."""

    def __init__(self, model: nn.Module):
        self.model = model

    def named_modules(self):
        for n, m in self.model.named_modules():
            if n.endswith(".base_layer") or ".base_layer." in n:
                continue
            yield n, (m.base_layer if isinstance(m, MultiLoRALinear) else m)

    def get_submodule(self, path: str) -> nn.Module:
        m = self.model.get_submodule(path)
        return m.base_layer if isinstance(m, MultiLoRALinear) else m
