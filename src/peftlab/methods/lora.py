"""LoRA: low-rank adaptation of frozen linear (and embedding) layers, with its config-level variants.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), arXiv:2106.09685.

    h = W x + s * B A x,      s = alpha / r

W [out, in] is frozen; A [r, in] starts Kaiming-uniform (a = sqrt(5)), B [out, r] at zero, so
the adapted model equals the base at step 0. Dropout (``peft.dropout``) applies to the input of
the LoRA path only. Works on ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored [in, out]),
a quantised base (``model.quantize``: QLoRA) and ``nn.Embedding``. Variants that change only
init, scaling or optimiser groups are fields here:

- rsLoRA (Kalajdzievski 2023, arXiv:2312.03732): ``use_rslora`` -> s = alpha / sqrt(r).
- PiSSA (Meng et al. 2024, arXiv:2404.02948): ``init=pissa``: W = U S V^T;
  A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), W_res = W - s B A frozen. ``pissa_niter=N``
  uses a randomised SVD with N subspace iterations (Halko et al.; fast on large layers).
  Saving converts to a plain LoRA of rank 2r against the untouched W, as PEFT does:
  s (B A - B0 A0) = s [B, -B0] [A; A0].
- OLoRA (Büyükakyüz 2024, arXiv:2406.01775): ``init=olora``: W = Q R; B = Q_r, A = R_r,
  W_res = W - s B A. Saved like PiSSA.
- LoRA+ (Hayou et al. 2024, arXiv:2402.12354): ``loraplus_lr_ratio`` -> lr(B) = ratio * lr(A);
  LoRA on embeddings at ``loraplus_lr_embedding``.
- LoRA-FA (Zhang et al. 2023, arXiv:2308.03303): ``freeze_a`` -> A stays at its random init,
  only B trains (for embeddings, the randomly initialised factor B stays frozen instead).
- LoRA dropout as a sparsity regulariser (Lin et al. 2024, arXiv:2404.09610):
  ``sparsity_dropout=p`` -> during training  s (B ⊙ m_out) (A ⊙ m_in) / (1-p)^2  with Bernoulli
  masks over B's rows and A's columns (one draw per forward): each entry of BA is dropped with
  probability 2p - p^2.
- Fused projections (loralib's MergedLinear): ``enable_lora={c_attn: [true, false, true]}``
  splits a layer's output into equal slices (GPT-2's c_attn = q|k|v) and gives only the enabled
  slices a rank-r update: A [k r, in], B [k out/n, r] with slice j using rows j r..(j+1) r of A.
- LoRA on embeddings: name the embedding in ``targets``. E [V, d]: h = E[x] + s (A^T[x]) B^T
  with A [r, V] zero-initialised and B [d, r] normal, PEFT's layout (lora_embedding_A/B).

Merging is explicit: ``LoRALinear.merge()`` adds s·BA into W, ``unmerge()`` subtracts it, and
neither ``.eval()`` nor ``.train()`` touches it. ``merge(model)`` folds every LoRA layer into
its base (dequantising a quantised base first) and puts plain layers back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

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
    set_weight_matrix,
    weight_matrix,
)
from ..registry import Method, register
from . import extras, lora_kernels
from .extras import wide

INITS = ("kaiming", "gaussian", "pissa", "olora")
LORA_TENSORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


@dataclass
class LoRAConfig:
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"  # layer names, a regex, or all-linear; embeddings by name
    use_rslora: bool = False  # s = alpha / sqrt(r)
    init: str = "kaiming"  # kaiming | gaussian | pissa | olora
    pissa_niter: int = 0  # PiSSA: 0 exact SVD; N >= 1 randomised SVD with N subspace iterations
    freeze_a: bool = False  # LoRA-FA: A frozen at init, only B trains
    loraplus_lr_ratio: float | None = None  # LoRA+: lr(B) = ratio * lr(A)
    loraplus_lr_embedding: float = 1e-6  # LoRA+: lr of LoRA on embeddings
    sparsity_dropout: float = 0.0  # drop rows of B and columns of A with this probability (training)
    enable_lora: dict = field(default_factory=dict)  # fused layer -> slice mask, e.g. {c_attn: [true, false, true]}
    additional_targets: list[str] | None = None  # modules trained in full and saved (PEFT modules_to_save)
    init_from: str | None = None  # start training from this adapter's tensors
    merge_first: list[str] | None = None  # merge these adapters into the base, then train a fresh one

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"peft.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.sparsity_dropout < 1.0:
            raise ConfigError(f"peft.sparsity_dropout must be in [0, 1), got {self.sparsity_dropout}")
        if self.init not in INITS:
            raise ConfigError(f"peft.init {self.init!r} is not one of {', '.join(INITS)}")
        if self.pissa_niter < 0:
            raise ConfigError(f"peft.pissa_niter must be >= 0 (0 = exact SVD), got {self.pissa_niter}")
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio <= 0:
            raise ConfigError(f"peft.loraplus_lr_ratio must be > 0 (the paper suggests 16), got {self.loraplus_lr_ratio}")
        for name, mask in self.enable_lora.items():
            if not isinstance(mask, list) or not mask or not all(isinstance(b, bool) for b in mask) or not any(mask):
                raise ConfigError(f"peft.enable_lora.{name} must be a list of true/false with at least one true "
                                  f"(one per equal output slice, e.g. [true, false, true] for q,k,v), got {mask!r}")
        if self.enable_lora and self.init in ("pissa", "olora"):
            raise ConfigError(f"peft.init={self.init} initialises whole layers; it cannot combine with peft.enable_lora")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / (math.sqrt(r) if use_rslora else r)


def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """Adapter tensors stay fp32 (or the base dtype when that is fp32/fp64), as PEFT keeps them."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


