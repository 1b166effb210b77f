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
- Data-driven inits, from ``init_batches`` training batches read before the optimiser exists
  (``methods/lora_init.py``, ``lora_eva.py``): ``init=eva`` (A from the layer inputs' principal
  directions, ranks redistributed, knobs ``eva_rho``, ``eva_tau``), ``init=corda_ipm|corda_kpm``
  (CorDA: SVD of W times the input covariance), ``init=lora_ga`` (LoRA-GA: SVD of the gradient).
- LoftQ (Li et al. 2023, arXiv:2310.08659): ``init=loftq`` with ``model.quantize``: alternating
  quantise / rank-r SVD of the residual (``loftq_iter`` times) on the float W, before the base is quantised.
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

The layers (``LoRALinear``, ``LoRAEmbedding``) and what the LoRA family shares live in
``methods/lowrank.py``. Merging is explicit: ``LoRALinear.merge()`` adds s·BA into W,
``unmerge()`` subtracts it, and neither ``.eval()`` nor ``.train()`` touches it. ``merge(model)``
folds every LoRA layer into its base (dequantising a quantised base first) and puts plain layers back.
The adapter files in PEFT's layout, both ways, are ``methods/lora_files.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..model.params import default_param_groups
from ..model.targets import weight_matrix
from ..registry import Method, register
from . import lora_experts, lora_init, peft_format
from .lora_files import from_peft_config, saved_config, to_peft_config, to_peft_keys
from .lowrank import WRAPPERS, LoRAEmbedding, LoRALinear, apply_lora_family, merge_delta
from .merging import merge_wrappers

INITS = ("kaiming", "gaussian", "pissa", "olora", "eva", "corda_ipm", "corda_kpm", "lora_ga", "loftq")
LOFTQ_KINDS = {4: "nf4", 8: "int8"}
LORA_TENSORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


@dataclass
class LoRAConfig:
    default_lr = 5e-4  # train.lr when unset (not a key): benchmarks/recipes.py, docs/results.md §0; subclasses inherit
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"  # layer names, a regex, or all-linear; embeddings by name
    use_rslora: bool = False  # s = alpha / sqrt(r)
    init: str = "kaiming"  # kaiming | gaussian | pissa | olora | eva | corda_ipm | corda_kpm | lora_ga | loftq
    init_batches: int = 8  # eva / corda / lora_ga: training batches the init reads before training
    eva_rho: float = 2.0  # EVA: a layer's rank may grow to rho * r (1 = no redistribution)
    eva_tau: float = 0.99  # EVA: a component has converged at this cosine similarity between batches
    loftq_iter: int = 1  # LoftQ: alternating quantise / SVD iterations
    loftq_bits: int = 4  # LoftQ: the base's quantisation, 4 (model.quantize=nf4) or 8 (int8)
    rank_pattern: dict = field(default_factory=dict)  # layer path (suffix regex) -> rank (EVA's result, PEFT's)
    alpha_pattern: dict = field(default_factory=dict)  # layer path (suffix regex) -> alpha
    pissa_niter: int = 0  # PiSSA: 0 exact SVD; N >= 1 randomised SVD with N subspace iterations
    freeze_a: bool = False  # LoRA-FA: A frozen at init, only B trains
    loraplus_lr_ratio: float | None = None  # LoRA+: lr(B) = ratio * lr(A)
    loraplus_lr_embedding: float = 1e-6  # LoRA+: lr of LoRA on embeddings
    sparsity_dropout: float = 0.0  # drop rows of B and columns of A with this probability (training)
    enable_lora: dict = field(default_factory=dict)  # fused layer -> slice mask, e.g. {c_attn: [true, false, true]}
    additional_targets: list[str] | None = None  # modules trained in full and saved (PEFT modules_to_save)
    target_parameters: list[str] | None = None  # fused MoE expert tensors, e.g. [mlp.experts.gate_up_proj]
    init_from: str | None = None  # start training from this adapter's tensors
    merge_first: list[str] | None = None  # merge these adapters into the base, then train a fresh one

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"peft.r must be >= 1, got {self.r}")
        check_alpha(self.alpha)
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
        if self.target_parameters is not None:
            if not isinstance(self.target_parameters, list) or not all(isinstance(t, str) and t
                                                                        for t in self.target_parameters):
                raise ConfigError("peft.target_parameters must be a list of parameter names, e.g. "
                                  f"[mlp.experts.gate_up_proj, mlp.experts.down_proj]; got {self.target_parameters!r}")
            if self.method != "lora" or self.init not in ("kaiming", "gaussian") or self.dropout:
                raise ConfigError("peft.target_parameters (LoRA on fused expert tensors) works with plain LoRA, "
                                  "init kaiming or gaussian and dropout 0 (dropout cannot be factored out of W + ΔW); "
                                  f"got method={self.method}, init={self.init}, dropout={self.dropout}")
        if self.enable_lora and self.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"peft.init={self.init} initialises whole layers; it cannot combine with peft.enable_lora")
        if self.init in (*lora_init.DATA_INITS, "loftq") and (self.method != "lora" or self.target_parameters):
            raise ConfigError(f"peft.init={self.init} is plain LoRA's (peft.method=lora, no target_parameters); "
                              f"got method={self.method}")
        if self.init in lora_init.DATA_INITS and self.init_batches < 1:
            raise ConfigError(f"peft.init={self.init} reads training batches first: peft.init_batches must be >= 1, "
                              f"got {self.init_batches}")
        if self.eva_rho < 1.0 or not 0.0 <= self.eva_tau <= 1.0:
            raise ConfigError(f"peft.eva_rho must be >= 1 and peft.eva_tau in [0, 1]; got {self.eva_rho}, {self.eva_tau}")
        if self.loftq_iter < 1 or self.loftq_bits not in LOFTQ_KINDS:
            raise ConfigError(f"peft.loftq_iter must be >= 1 and peft.loftq_bits 4 or 8; got {self.loftq_iter}, "
                              f"{self.loftq_bits}")


