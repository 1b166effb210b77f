"""Many LoRA adapters on one frozen base, and batches that mix them row by row.

S-LoRA (Sheng et al., arXiv:2311.03285) and Punica (Chen et al., arXiv:2310.18547): one copy of
the base serves every adapter; each row b of a batch picks its own adapter a(b) (or none):

    y_b = W x_b + s_a · B_a A_a x_b,     a = a(b);   no adapter: y_b = W x_b

Every loaded adapter owns a *slot*. A wrapped layer keeps the adapters stacked,
``stack_A`` [slots, R, in] and ``stack_B`` [slots, out, R] with R the largest rank loaded;
smaller ranks are zero-padded (zero rows of A and columns of B add exactly nothing) and slot 0 is
all zeros ("no adapter"). Three ways to run a batch (``mode``):

- ``gather`` (Punica's BGMV, in PyTorch): gather A and B per row and run two batched matmuls,
  ``h = bmm(x [b,T,in], A[slot]ᵀ [b,in,R])``, ``y = bmm(h, B[slot]ᵀ [b,R,out]) · s[slot]``;
  one kernel launch for any mix, at the padded rank.
- ``grouped`` (S-LoRA/SGMV-like): one pair of matmuls per distinct adapter on its rows, at that
  adapter's own rank (no padding waste; a launch per adapter).
- ``auto``: a plain matmul when the whole batch uses one adapter, ``gather`` otherwise.

``MultiLoRAModel`` holds the base and names: ``load`` / ``add`` / ``delete`` adapters, ``replace``
one in place (hot-swap: its slot gets the new version's factors, the base is never reloaded),
``set_active``, ``disabled()``, ``route(names)`` for per-row adapters, ``combine`` (PEFT's
``linear``, ``cat`` and ``svd`` combinations) and ``save`` (a PEFT LoRA directory). The base's
own ``LoRALinear`` (training) is untouched: this module wraps plain linear layers itself.
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
from safetensors.torch import load_file, save_file
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
from ..methods.lora_init import pattern_value
from ..methods.lowrank import lora_scaling
from ..model.params import freeze
from ..model.targets import is_linear, linear_shape, peft_target_modules, set_submodule
from ..registry import PEFT_PREFIX
from ..version import __version__

MODES = ("auto", "gather", "grouped")
NAME_RX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
COMBINATIONS = ("linear", "cat", "svd")


class Router:
    """Which slot each row uses, shared by every wrapped layer of one model.

    ``rows`` [batch] (long) for per-row adapters, or ``single`` (one slot for the whole batch).
    """

    def __init__(self, mode: str = "auto"):
        if mode not in MODES:
            raise ConfigError(f"multi-adapter mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.single: int = 0
        self.rows: torch.Tensor | None = None


class MultiLoRALinear(nn.Module):
    """A frozen linear layer (``nn.Linear`` or GPT-2 ``Conv1D``) plus stacked LoRA adapters.

    x [..., in] -> [..., out]. With per-row routing the leading dimension of x is the batch.
    """

    def __init__(self, base_layer: nn.Module, router: Router, dtype: torch.dtype):
        super().__init__()
        self.base_layer = base_layer
        self.router = router
        self.in_features, self.out_features = linear_shape(base_layer)
        device = base_layer.weight.device
        self.register_buffer("stack_A", torch.zeros(1, 0, self.in_features, device=device, dtype=dtype),
                             persistent=False)
        self.register_buffer("stack_B", torch.zeros(1, self.out_features, 0, device=device, dtype=dtype),
                             persistent=False)
        self.register_buffer("stack_scale", torch.zeros(1, device=device, dtype=torch.float32), persistent=False)
        self.ranks: dict[int, int] = {}  # slot -> rank of the adapter in this layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _grow(self, slots: int, rank: int) -> None:
        s0, r0 = self.stack_A.shape[0], self.stack_A.shape[1]
        if slots <= s0 and rank <= r0:
            return
        slots, rank = max(slots, s0), max(rank, r0)
        a = self.stack_A.new_zeros(slots, rank, self.in_features)
        b = self.stack_B.new_zeros(slots, self.out_features, rank)
        s = self.stack_scale.new_zeros(slots)
        a[:s0, :r0] = self.stack_A
        b[:s0, :, :r0] = self.stack_B
        s[:s0] = self.stack_scale
        self.stack_A, self.stack_B, self.stack_scale = a, b, s

    def ensure_slots(self, slots: int) -> None:
        """Room for ``slots`` slots (every layer of a model has the same number, so any slot index
        routes safely to every layer: a slot this layer does not use holds zeros)."""
        self._grow(slots, 0)

    @torch.no_grad()
    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """Put adapter ``A`` [r, in], ``B`` [out, r] with scaling s into ``slot``."""
        r = A.shape[0]
        assert A.shape == (r, self.in_features) and B.shape == (self.out_features, r), (A.shape, B.shape)
        self._grow(slot + 1, r)
        self.stack_A[slot].zero_()
        self.stack_B[slot].zero_()
        self.stack_A[slot, :r] = A.to(self.stack_A)
        self.stack_B[slot, :, :r] = B.to(self.stack_B)
        self.stack_scale[slot] = scaling
        self.ranks[slot] = r

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        if slot in self.ranks:
            self.stack_A[slot].zero_()
            self.stack_B[slot].zero_()
            self.stack_scale[slot] = 0.0
            del self.ranks[slot]

    def factors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A [r, in], B [out, r], s) of the adapter in ``slot``, or None if it skips this layer."""
        r = self.ranks.get(slot)
        if r is None:
            return None
        return self.stack_A[slot, :r], self.stack_B[slot, :, :r], float(self.stack_scale[slot])

    def delta_weight(self, slot: int) -> torch.Tensor:
        """s·BA [out, in] in fp32 (zeros when the adapter skips this layer)."""
        f = self.factors(slot)
        if f is None:
            return torch.zeros(self.out_features, self.in_features, device=self.stack_A.device)
        a, b, s = f
        return (b.float() @ a.float()) * s

    def _one(self, x: torch.Tensor, slot: int) -> torch.Tensor | None:
        f = self.factors(slot)
        if f is None:
            return None
        a, b, s = f
        return ((x @ a.T) @ b.T) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        router = self.router
        if not self.ranks:
            return result
        xa = x.to(self.stack_A.dtype)
        rows = router.rows
        if rows is None:
            lora = self._one(xa, router.single) if router.single else None
            return result if lora is None else result + lora.to(result.dtype)
        batch = x.shape[0]
        assert rows.shape == (batch,), (rows.shape, x.shape)
        if router.mode == "grouped":
            out = torch.zeros_like(result, dtype=xa.dtype)
            for slot in rows.unique().tolist():
                if slot not in self.ranks:
                    continue
                idx = (rows == slot).nonzero().flatten()
                out.index_copy_(0, idx, self._one(xa.index_select(0, idx), slot))
            return result + out.to(result.dtype)
        x3 = xa.reshape(batch, -1, self.in_features)  # [b, T, in]
        a = self.stack_A.index_select(0, rows)  # [b, R, in]
        b = self.stack_B.index_select(0, rows)  # [b, out, R]
        h = torch.bmm(x3, a.transpose(1, 2))  # [b, T, R]
        y = torch.bmm(h, b.transpose(1, 2)) * self.stack_scale.index_select(0, rows).to(h.dtype)[:, None, None]
        return result + y.reshape(result.shape).to(result.dtype)

    def extra_repr(self) -> str:
        return f"adapters={len(self.ranks)}, max_rank={self.stack_A.shape[1]}"


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