@torch.no_grad()
def reset_factors(A: torch.Tensor, B: torch.Tensor, init: str, r: int) -> None:
    """A [r', in] random (Kaiming-uniform, or N(0, 1/r) for ``gaussian``), B [out', r] zero."""
    if init == "gaussian":
        nn.init.normal_(A, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)


@torch.no_grad()
def principal_init(layer: nn.Module, init: str, niter: int = 0) -> None:
    """PiSSA / OLoRA: factors from the top-r SVD / QR of W; W_res = W - s B A becomes the base.

    ``layer`` has ``base_layer``, ``lora_A`` [r, in], ``lora_B`` [out, r], ``scaling``, ``r``.
    The initial factors are kept as buffers ``lora_A0`` / ``lora_B0`` for the conversion on save.
    """
    if layer.lora_A.weight.is_meta:
        return
    r, s = layer.r, layer.scaling
    w = weight_matrix(layer.base_layer).float()  # [out, in]
    if init == "pissa":
        if niter:
            u, sv, v = torch.svd_lowrank(w, q=r, niter=niter)
            vh = v.T
        else:
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(sv[:r] / s)
        a = root[:, None] * vh[:r]
        b = u[:, :r] * root[None, :]
    else:  # olora
        q, rr = torch.linalg.qr(w)
        a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    layer.lora_A.weight.copy_(a)
    layer.lora_B.weight.copy_(b)
    set_weight_matrix(layer.base_layer, w - s * (b @ a))
    layer.register_buffer("lora_A0", a.to(layer.lora_A.weight.dtype).clone())
    layer.register_buffer("lora_B0", b.to(layer.lora_B.weight.dtype).clone())


