"""LoRA initialisations that need data or a quantiser: EVA, CorDA, LoRA-GA (from training batches,
before the optimiser exists) and LoftQ (from the float weights, before the base is quantised).

The training loop reads ``peft.init_batches`` batches from the start of the training data's seeded
order and calls ``init_from_data`` (``registry.Method.init_from_data``) after ``apply`` and before
the optimiser; on resume it passes the checkpoint's tensors instead and nothing is recomputed.

CorDA (Yang et al. 2024, arXiv:2406.05223), ``init=corda_ipm`` / ``corda_kpm``:
    C = mean over examples of X^T X / max(X)^2    X [tokens, in]: one example's inputs to the layer
    C' = C + d mean(diag C) I  (d = 0.01, doubled until ||C' C'^-1 - I|| < 0.05)
    W C' = U S Vh,   V = (Vh C'^-1)^T
    ipm (instruction-previewed): the r largest triplets; kpm (knowledge-preserved): the r smallest
    A = sqrt(S_r / s) V_r^T,  B = U_r sqrt(S_r / s),  W_res = W - s B A   (W_res + s B A = W)
LoRA-GA (Wang et al. 2024, arXiv:2407.05000), ``init=lora_ga``:
    G = mean over the init batches of dL/dW  (the batch-mean token loss; adapters off, train mode)
    G ≈ U S V^T  (torch.svd_lowrank: min(4r, in, out) columns, 4 iterations, seed 0)
    A = V^T[:r],  B = U[:, r:2r] S[r:2r] · out^(1/4) / sqrt(16),  W_res = W - s B A
    (PEFT's defaults: direction ArB2r, scale "stable", gamma 16)
LoftQ (Li et al. 2023, arXiv:2310.08659), ``init=loftq``: with q the base's quantiser
(``model.quantize``, peftlab's own NF4 / int8) and s B_0 A_0 = 0, for t = 1..T (``loftq_iter``):
    Q_t = q(W - s B_{t-1} A_{t-1}),   W - Q_t = U S V^T,   A_t = sqrt(S_r / s) V_r^T,  B_t = U_r sqrt(S_r / s)
    the base becomes Q_T: Q_T + s B_T A_T is closer to W than q(W) alone.
    (PEFT's loftq_init leaves out 1/s: the same factors when alpha = r.)

CorDA and LoRA-GA change W, so like PiSSA they keep A0/B0 buffers and are saved as a rank-2r LoRA
against the untouched W (``lora_files.to_peft_keys``). EVA changes ranks per layer (saved as PEFT's
``rank_pattern`` / ``alpha_pattern``; layers with rank 0 lose their adapter).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import ConfigError
from ..model.targets import replace_module, set_weight_matrix, weight_matrix
from ..quant.convert import is_quantized
from ..quant.layers import QuantLinear
from . import lora_eva
from .base_only import adapters_off
from .lowrank import LoRALinear

DATA_INITS = ("eva", "corda_ipm", "corda_kpm", "lora_ga")
RESIDUAL_INITS = ("pissa", "olora", "corda_ipm", "corda_kpm", "lora_ga")  # W becomes W - s B0 A0
LORA_GA_GAMMA = 16


def linear_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def set_residual(layer: LoRALinear, a: torch.Tensor, b: torch.Tensor) -> None:
    """A <- a [r, in], B <- b [out, r]; W <- W - s b a (fp32); a, b kept as buffers A0 / B0."""
    w = weight_matrix(layer.base_layer).float()
    layer.lora_A.weight.copy_(a)
    layer.lora_B.weight.copy_(b)
    a, b = layer.lora_A.weight.detach().float(), layer.lora_B.weight.detach().float()
    set_weight_matrix(layer.base_layer, w - layer.scaling * (b @ a))
    layer.register_buffer("lora_A0", layer.lora_A.weight.detach().clone())
    layer.register_buffer("lora_B0", layer.lora_B.weight.detach().clone())


def resize(model: nn.Module, path: str, r: int, alpha: float, cfg) -> None:
    """Give the LoRA layer at ``path`` rank ``r`` and ``alpha`` (fresh factors); r = 0 removes it."""
    old = model.get_submodule(path)
    if r == 0:
        replace_module(model, path, old.base_layer)
        return
    new = LoRALinear(old.base_layer, r, alpha, cfg.dropout, cfg.use_rslora, cfg.init
                     if cfg.init == "gaussian" else "kaiming", sparsity_dropout=cfg.sparsity_dropout)
    new.lora_A.weight.requires_grad_(not cfg.freeze_a)
    replace_module(model, path, new)


def pattern_value(pattern: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of ``path``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def apply_patterns(model: nn.Module, cfg) -> None:
    """``peft.rank_pattern`` / ``peft.alpha_pattern``: per-layer ranks and alphas (EVA's, PEFT's)."""
    if not (cfg.rank_pattern or cfg.alpha_pattern):
        return
    for path, layer in linear_layers(model).items():
        r = int(pattern_value(cfg.rank_pattern, path, cfg.r))
        alpha = float(pattern_value(cfg.alpha_pattern, path, cfg.alpha))
        if (r, alpha) != (layer.r, layer.alpha):
            resize(model, path, r, alpha, cfg)


def saved_patterns(model: nn.Module, cfg) -> tuple[dict, dict]:
    """(rank_pattern, alpha_pattern) of the layers whose rank or alpha differ from the config's."""
    layers = linear_layers(model)
    return ({p: m.r for p, m in layers.items() if m.r != cfg.r},
            {p: m.alpha for p, m in layers.items() if m.alpha != cfg.alpha})


