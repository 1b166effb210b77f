"""LoRA on parameters that are not ``nn.Linear`` weights: mixture-of-experts models whose experts are
fused 3-D tensors (Mixtral, Qwen-MoE, OLMoE, ... in transformers 5: ``mlp.experts.gate_up_proj``
[E, out, in], ``mlp.experts.down_proj`` [E, out, in]). ``peft.target_parameters`` names them, as
Hugging Face PEFT's ``target_parameters`` does, and each expert e gets its own rank-r update:

    W'[e] = W[e] + s · B_e A_e,      A_e [r, in],  B_e [out, r],  s = alpha / r (rsLoRA: alpha / sqrt r)

Trainable parameters per targeted tensor: E · r · (in + out). B starts at zero, so the model is
unchanged at init; ``merge`` adds s·B_e A_e into W[e] and removes the wrapper.

The factors are stored exactly as PEFT stores them, so files move both ways by name alone:
``lora_A.weight`` [E·r, in] with expert e's rows at e·r ... e·r + r - 1, and ``lora_B.weight``
[out, r·E] whose columns interleave the experts (column j·E + e is expert e's j-th), i.e.
B.view(out, r, E)[..., e] = B_e. Several tensors of one module nest like PEFT's wrappers: the first
targeted tensor (in the module's own parameter order) is wrapped innermost, so its factors sit under
``experts.base_layer.`` and the last one's under ``experts.``.

The forward pass runs the original experts module with W + ΔW substituted for its tensors
(``torch.func.functional_call``), so the model's own routing code is used unchanged and gradients
reach A and B through ΔW.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..model.targets import set_submodule
from .lowrank import lora_scaling


class ParamLoRA(nn.Module):
    """LoRA on one 3-D (or 2-D) parameter ``param`` of the module at the bottom of ``base_layer``."""

    def __init__(self, base_layer: nn.Module, param: str, r: int, alpha: float, use_rslora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.param = param
        if getattr(self.experts, "is_transposed", False):
            raise ConfigError(f"peft.target_parameters: {type(self.experts).__name__} stores its experts [E, in, out] "
                              "(is_transposed); LoRA on parameters supports the [E, out, in] layout")
        w = getattr(self.experts, param)
        if w.dim() == 2:
            w = w.unsqueeze(0)
        if w.dim() != 3:
            raise ConfigError(f"peft.target_parameters: {param!r} has {w.dim()} dimensions; LoRA on a parameter "
                              "needs a [experts, out, in] (or [out, in]) tensor")
        self.num_experts, self.out_features, self.in_features = w.shape
        if not 1 <= r <= min(self.in_features, self.out_features):
            raise ConfigError(f"peft.r={r} does not fit {param!r} of shape {tuple(w.shape)}")
        self.r, self.alpha = r, alpha
        self.scaling = lora_scaling(alpha, r, use_rslora)
        dtype = torch.float32 if not w.dtype.is_floating_point or w.element_size() < 4 else w.dtype
        self.lora_A = nn.Linear(self.in_features, r * self.num_experts, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(r * self.num_experts, self.out_features, bias=False, device=w.device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def experts(self) -> nn.Module:
        m = self.base_layer
        while isinstance(m, ParamLoRA):
            m = m.base_layer
        return m

    def delta(self) -> torch.Tensor:
        """s · B_e A_e for every expert: [E, out, in] (squeezed to [out, in] for a 2-D parameter)."""
        a = self.lora_A.weight.view(self.num_experts, self.r, self.in_features)
        b = self.lora_B.weight.view(self.out_features, self.r, self.num_experts).permute(2, 0, 1)
        d = torch.bmm(b, a) * self.scaling
        return d if getattr(self.experts, self.param).dim() == 3 else d[0]

    def levels(self) -> list[ParamLoRA]:
        out, m = [], self
        while isinstance(m, ParamLoRA):
            out.append(m)
            m = m.base_layer
        return out

    def forward(self, *args, **kwargs):
        experts = self.experts
        swapped = {}
        for level in self.levels():
            w = getattr(experts, level.param)
            swapped[level.param] = w + level.delta().to(w.dtype)
        return torch.func.functional_call(experts, swapped, args, kwargs)

    def extra_repr(self) -> str:
        return f"{self.param}: experts={self.num_experts}, r={self.r}, scaling={self.scaling:g}"


def matching_parameters(model: nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """module path -> its parameter names that ``targets`` name (full ``module.param`` names or suffixes),
    in the module's own parameter order."""
    found: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{path}.{pname}" if path else pname
            if any(key == t or key.endswith(f".{t}") for t in targets):
                found.setdefault(path, []).append(pname)
    return found


def apply(model: nn.Module, targets: list[str], r: int, alpha: float, use_rslora: bool = False) -> list[str]:
    """Wrap every parameter ``targets`` name; returns the ``module.param`` names wrapped."""
    found = matching_parameters(model, targets)
    if not found:
        raise ConfigError(f"peft.target_parameters={targets} matched no parameter of the model; name them like "
                          "'mlp.experts.gate_up_proj' (see `peftlab params` for the model's names)")
    for path, params in found.items():
        module = model.get_submodule(path)
        for pname in params:  # the first becomes the innermost wrapper, as in PEFT
            module = ParamLoRA(module, pname, r, alpha, use_rslora)
        set_submodule(model, path, module)
    return [f"{p}.{n}" for p, ns in found.items() for n in ns]


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold every ParamLoRA into its parameter and put the experts module back."""
    outer = [(n, m) for n, m in model.named_modules() if isinstance(m, ParamLoRA)]
    outer = [(n, m) for n, m in outer if not any(n.startswith(o + ".") for o, _ in outer if o != n)]
    for path, wrapper in outer:
        experts = wrapper.experts
        for level in wrapper.levels():
            w = getattr(experts, level.param)
            w.add_(level.delta().to(w.dtype))
        set_submodule(model, path, experts)


def trainable_count(model: nn.Module) -> int:
    return sum(m.num_experts * m.r * (m.in_features + m.out_features)
               for m in model.modules() if isinstance(m, ParamLoRA))