class LoRALinear(extras.DeltaMerge, nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    x: [..., in] -> [..., out]. ``lora_A`` [r, in] and ``lora_B`` [out, r] (``nn.Linear``s) are
    kept in fp32 (or the base dtype when that is fp32/fp64) and the input is cast to them, as PEFT
    does. ``enable`` is None for an ordinary layer; for a fused layer (``peft.enable_lora``) it is
    the slice mask and the factors are A [k r, in], B [k out/n, r] (see the module docstring).
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", *, enable: list[bool] | None = None,
                 sparsity_dropout: float = 0.0, pissa_niter: int = 0):
        super().__init__()
        in_f, out_f = linear_shape(base_layer)
        self.enable = tuple(enable) if enable else None
        n = len(self.enable) if self.enable else 1
        k = sum(self.enable) if self.enable else 1
        if out_f % n:
            raise ConfigError(f"peft.enable_lora: a layer with {out_f} outputs cannot be split into {n} equal slices")
        slice_out = out_f // n
        if not 1 <= r <= min(in_f, slice_out):
            raise ConfigError(
                f"peft.r={r} does not fit a layer of shape in={in_f}, out={slice_out}: "
                f"the rank must be between 1 and {min(in_f, slice_out)}"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = in_f, out_f
        self.r = r
        self.alpha = alpha
        self.scaling = lora_scaling(alpha, r, use_rslora)
        dtype, device = layer_dtype_device(base_layer)
        dtype = factor_dtype(dtype)
        self.lora_A = nn.Linear(in_f, r * k, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, slice_out * k, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.sparsity_dropout = sparsity_dropout
        self.merged = False
        self.reset_lora(init)
        if init in ("pissa", "olora"):
            principal_init(self, init, pissa_niter)

    @property
    def fan_in_fan_out(self) -> bool:
        """True when the base stores its weight [in, out] (GPT-2's Conv1D)."""
        return isinstance(self.base_layer, Conv1D)

    def reset_lora(self, init: str = "kaiming") -> None:
        reset_factors(self.lora_A.weight, self.lora_B.weight, "gaussian" if init == "gaussian" else "kaiming", self.r)

    @property
    def weight(self) -> torch.Tensor:  # code that inspects layer.weight (e.g. dtype checks)
        return self.base_layer.weight

    def _slices(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(output slot, A_j [r, in], B_j [out/n, r]) for every enabled slice of a fused layer."""
        r, so = self.r, self.out_features // len(self.enable)
        slots = [i for i, on in enumerate(self.enable) if on]
        a, b = self.lora_A.weight, self.lora_B.weight
        return [(slot, a[j * r:(j + 1) * r], b[j * so:(j + 1) * so]) for j, slot in enumerate(slots)]

    def delta_weight(self) -> torch.Tensor:
        """s·BA in the base weight's layout ([out, in], or [in, out] for Conv1D), fp32 (fp64 for fp64 factors)."""
        if self.enable is None:
            delta = wide(self.lora_B.weight) @ wide(self.lora_A.weight)
        else:
            so = self.out_features // len(self.enable)
            delta = wide(self.lora_A.weight.new_zeros(self.out_features, self.in_features))
            for slot, a, b in self._slices():
                delta[slot * so:(slot + 1) * so] = wide(b) @ wide(a)
        delta = delta * self.scaling
        return delta.T if self.fan_in_fan_out else delta


    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """s·B A x: [..., in] -> [..., out] in the factors' dtype."""
        a = self.lora_A.weight
        h = self.lora_dropout(x.to(a.dtype))
        p = self.sparsity_dropout if self.training else 0.0
        if p:
            keep_in = torch.bernoulli(torch.full((self.in_features,), 1 - p, device=a.device, dtype=a.dtype))
            h = h * (keep_in / (1 - p))
        h = self.lora_A(h)
        if self.enable is None:
            out = self.lora_B(h)
        else:
            k, so = sum(self.enable), self.out_features // len(self.enable)
            parts = torch.einsum("...kr,kor->...ko", h.unflatten(-1, (k, self.r)),
                                 self.lora_B.weight.view(k, so, self.r))
            zeros = parts.new_zeros(*parts.shape[:-2], so)
            slots, j = [], 0
            for on in self.enable:
                slots.append(parts[..., j, :] if on else zeros)
                j += on
            out = torch.cat(slots, dim=-1)
        if p:
            keep_out = torch.bernoulli(torch.full((self.out_features,), 1 - p, device=a.device, dtype=a.dtype))
            out = out * (keep_out / (1 - p))
        return out * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged and lora_kernels.fast_path_ok(self, x):  # same math, fewer saved tensors
            return lora_kernels.lora_linear(self, x)
        result = self.base_layer(x)
        if self.merged:
            return result
        return result + self.lora_forward(x).to(result.dtype)

    def extra_repr(self) -> str:
        fused = f", enable={list(self.enable)}" if self.enable else ""
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}{fused}"


class LoRAEmbedding(extras.DeltaMerge, nn.Module):
    """A frozen embedding plus a trainable low-rank update (PEFT's layout).

    ids [...] -> [..., d]. ``lora_embedding_A`` [r, V] starts at zero, ``lora_embedding_B``
    [d, r] normal: h = E[ids] + s · A^T[ids] B^T. ΔE = s (B A)^T [V, d].
    """

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, use_rslora: bool = False):
        super().__init__()
        vocab, dim = base_layer.weight.shape
        if not 1 <= r <= min(vocab, dim):
            raise ConfigError(f"peft.r={r} does not fit an embedding of {vocab} x {dim}")
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha
        self.scaling = lora_scaling(alpha, r, use_rslora)
        w = base_layer.weight
        dtype = factor_dtype(w.dtype)
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, vocab, device=w.device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(dim, r, device=w.device, dtype=dtype))
        self.merged = False
        self.reset_lora()

    def reset_lora(self, init: str = "kaiming") -> None:
        with torch.no_grad():
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """s (B A)^T [V, d], fp32."""
        return (wide(self.lora_embedding_B) @ wide(self.lora_embedding_A)).T * self.scaling


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        e = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A.T, e.padding_idx, e.max_norm, e.norm_type,
                              e.scale_grad_by_freq, e.sparse)
        return result + ((after_a @ self.lora_embedding_B.T) * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


WRAPPERS = (LoRALinear, LoRAEmbedding)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, WRAPPERS)}


