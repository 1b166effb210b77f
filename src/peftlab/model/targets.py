"""Which modules a method adapts: exact names, a regex, or ``all-linear``.

``peft.targets`` accepts
- ``all-linear``: every ``nn.Linear`` / GPT-2 ``Conv1D`` except the LM head (and except the
  embeddings' tied output); the head is adapted only when named explicitly;
- a list of names (or one comma-separated string) such as ``[q_proj, v_proj]`` or
  ``c_attn,c_proj``: a module matches when its dotted path equals the name or ends with
  ``.name`` (PEFT's rule, so ``c_proj`` matches both GPT-2 c_proj layers);
- a regex string (it contains one of ``\\ * + ? [ ( | ^ $``) that must match the whole dotted path.

A pattern that matches nothing is an error that lists the candidate layer names.

A quantised base layer (``peftlab.quant.QuantLinear``, bitsandbytes' 4/8-bit linears) counts as a
linear layer; ``weight_matrix`` / ``set_weight_matrix`` read and write any of them as a float
[out, in] matrix (dequantising / requantising where needed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from ..quant.layers import QuantLinear

LINEAR_TYPES = (nn.Linear, Conv1D, QuantLinear)
_REGEX_CHARS = set("\\*+?[(|^$")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D (whose weight is [in, out])."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as [out, in] (a view for Linear/Conv1D; dequantised, fp32, for
    quantised layers). Callers must not modify it in place; use ``set_weight_matrix``."""
    if isinstance(module, QuantLinear):
        return module.dequantize(torch.float32)
    kind = type(module).__name__
    if kind == "Linear4bit":  # bitsandbytes (CUDA)
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if kind == "Linear8bitLt":
        w = module.weight
        return w.CB.float() * (w.SCB.float()[:, None] / 127.0)
    if isinstance(module, Conv1D):
        return module.weight.T
    return module.weight


@torch.no_grad()
def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Write a float [out, in] weight into a linear layer (requantising a quantised one: lossy)."""
    if isinstance(module, QuantLinear):
        module.quantize_(w.to(module.device))
        return
    kind = type(module).__name__
    if kind in ("Linear4bit", "Linear8bitLt"):
        import bitsandbytes as bnb

        dev = module.weight.device
        if kind == "Linear4bit":
            module.weight = bnb.nn.Params4bit(w.float().cpu().to(module.compute_dtype or torch.float16),
                                              requires_grad=False, quant_type="nf4", compress_statistics=True,
                                              blocksize=64).to(dev)
        else:
            module.weight = bnb.nn.Int8Params(w.cpu().to(torch.float16), requires_grad=False,
                                              has_fp16_weights=False).to(dev)
        return
    target = module.weight.T if isinstance(module, Conv1D) else module.weight
    target.copy_(w.to(target.dtype))


def layer_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """(dtype the layer computes in, device) for float and quantised linear layers alike."""
    if isinstance(module, QuantLinear):
        return module.dtype, module.device
    if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
        return getattr(module, "compute_dtype", None) or torch.float16, module.weight.device
    return module.weight.dtype, module.weight.device


def output_head_names(model: nn.Module) -> set[str]:
    """Dotted names of the LM head (never adapted by ``all-linear``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def candidate_names(model: nn.Module, kinds: tuple[type, ...] = LINEAR_TYPES) -> list[str]:
    """Leaf names of modules of the given kinds, de-duplicated, for error messages."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            seen.setdefault(name.split(".")[-1], None)
    return list(seen)


def _as_patterns(targets: str | Iterable[str]) -> tuple[str, list[str]]:
    """Classify targets into ('all-linear'|'regex'|'names', items)."""
    if isinstance(targets, str):
        text = targets.strip()
        if text == "all-linear":
            return "all-linear", []
        if any(c in _REGEX_CHARS for c in text):
            return "regex", [text]
        return "names", [t.strip() for t in text.split(",") if t.strip()]
    items = [str(t).strip() for t in targets]
    if items == ["all-linear"]:
        return "all-linear", []
    return "names", items


def name_matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def find_targets(
    model: nn.Module,
    targets: str | list[str],
    kinds: tuple[type, ...] = LINEAR_TYPES,
    what: str = "peft.targets",
) -> list[str]:
    """Dotted paths of the modules of ``kinds`` selected by ``targets``, in model order."""
    mode, items = _as_patterns(targets)
    if mode == "names" and not items:
        raise ConfigError(f"{what} is empty; give layer names, a regex, or all-linear")
    modules = [(n, m) for n, m in model.named_modules() if n and isinstance(m, kinds)]
    heads = output_head_names(model)
    if mode == "all-linear":
        found = [n for n, m in modules if n not in heads and is_linear(m)]
        if not found:
            raise ConfigError(f"{what}=all-linear found no linear layers in {type(model).__name__}")
        return found
    if mode == "regex":
        try:
            rx = re.compile(items[0])
        except re.error as e:
            raise ConfigError(f"{what}: {items[0]!r} is not a valid regex ({e})") from None
        found = [n for n, _ in modules if rx.fullmatch(n)]
        if not found:
            raise ConfigError(
                f"{what}: regex {items[0]!r} matches no layer (it must match the whole dotted path, "
                f"e.g. {modules[0][0] if modules else '...'}); candidate layers: "
                f"{', '.join(candidate_names(model, kinds))}"
            )
        return found
    found = []
    for item in items:
        hits = [n for n, _ in modules if name_matches(n, item)]
        if not hits:
            all_names = [n for n, _ in model.named_modules() if n and name_matches(n, item)]
            extra = (
                f" ({item!r} exists but is a {type(model.get_submodule(all_names[0])).__name__}, "
                "not a layer this method adapts)"
                if all_names
                else ""
            )
            raise ConfigError(
                f"{what}: {item!r} matches no layer{extra}; candidate layers: "
                f"{', '.join(candidate_names(model, kinds))}"
            )
        found.extend(h for h in hits if h not in found)
    order = {n: i for i, (n, _) in enumerate(modules)}
    return sorted(found, key=order.__getitem__)


def peft_target_modules(model: nn.Module, targets: str | list[str], found: list[str]) -> list[str] | str:
    """What to write as PEFT's ``target_modules`` so PEFT (and vLLM) select exactly ``found``.

    The leaf names when they select the same set under PEFT's suffix rule (the portable form
    vLLM expects); otherwise a regex that matches exactly the adapted paths.
    """
    leaves = sorted({n.split(".")[-1] for n in found})
    kinds = tuple({type(model.get_submodule(n)) for n in found})
    by_leaves = [n for n, m in model.named_modules() if n and isinstance(m, kinds) and n.split(".")[-1] in leaves]
    if sorted(by_leaves) == sorted(found):
        return leaves
    return "|".join(re.escape(n) for n in found)


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path``, in the train/eval mode of the module it replaces (a wrapper built
    in an eval-mode model must not run its dropout)."""
    new.train(model.get_submodule(path).training)
    set_submodule(model, path, new)