def check_alpha(alpha: float) -> None:
    """The LoRA family's ``peft.alpha``: the update is scaled by alpha / r, so 0 switches it off and a
    negative value flips its sign; both are almost surely a mistake."""
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"peft.alpha must be > 0 (the update is scaled by alpha / r), got {alpha}; "
                          "the usual choice is alpha = 2 * r")


@torch.no_grad()
def principal_init(layer: nn.Module, init: str, niter: int = 0) -> None:
    """PiSSA / OLoRA: factors from the top-r SVD / QR of W; W_res = W - s B A becomes the base
    (``lora_init.set_residual`` keeps the initial factors as buffers A0 / B0 for saving)."""
    if layer.lora_A.weight.is_meta:
        return
    r = layer.r
    w = weight_matrix(layer.base_layer).float()  # [out, in]
    if init == "pissa":
        if niter:
            u, sv, v = torch.svd_lowrank(w, q=r, niter=niter)
            vh = v.T
        else:
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(sv[:r] / layer.scaling)
        lora_init.set_residual(layer, root[:, None] * vh[:r], u[:, :r] * root[None, :])
    else:  # olora
        q, rr = torch.linalg.qr(w)
        lora_init.set_residual(layer, rr[:r].contiguous(), q[:, :r].contiguous())


def apply(model: nn.Module, cfg: LoRAConfig) -> None:
    def linear(base, enable):
        layer = LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.init, enable=enable,
                           sparsity_dropout=cfg.sparsity_dropout)
        if cfg.init in ("pissa", "olora"):
            principal_init(layer, cfg.init, cfg.pissa_niter)
        elif cfg.init == "loftq":
            lora_init.loftq_init(layer, LOFTQ_KINDS[cfg.loftq_bits], cfg.loftq_iter)
        return layer

    def embedding(base):
        return LoRAEmbedding(base, cfg.r, cfg.alpha, cfg.use_rslora)

    apply_lora_family(model, cfg, linear, embedding)
    lora_init.apply_patterns(model, cfg)
    if cfg.target_parameters:
        lora_experts.apply(model, list(cfg.target_parameters), cfg.r, cfg.alpha, cfg.use_rslora)


def merge(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (a quantised base is dequantised first) and put
    the plain layers back; extra trained modules replace the originals."""
    lora_experts.merge(model)
    merge_wrappers(model, WRAPPERS, merge_delta)


def set_speed(model: nn.Module, fast_path: bool, cache_weight: bool) -> None:
    """``train.fast_lora`` / ``train.compile`` / FSDP: whether each LoRA layer may take the fused
    function of ``lora_kernels`` and whether that function may cache the cast frozen weight."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.fast_path = fast_path
            m.cache_weight = cache_weight


# ---------------------------------------------------------------------------- optimiser groups (LoRA+)


def param_groups(model: nn.Module, cfg, lr: float, weight_decay: float) -> list[dict]:
    """LoRA+: A and extra modules at lr, B (and vectors) at lr * ratio, embedding LoRA at its own lr."""
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


register(
    peft_format.family_method(
        "lora", LoRAConfig, apply, LORA_TENSORS,
        merge=merge,
        peft_type="LORA",
        to_peft_config=to_peft_config,
        from_peft_config=from_peft_config,
        to_peft_keys=to_peft_keys,
        param_groups=param_groups,
        saved_config=saved_config,
        set_speed=set_speed,
        edits_base=lambda cfg: cfg.init in (*lora_init.RESIDUAL_INITS, "loftq"),  # the base keeps W - s·B0A0 / Q
        init_batches=lambda cfg: cfg.init_batches if cfg.init in lora_init.DATA_INITS else 0,
        init_from_data=lora_init.init_from_data,
        float_base=lambda cfg: LOFTQ_KINDS[cfg.loftq_bits] if cfg.init == "loftq" else None,
    )
)


def register_variant(name: str, config_cls: type, apply_fn, on_step, extra_fields: tuple[str, ...],
                     on_train_start=None) -> Method:
    """Register a LoRA training-procedure variant (ReLoRA, Delta-LoRA, Chain of LoRA, PeriodicLoRA):
    LoRA's layers, optimiser groups and file layout, its own ``apply``, ``on_step`` (and
    ``on_train_start``), the base layers saved with the adapter (the variant changes them),
    ``peft_type`` = the upper-cased name plus ``extra_fields``."""
    peft_type = name.upper()

    def variant_peft_config(cfg, model: nn.Module) -> dict:
        out = to_peft_config(cfg, model)
        out.update(peft_type=peft_type, **{f: getattr(cfg, f) for f in extra_fields})
        return out

    return register(
        peft_format.family_method(
            name, config_cls, apply_fn, (*LORA_TENSORS, "base_layer"),
            merge=merge,
            peft_type=peft_type,
            to_peft_config=variant_peft_config,
            param_groups=param_groups,
            on_step=on_step,
            on_train_start=on_train_start,
            set_speed=set_speed,
            edits_base=lambda cfg: True,  # ReLoRA merges into the base, Delta-LoRA updates it
        )
    )