def wrap_targets(model: nn.Module, cfg, make_linear, make_embedding=None) -> list[str]:
    """Replace every layer ``cfg.targets`` selects by ``make_linear(base, enable)`` (linear layers)
    or ``make_embedding(base)`` (embeddings, when the method supports them); returns the paths."""
    kinds = LINEAR_TYPES + ((nn.Embedding,) if make_embedding else ())
    paths = find_targets(model, cfg.targets, kinds=kinds)
    enable = dict(getattr(cfg, "enable_lora", {}) or {})
    used = set()
    for path in paths:
        base = model.get_submodule(path)
        if isinstance(base, nn.Embedding):
            extras.replace_module(model, path, make_embedding(base))
            continue
        mask = next((m for name, m in enable.items() if path == name or path.endswith("." + name)), None)
        if mask is not None:
            used.update(name for name in enable if path == name or path.endswith("." + name))
        extras.replace_module(model, path, make_linear(base, mask))
    unused = sorted(set(enable) - used)
    if unused:
        raise ConfigError(f"peft.enable_lora: {unused[0]!r} names no layer adapted by peft.targets={cfg.targets!r}")
    return paths


def apply_lora_family(model: nn.Module, cfg, make_linear, make_embedding=None) -> None:
    """What every LoRA-family ``apply`` does: freeze, merge earlier adapters, wrap, extra modules."""
    freeze(model)
    extras.merge_adapters_first(model, cfg.merge_first)
    wrap_targets(model, cfg, make_linear, make_embedding)
    extras.add_additional_targets(model, cfg.additional_targets)
    if getattr(cfg, "freeze_a", False):
        for m in model.modules():
            if isinstance(getattr(m, "lora_A", None), nn.Linear) and hasattr(m, "base_layer"):
                m.lora_A.weight.requires_grad_(False)
            elif isinstance(m, LoRAEmbedding):
                m.lora_embedding_B.requires_grad_(False)