# ---------------------------------------------------------------------------- the loop's hook


def init_from_data(model: nn.Module, cfg, batches: list[dict] | None, saved: dict | None) -> None:
    """Initialise the applied LoRA layers from ``batches`` (EVA, CorDA, LoRA-GA), or, on resume,
    rebuild from the checkpoint's tensors ``saved`` what the init changed besides A and B: EVA's
    ranks, and the base residual W - s B0 A0 (computed as at init, so bit-identical)."""
    layers = linear_layers(model)
    if saved is not None:
        for path, layer in layers.items():
            a = saved.get(f"{path}.lora_A.weight")
            if a is None or a.shape[0] != layer.r:
                r = 0 if a is None else a.shape[0]
                resize(model, path, r, cfg.alpha * r / cfg.r, cfg)
            if f"{path}.lora_A0" in saved:
                set_residual(model.get_submodule(path), saved[f"{path}.lora_A0"], saved[f"{path}.lora_B0"])
        return
    if not batches:
        raise ConfigError(f"peft.init={cfg.init} needs training batches (peft.init_batches >= 1)")
    if cfg.init == "eva":
        with adapters_off(model):
            found = lora_eva.eva_components(model, {p: m.base_layer for p, m in layers.items()}, batches,
                                            cfg.r, cfg.eva_rho, cfg.eva_tau)
        for path, a in found.items():
            if a.shape[0] != cfg.r:
                resize(model, path, a.shape[0], cfg.alpha * a.shape[0] / cfg.r, cfg)
            if a.shape[0]:
                layer = model.get_submodule(path)
                with torch.no_grad():
                    layer.lora_A.weight.copy_(a)
                    layer.lora_B.weight.zero_()
        return
    for path, layer in layers.items():
        if is_quantized(layer.base_layer):
            raise ConfigError(f"peft.init={cfg.init} changes the base weight and needs it in float ({path} is "
                              "quantised); leave model.quantize unset, or use init=loftq / eva with a quantised base")
    if cfg.init.startswith("corda"):
        corda_init(model, layers, batches, cfg.init.split("_")[1])
    else:
        lora_ga_init(model, layers, batches)


def _device_batches(model: nn.Module, batches: list[dict], keys=("input_ids", "attention_mask", "labels")):
    device = next(model.parameters()).device
    return [{k: v.to(device) for k, v in b.items() if k in keys} for b in batches]


# ---------------------------------------------------------------------------- CorDA


