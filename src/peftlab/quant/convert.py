"""A quantised frozen base (``model.quantize``): QLoRA's NF4 and an 8-bit row-wise absmax base.

    model.quantize=nf4    every linear layer but the LM head -> 4-bit NF4, blocks of 64, scales
                          double-quantised (8-bit, blocks of 256): 4.127 bits per weight
    model.quantize=int8   every linear layer but the LM head -> int8 with one fp32 scale per row

On CPU (and on CUDA without bitsandbytes) the layers are peftlab's own ``QuantLinear``, pure
PyTorch, dequantising on the fly in forward and backward. On CUDA with ``bitsandbytes``
installed they are bitsandbytes' ``Linear4bit`` (nf4, double quant, blocks of 64) and
``Linear8bitLt`` (threshold 0: plain row-wise absmax) — same formats, fused kernels.

Every LoRA-family method wraps these layers like any linear layer (QLoRA = ``model.quantize=nf4
peft.method=lora``). Merging folds the adapter into the *dequantised* base (the base the adapter
was trained against) and gives back plain layers in the dtype the base was loaded in.
"""

from __future__ import annotations

import ctypes
import importlib.util

import torch
from torch import nn

from ..errors import ConfigError
from .layers import KINDS, QuantLinear

__all__ = ["KINDS", "QuantLinear", "dequantize_model", "is_quantized", "quantize_model", "resident_memory",
           "tensor_bytes"]


def _bnb_wanted(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None


def _bnb_layer(layer: nn.Module, kind: str) -> nn.Module:
    """bitsandbytes' equivalent of ``QuantLinear.from_float`` (CUDA only)."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    w = layer.weight.detach()
    w = (w.T if isinstance(layer, Conv1D) else w).contiguous()
    out_f, in_f = w.shape
    device, dtype = w.device, w.dtype
    has_bias = layer.bias is not None
    if kind == "nf4":
        new = bnb.nn.Linear4bit(in_f, out_f, bias=has_bias, compute_dtype=dtype, compress_statistics=True,
                                quant_type="nf4")
        new.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                                       blocksize=64)
    else:
        new = bnb.nn.Linear8bitLt(in_f, out_f, bias=has_bias, has_fp16_weights=False, threshold=0.0)
        new.weight = bnb.nn.Int8Params(w.cpu().to(torch.float16), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        new.bias = nn.Parameter(layer.bias.detach().cpu().to(dtype), requires_grad=False)
    return new.to(device)  # moving to the GPU is what quantises in bitsandbytes


def _linear_paths(model: nn.Module) -> list[str]:
    from ..model.targets import LINEAR_TYPES, output_head_names

    heads = output_head_names(model)
    # an adapter's own layers (the siblings of a wrapper's ``base_layer``: LoRA's A and B, when the
    # base is quantised after a method was applied, as LoftQ's load order does) stay in float
    wrapped = {n for n, m in model.named_modules() if n and hasattr(m, "base_layer")}
    own = {n for n, _ in model.named_modules() if n.rpartition(".")[0] in wrapped and not n.endswith(".base_layer")}
    return [n for n, m in model.named_modules() if n and isinstance(m, LINEAR_TYPES) and n not in heads
            and not isinstance(m, QuantLinear) and not any(n == o or n.startswith(o + ".") for o in own)]


def quantize_model(model: nn.Module, kind: str | None) -> nn.Module:
    """Replace every linear layer except the LM head by a frozen quantised one, in place."""
    if kind is None or str(kind).lower() == "none":
        return model
    kind = str(kind).lower()
    if kind not in KINDS:
        raise ConfigError(f"model.quantize {kind!r} is not one of nf4, int8, none")
    from ..model.targets import set_submodule

    paths = _linear_paths(model)
    if not paths and model_is_quantized(model):
        return model  # a method quantised every layer itself (LoftQ over all-linear)
    if not paths:
        raise ConfigError(f"model.quantize={kind}: {type(model).__name__} has no linear layers to quantise")
    for path in paths:
        layer = model.get_submodule(path)
        if layer.weight.is_meta:
            return model  # shapes only (parameter counting): counts are those of the float model
        use_bnb = _bnb_wanted(layer.weight.device)
        new = _bnb_layer(layer, kind) if use_bnb else QuantLinear.from_float(layer, kind)
        set_submodule(model, path, new)
        del layer
    release_memory()
    return model


def is_quantized(module: nn.Module) -> bool:
    """True for a quantised linear layer (peftlab's or bitsandbytes')."""
    return isinstance(module, QuantLinear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def model_is_quantized(model: nn.Module) -> str | None:
    """The quantisation kind of a model's base, or None."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            return m.kind
        if type(m).__name__ == "Linear4bit":
            return "nf4"
        if type(m).__name__ == "Linear8bitLt":
            return "int8"
    return None


def dequantize_layer(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain float layer equal to the quantised ``layer``'s dequantised weight."""
    if isinstance(layer, QuantLinear):
        return layer.to_float(dtype)
    from ..model.targets import weight_matrix

    w = weight_matrix(layer)
    dtype = dtype or getattr(layer, "compute_dtype", None) or torch.float16
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    out.requires_grad_(False)
    return out


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantised layer by a plain one (dequantised, in its original dtype), in place."""
    from ..model.targets import set_submodule

    for path in [n for n, m in model.named_modules() if n and is_quantized(m)]:
        set_submodule(model, path, dequantize_layer(model.get_submodule(path), dtype))
    return model


def tensor_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by the model's parameters and buffers (each tensor once), by storage dtype."""
    seen, out = set(), {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        key = str(t.dtype).replace("torch.", "")
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    out["total"] = sum(out.values())
    return out


def release_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise, inflating RSS)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_memory() -> int:
    """This process's resident set size in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