def apply(model: nn.Module, cfg: LoRAConfig) -> None:
    def linear(base, enable):
        return LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.init, enable=enable,
                          sparsity_dropout=cfg.sparsity_dropout, pissa_niter=cfg.pissa_niter)

    def embedding(base):
        return LoRAEmbedding(base, cfg.r, cfg.alpha, cfg.use_rslora)

    apply_lora_family(model, cfg, linear, embedding)


def merge(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (a quantised base is dequantised first) and put
    the plain layers back; extra trained modules replace the originals."""
    extras.merge_wrappers(model, WRAPPERS)


def on_train_start(model: nn.Module, cfg, total_steps: int) -> None:
    if cfg.init_from:
        from .. import registry

        extras.init_from_adapter(model, registry.get(cfg.method), cfg.init_from)


# ---------------------------------------------------------------------------- optimiser groups (LoRA+)


def param_groups(model: nn.Module, cfg, lr: float, weight_decay: float) -> list[dict]:
    """LoRA+: A and extra modules at lr, B (and vectors) at lr * ratio, embedding LoRA at its own lr."""
    from ..train.optim import default_param_groups

    if not cfg.loraplus_lr_ratio:
        return default_param_groups(model, lr, weight_decay)
    ratio = cfg.loraplus_lr_ratio
    a, b, b_no_decay, emb = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
            emb.append(p)
        elif "lora_B" in parts or p.ndim == 1:
            (b if p.ndim >= 2 else b_no_decay).append(p)
        else:
            a.append(p)
    groups = [
        {"params": a, "lr": lr, "weight_decay": weight_decay},
        {"params": b, "lr": lr * ratio, "weight_decay": weight_decay},
        {"params": b_no_decay, "lr": lr * ratio, "weight_decay": 0.0},
        {"params": emb, "lr": cfg.loraplus_lr_embedding, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


# ---------------------------------------------------------------------------- adapter files


def _principal(model: nn.Module) -> bool:
    return any(hasattr(m, "lora_A0") for m in model.modules())


def saved_config(cfg: LoRAConfig, model: nn.Module) -> LoRAConfig:
    """PiSSA/OLoRA adapters are saved as plain LoRA of rank 2r with the same scaling."""
    if cfg.init not in ("pissa", "olora") or not _principal(model):
        return cfg
    alpha = cfg.alpha * (math.sqrt(2) if cfg.use_rslora else 2)
    return dataclasses.replace(cfg, r=2 * cfg.r, alpha=alpha, init="kaiming", pissa_niter=0)


def to_peft_keys(state: dict) -> dict:
    """PEFT's file names; PiSSA/OLoRA factors become [A; A0] and [B, -B0] (a delta against W)."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".lora_A0")]:
        path = key[: -len(".lora_A0")]
        a0, b0 = out.pop(key), out.pop(f"{path}.lora_B0")
        out[f"{path}.lora_A.weight"] = torch.cat([state[f"{path}.lora_A.weight"], a0], dim=0)
        out[f"{path}.lora_B.weight"] = torch.cat([state[f"{path}.lora_B.weight"], -b0], dim=1)
    if any(k.endswith(".lora_A0") for k in state):  # embeddings keep their delta, padded to rank 2r
        for key in [k for k in out if k.endswith(".lora_embedding_A")]:
            out[key] = torch.cat([out[key], torch.zeros_like(out[key])], dim=0)
            bkey = key[: -len("A")] + "B"
            out[bkey] = torch.cat([out[bkey], torch.zeros_like(out[bkey])], dim=1)
    return extras.to_peft_keys(out)


def to_peft_config(cfg: LoRAConfig, model: nn.Module) -> dict:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, WRAPPERS) or hasattr(m, "lora_magnitude_vector")}
    found = list(layers)
    conv = any(isinstance(m.base_layer, Conv1D) or getattr(m.base_layer, "from_conv1d", False)
               for m in layers.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": peft_target_modules(model, cfg.targets, found),
        "fan_in_fan_out": conv,
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.method == "dora",
        "modules_to_save": extras.additional_targets_for_peft(cfg),
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
        "inference_mode": True,
    }