@torch.no_grad()
def corda_init(model: nn.Module, layers: dict[str, LoRALinear], batches: list[dict], mode: str) -> None:
    """Covariances of each layer's inputs, one example (row, padding left out) at a time."""
    cov = {p: 0.0 for p in layers}
    count = dict.fromkeys(layers, 0)
    current = {}

    def hook(path):
        def fn(mod, args, out):
            x, mask = args[0].detach(), current["mask"]
            for row in range(x.shape[0]):
                xi = x[row][mask[row]].float()
                xi = xi / torch.max(xi).abs()
                cov[path] = cov[path] + xi.T @ xi
                count[path] += 1
        return fn

    was_training = model.training
    model.eval()
    with adapters_off(model):
        handles = [layers[p].base_layer.register_forward_hook(hook(p)) for p in layers]
        for b in _device_batches(model, batches):
            current["mask"] = b["attention_mask"].bool()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        for h in handles:
            h.remove()
    model.train(was_training)
    for path, layer in layers.items():
        a, b = corda_factors(weight_matrix(layer.base_layer).float(), cov[path] / count[path], layer.r,
                             layer.scaling, mode)
        set_residual(layer, a, b)


def corda_factors(w: torch.Tensor, c: torch.Tensor, r: int, s: float, mode: str):
    """(A [r, in], B [out, r]) from W [out, in] and the input covariance C [in, in]."""
    eye = torch.eye(c.shape[0], device=c.device)
    damp = 0.01
    while True:
        fixed = c + eye * torch.mean(torch.diag(c)) * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
    u, sv, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    v = (vh @ inv).T
    keep = slice(0, r) if mode == "ipm" else slice(-r, None)
    u, sv, v = u[:, keep], sv[keep] / s, v[:, keep]
    return v.T * sv.sqrt()[:, None], u * sv.sqrt()[None, :]


# ---------------------------------------------------------------------------- LoRA-GA


def lora_ga_init(model: nn.Module, layers: dict[str, LoRALinear], batches: list[dict]) -> None:
    """The mean gradient of each target weight over the batches, then its SVD's factors."""
    weights = {p: m.base_layer.weight for p, m in layers.items()}
    keep = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.train()
    with adapters_off(model):
        model.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        with torch.enable_grad():
            for b in _device_batches(model, batches):
                model(**b).loss.backward()
    grads = {p: w.grad.detach() / len(batches) for p, w in weights.items()}
    for w in weights.values():
        w.grad = None
    for n, p in model.named_parameters():
        p.requires_grad_(keep.get(n, p.requires_grad))
    model.train(was_training)
    for path, layer in layers.items():
        g = grads[path].T if layer.fan_in_fan_out else grads[path]
        set_residual(layer, *lora_ga_factors(g.float(), layer.r))


@torch.no_grad()
def lora_ga_factors(g: torch.Tensor, r: int):
    """(A [r, in], B [out, r]) from the gradient G [out, in]."""
    with torch.random.fork_rng(devices=[g.device] if g.is_cuda else []):
        torch.manual_seed(0)
        u, sv, v = torch.svd_lowrank(g, q=min(4 * r, min(g.shape)), niter=4)
    a = v.T[:r]
    b = u[:, r:2 * r] * sv[r:2 * r][None, :] * (g.shape[0] ** 0.25 / LORA_GA_GAMMA ** 0.5)
    return a, b


# ---------------------------------------------------------------------------- LoftQ


@torch.no_grad()
def loftq_init(layer: LoRALinear, kind: str, iters: int) -> list[float]:
    """Alternate quantise / rank-r SVD of the residual on the float base; the base becomes the
    quantised Q_T. Returns ||W - (Q_t + s B_t A_t)||_F for t = 1..T."""
    base = layer.base_layer
    if is_quantized(base):
        raise ConfigError("peft.init=loftq needs the float weights, but the base is already quantised; "
                          "the training loop loads them unquantised for it (set model.quantize and peft.init=loftq)")
    w = weight_matrix(base).float()
    quant = QuantLinear.from_float(base, kind)  # Q_1 = q(W)
    a, b, errors, s, r = None, None, [], layer.scaling, layer.r
    for t in range(iters):
        if t:
            quant.quantize_((w - s * (b @ a)).to(quant.dtype))
        q = quant.dequantize(torch.float32)
        u, sv, vh = torch.linalg.svd(w - q, full_matrices=False)
        root = torch.sqrt(sv[:r] / s)
        a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
        errors.append(float(torch.linalg.norm(w - q - s * (b @ a))))
    layer.lora_A.weight.copy_(a)
    layer.lora_B.weight.copy_(b)
    layer.base_layer = quant
    return errors