SERVED_TYPES = ("LORA", "LORA_DROP")  # adapter_config peft_types whose tensors are (A, B) per module


def read_lora_dir(adapter_dir: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter_config dict, {module path: (A [r, in], B [out, r])}) of a LoRA adapter directory.

    Refuses what the stacked layers cannot represent, naming the key: other methods, DoRA,
    biases, modules_to_save and embedding LoRA. Per-layer ranks and alphas (``rank_pattern``,
    ``alpha_pattern``: EVA's adapters, PEFT's) are served; ``module_scalings`` reads them.
    """
    d = Path(adapter_dir)
    config, _ = read_adapter_config(d)
    if config.get("peft_type") not in SERVED_TYPES:
        raise ConfigError(
            f"{d} is a {config.get('peft_type')!r} adapter; multi-adapter serving runs LoRA adapters only "
            "(and LoRA-drop's, which are LoRA with shared factors; serve it alone with `peftlab generate "
            "--adapter`, or merge it with `peftlab merge`)"
        )
    for key, bad in (("use_dora", bool), ("modules_to_save", bool), ("bias", lambda v: v not in (None, "none"))):
        if key in config and bad(config[key]):
            raise ConfigError(f"{d / CONFIG_NAME}: {key}={config[key]!r} is not supported by multi-adapter "
                              "serving; merge this adapter (peftlab merge) or retrain without it")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ConfigError(f"{d / CONFIG_NAME} has no {key!r}")
    try:
        tensors = load_file(str(d / WEIGHTS_NAME))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ConfigError(f"{d / WEIGHTS_NAME} cannot be read as safetensors ({e}); is the file damaged?") from None
    if config["peft_type"] == "LORA_DROP":  # each module on a shared pair is a LoRA with that pair's factors
        from ..methods.lora_drop import as_lora_tensors

        tensors = as_lora_tensors(config, tensors, str(d))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        key = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        parts = key.split(".")
        if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
            raise ConfigError(f"{d / WEIGHTS_NAME}: tensor {name!r} is not a LoRA factor (<module>.lora_A.weight or "
                              "lora_B.weight); embedding LoRA and extra tensors are not supported when serving")
        pairs.setdefault(".".join(parts[:-2]), {})[parts[-2]] = t
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ConfigError(f"{d / WEIGHTS_NAME}: module {module} has only {sorted(ab)}")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ConfigError(f"{d / WEIGHTS_NAME}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                              "expected [r, in] and [out, r]")
        out[module] = (a, b)
    if not out:
        raise ConfigError(f"{d / WEIGHTS_NAME} holds no LoRA tensors")
    module_scalings(config, out, d / CONFIG_NAME)  # a rank that is not the pattern's is refused here
    return config, out


def module_scalings(config: dict, factors: dict, where: str | Path = CONFIG_NAME) -> dict[str, float]:
    """{module path: s}: s = alpha / r (alpha / sqrt(r) with ``use_rslora``), r and alpha the module's
    entry in PEFT's ``rank_pattern`` / ``alpha_pattern`` (the first key matching the end of its
    path) or else the file's ``r`` and ``lora_alpha``. A module whose factors' rank is not that r
    is refused: its scaling would be wrong."""
    r0, alpha0 = int(config["r"]), float(config["lora_alpha"])
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    out = {}
    for path, (a, _) in factors.items():
        r, alpha = int(pattern_value(ranks, path, r0)), float(pattern_value(alphas, path, alpha0))
        if a.shape[0] != r:
            raise ConfigError(f"{where}: {path} has rank {a.shape[0]} in the weights file but r={r} in the config "
                              f"({'rank_pattern' if ranks else 'r'}); the two files do not belong together")
        out[path] = lora_scaling(alpha, r, bool(config.get("use_rslora", False)))
    return out


class MultiLoRAModel(nn.Module):
    """A frozen causal LM with any number of named LoRA adapters, used one at a time or per row.

    ``model(input_ids, ...)`` runs with the active adapter (``set_active``; None = the base);
    ``with mm.route(["a", None, "b"]): model(...)`` gives each batch row its own adapter.
    """

    def __init__(self, model: nn.Module, mode: str = "auto", adapter_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        freeze(model)
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