def from_peft_config(d: dict):
    """A PEFT LoRA adapter_config.json -> LoRAConfig (or DoRAConfig when ``use_dora``)."""
    unsupported = {
        "bias": lambda v: v not in (None, "none"),
        "rank_pattern": bool,
        "alpha_pattern": bool,
        "layers_to_transform": lambda v: v is not None,
        "lora_bias": bool,
        "trainable_token_indices": bool,
    }
    for key, bad in unsupported.items():
        if key in d and bad(d[key]):
            raise ConfigError(f"adapter_config.json has {key}={d[key]!r}, which peftlab's LoRA does not load")
    init = d.get("init_lora_weights", True)
    if isinstance(init, str) and init != "gaussian":
        raise ConfigError(
            f"adapter_config.json has init_lora_weights={init!r}: the adapter is a delta against PEFT's "
            "modified (residual) base, not the original model; save it from PEFT with "
            "path_initial_model_for_weight_conversion so it applies to the untouched base"
        )
    targets = d.get("target_modules")
    if targets is None:
        raise ConfigError("adapter_config.json has no target_modules")
    fields = dict(
        r=int(d["r"]),
        alpha=float(d.get("lora_alpha", d["r"])),
        dropout=float(d.get("lora_dropout", 0.0) or 0.0),
        targets=targets if isinstance(targets, str) else list(targets),
        use_rslora=bool(d.get("use_rslora", False)),
        init="gaussian" if d.get("init_lora_weights") == "gaussian" else "kaiming",
        additional_targets=list(d["modules_to_save"]) if d.get("modules_to_save") else None,
    )
    if d.get("use_dora"):
        from .dora import DoRAConfig

        return DoRAConfig(**fields)
    return LoRAConfig(**fields)


STATE_PREFIXES = (*LORA_TENSORS, extras.SAVE)

register(
    Method(
        name="lora",
        config_cls=LoRAConfig,
        apply=apply,
        merge=merge,
        peft_type="LORA",
        state_prefixes=STATE_PREFIXES,
        to_peft_config=to_peft_config,
        from_peft_config=from_peft_config,
        to_peft_keys=to_peft_keys,
        from_peft_keys=extras.make_from_peft_keys(LORA_TENSORS),
        param_groups=param_groups,
        on_train_start=on_train_start,
        saved_config=saved_config,
    )
)


def register_variant(name: str, config_cls: type, apply_fn, on_step, extra_fields: tuple[str, ...]) -> Method:
    """Register a LoRA training-procedure variant (ReLoRA, Delta-LoRA): LoRA's layers, optimiser
    groups and file layout, its own ``apply`` and ``on_step``, the base layers saved with the
    adapter (the variant changes them), ``peft_type`` = the upper-cased name plus ``extra_fields``."""
    peft_type = name.upper()

    def variant_peft_config(cfg, model: nn.Module) -> dict:
        out = to_peft_config(cfg, model)
        out.update(peft_type=peft_type, **{f: getattr(cfg, f) for f in extra_fields})
        return out

    own = (*LORA_TENSORS, "base_layer")
    return register(
        Method(
            name=name,
            config_cls=config_cls,
            apply=apply_fn,
            merge=merge,
            peft_type=peft_type,
            state_prefixes=(*own, extras.SAVE),
            to_peft_config=variant_peft_config,
            to_peft_keys=extras.to_peft_keys,
            from_peft_keys=extras.make_from_peft_keys(own),
            param_groups=param_groups,
            on_step=on_step,
            on_train_start=on_train_start,
        )
    )
