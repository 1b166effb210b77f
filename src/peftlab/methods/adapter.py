"""Bottleneck adapters (serial, Houlsby; parallel, He et al.) and the MAM adapter preset.

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP" (2019), arXiv:1902.00751.
He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning" (2022), arXiv:2110.04366.

    A(h)     = W_up f(W_down h + b_down) + b_up,    W_down ∈ R^{b×d}, W_up ∈ R^{d×b} (zero at init)
    serial:    y = F(x) + A(F(x))          after the attention block and after the FFN (Houlsby)
    parallel:  y = F(x) + s · A(x)         beside the sublayer, reading its input (He et al.)
    mam:       parallel adapter at the FFN (b = 512, s = 4) + prefix tuning (n = 30, MLP h = 512)

AdapterDrop (Rücklé et al., "AdapterDrop: On the Efficiency of Adapters in Transformers" (2021),
arXiv:2010.11918) is an option of this adapter: ``drop_layers = n`` builds no adapter in the lowest
n decoder layers, so with a frozen base nothing below layer n requires a gradient and the backward
pass stops there (no input-gradient work in the frozen layers); ``drop_layers_inference = m >= n``
also skips the adapters of layers n..m-1 when the model is in eval mode (faster inference).

F is the attention sublayer (its output projection included) or the FFN of each decoder layer; the
adapter wraps that module and calls it (``self.base``), so the layer's residual connection and
norms are untouched. W_up and b_up start at zero, so the adapted model equals the base at step 0.
Trainable per wrapped sublayer: 2·d·b + b + d; with AdapterDrop, (L - n)·|sites|·(2·d·b + b + d).

Cannot merge (the nonlinearity sits between the two projections). PEFT has no bottleneck adapter,
so files use peft_type ``BOTTLENECK_ADAPTER`` (``MAM_ADAPTER`` for mam) with PEFT's key prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..model.params import freeze
from ..registry import Method, register
from .prefix import attach_prefix
from .virtual_tokens import ENCODER_KEY, check_init, finalize, from_file_keys, model_dims, to_file_keys

PLACEMENTS = ("serial", "parallel")
SITES = ("attn", "ffn")
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
FFN_NAMES = ("mlp", "feed_forward", "ffn")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class AdapterConfig:
    default_lr = 1e-3  # train.lr when unset (not a key): docs/results.md §2b
    method: str = "adapter"
    placement: str = "serial"  # serial (Houlsby) | parallel (He et al.)
    sites: list[str] = field(default_factory=lambda: ["attn", "ffn"])  # attn and/or ffn of every layer
    bottleneck: int = 64  # b
    activation: str = "relu"  # relu | gelu | silu | tanh
    scaling: float = 1.0  # s (parallel only; He et al. use 4)
    drop_layers: int = 0  # AdapterDrop: no adapters in the lowest n layers (training and inference)
    drop_layers_inference: int | None = None  # AdapterDrop at inference: skip layers below m in eval mode (None: n)

    def validate(self) -> None:
        if self.drop_layers < 0:
            raise ConfigError(f"peft.drop_layers must be >= 0 (the lowest layers without adapters), got {self.drop_layers}")
        if self.drop_layers_inference is not None and self.drop_layers_inference < self.drop_layers:
            raise ConfigError(f"peft.drop_layers_inference={self.drop_layers_inference} is below peft.drop_layers="
                              f"{self.drop_layers}: layers without a trained adapter cannot use one at inference")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"peft.placement {self.placement!r} is not one of {', '.join(PLACEMENTS)}")
        bad = [s for s in self.sites if s not in SITES]
        if bad or not self.sites:
            raise ConfigError(f"peft.sites {self.sites!r}: give one or both of {', '.join(SITES)}")
        _check_common(self.bottleneck, self.activation)
        if self.placement == "serial" and self.scaling != 1.0:
            raise ConfigError("peft.scaling applies to parallel adapters; serial adapters add A(F(x)) unscaled")


@dataclass
class MAMConfig:
    method: str = "mam"
    num_virtual_tokens: int = 30  # prefix length l
    encoder_hidden_size: int | None = 512  # the prefix MLP's hidden size
    bottleneck: int = 512  # b of the parallel FFN adapter
    activation: str = "relu"
    scaling: float = 4.0  # s
    init: str = "random"  # the prefix's start: random | vocab | text (see prefix_tuning)
    init_text: str | None = None
    tokenizer: str | None = None

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"peft.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        check_init(self)
        _check_common(self.bottleneck, self.activation)


def _check_common(bottleneck: int, activation: str) -> None:
    if bottleneck < 1:
        raise ConfigError(f"peft.bottleneck must be >= 1, got {bottleneck}")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"peft.activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(dotted path, module) of every decoder layer: the ModuleList of num_hidden_layers blocks."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            return [(f"{name}.{i}", layer) for i, layer in enumerate(module)]
    raise ConfigError(f"cannot find the {n} decoder layers of {type(model).__name__} (a ModuleList of that length)")


def sublayer(layer_path: str, layer: nn.Module, site: str) -> str:
    """Dotted path (relative to the layer) of its attention block or FFN."""
    names = ATTN_NAMES if site == "attn" else FFN_NAMES
    for name in names:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name
    children = ", ".join(n for n, _ in layer.named_children())
    raise ConfigError(f"{layer_path} ({type(layer).__name__}) has no {site} sublayer named one of "
                      f"{', '.join(names)}; its children: {children}")


def linear_projection(i: int, o: int, zero: bool, device=None) -> nn.Linear:
    """nn.Linear(i, o) (Kaiming-uniform), or all zeros for the up projection."""
    layer = nn.Linear(i, o, device=device)
    if zero:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return layer


class BottleneckAdapter(nn.Module):
    """A sublayer F plus a bottleneck adapter, serial or parallel.

    Calls ``base`` with the layer's own arguments; F's output is a tensor [B, T, d] or a tuple
    whose first item is (attention). ``adapter_down`` [b, d] (Kaiming-uniform, nn.Linear's
    default), ``adapter_up`` [d, b] zero-init; both with biases, fp32, input cast to them.
    ``projection(in, out, zero)`` builds the two projections another way (Compacter's PHM layers;
    ``zero``: the up projection, which must start as the zero map); each has a ``bias`` [out].
    """

    def __init__(self, base: nn.Module, d: int, bottleneck: int, activation: str, placement: str,
                 scaling: float = 1.0, device=None, projection: Callable[[int, int, bool], nn.Module] | None = None):
        super().__init__()
        self.base = base
        self.placement = placement
        self.scaling = scaling
        self.skip_in_eval = False  # AdapterDrop at inference: in eval mode return F(x) alone
        make = projection or (lambda i, o, zero: linear_projection(i, o, zero, device))
        self.adapter_down = make(d, bottleneck, False)
        self.adapter_act = ACTIVATIONS[activation]()
        self.adapter_up = make(bottleneck, d, True)

    def adapt(self, h: torch.Tensor) -> torch.Tensor:
        """A(h): [..., d] -> [..., d]."""
        dtype = self.adapter_down.bias.dtype
        return self.adapter_up(self.adapter_act(self.adapter_down(h.to(dtype))))

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        if self.skip_in_eval and not self.training:
            return out
        y = out[0] if isinstance(out, tuple) else out
        if self.placement == "serial":
            y = y + self.adapt(y).to(y.dtype)
        else:
            x = args[0] if args else kwargs["hidden_states"]
            y = y + (self.scaling * self.adapt(x)).to(y.dtype)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def extra_repr(self) -> str:
        skip = ", skip_in_eval=True" if self.skip_in_eval else ""
        return f"placement={self.placement}, scaling={self.scaling:g}{skip}"


def add_adapters(model: nn.Module, placement: str, sites: list[str], bottleneck: int, activation: str,
                 scaling: float, projection: Callable[[int, int, bool], nn.Module] | None = None,
                 drop_layers: int = 0, drop_layers_inference: int | None = None) -> None:
    """Wrap ``sites`` of every decoder layer from ``drop_layers`` up; mark the adapters of layers
    below ``drop_layers_inference`` to be skipped in eval mode (AdapterDrop)."""
    d = model_dims(model)["d"]
    device = model.get_input_embeddings().weight.device
    layers = decoder_layers(model)
    if drop_layers >= len(layers) or (drop_layers_inference or 0) > len(layers):
        raise ConfigError(f"peft.drop_layers={drop_layers} / peft.drop_layers_inference={drop_layers_inference}: "
                          f"the model has {len(layers)} decoder layers; drop fewer than {len(layers)} in training "
                          "so at least one layer keeps its adapter")
    skip_below = drop_layers if drop_layers_inference is None else drop_layers_inference
    for i, (path, layer) in enumerate(layers):
        if i < drop_layers:
            continue
        for site in sites:
            name = sublayer(path, layer, site)
            wrapped = BottleneckAdapter(getattr(layer, name), d, bottleneck, activation, placement, scaling,
                                        device=device, projection=projection)
            wrapped.skip_in_eval = i < skip_below
            setattr(layer, name, wrapped)


def apply(model: nn.Module, cfg: AdapterConfig) -> None:
    freeze(model)
    add_adapters(model, cfg.placement, cfg.sites, cfg.bottleneck, cfg.activation, cfg.scaling,
                 drop_layers=cfg.drop_layers, drop_layers_inference=cfg.drop_layers_inference)


def apply_mam(model: nn.Module, cfg: MAMConfig) -> None:
    freeze(model)
    add_adapters(model, "parallel", ["ffn"], cfg.bottleneck, cfg.activation, cfg.scaling)
    attach_prefix(model, cfg.num_virtual_tokens, True, cfg.encoder_hidden_size, cfg)


def to_peft_config(cfg: AdapterConfig, model: nn.Module) -> dict:
    return {"peft_type": "BOTTLENECK_ADAPTER", "task_type": "CAUSAL_LM", "placement": cfg.placement,
            "sites": list(cfg.sites), "bottleneck": cfg.bottleneck, "activation": cfg.activation,
            "scaling": cfg.scaling, "drop_layers": cfg.drop_layers,
            "drop_layers_inference": cfg.drop_layers_inference, "inference_mode": True}


def from_peft_config(d: dict) -> AdapterConfig:
    return AdapterConfig(placement=d["placement"], sites=list(d["sites"]), bottleneck=int(d["bottleneck"]),
                         activation=d.get("activation", "relu"), scaling=float(d.get("scaling", 1.0)),
                         drop_layers=int(d.get("drop_layers", 0)), drop_layers_inference=d.get("drop_layers_inference"))


def mam_to_peft_config(cfg: MAMConfig, model: nn.Module) -> dict:
    dims = model_dims(model)
    t = dims["H_kv"] * dims["head_dim"]
    return {"peft_type": "MAM_ADAPTER", "task_type": "CAUSAL_LM", "num_virtual_tokens": cfg.num_virtual_tokens,
            "token_dim": t, "num_attention_heads": dims["H_kv"], "num_layers": dims["L"],
            "encoder_hidden_size": cfg.encoder_hidden_size or t, "bottleneck": cfg.bottleneck,
            "activation": cfg.activation, "scaling": cfg.scaling, "inference_mode": True}


def mam_from_peft_config(d: dict) -> MAMConfig:
    return MAMConfig(num_virtual_tokens=int(d["num_virtual_tokens"]), encoder_hidden_size=d.get("encoder_hidden_size"),
                     bottleneck=int(d["bottleneck"]), activation=d.get("activation", "relu"),
                     scaling=float(d.get("scaling", 4.0)))


# MAM's adapters live inside the wrapped backbone (``model.base.layers...``); in the file they keep
# the plain paths (``base_model.model.model.layers...``), as the adapter method writes them.
def _mam_to_keys(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] != ENCODER_KEY and len(parts) > 1 and parts[1] == "base":
            del parts[1]
        out[".".join(parts)] = v
    return to_file_keys(out)


def _mam_from_keys(state: dict) -> dict:
    out = {}
    for k, v in from_file_keys(state).items():
        parts = k.split(".")
        if parts[0] != ENCODER_KEY:
            parts.insert(1, "base")
        out[".".join(parts)] = v
    return out


register(Method(
    name="adapter", config_cls=AdapterConfig, apply=apply, merge=None, peft_type="BOTTLENECK_ADAPTER",
    state_prefixes=("adapter_",), to_peft_config=to_peft_config, from_peft_config=from_peft_config,
    aliases=("bottleneck_adapter",),
))
register(Method(
    name="mam", config_cls=MAMConfig, apply=apply_mam, merge=None, peft_type="MAM_ADAPTER",
    state_prefixes=("adapter_", ENCODER_KEY), to_peft_config=mam_to_peft_config,
    from_peft_config=mam_from_peft_config, to_peft_keys=_mam_to_keys, from_peft_keys=_mam_from_keys,
    finalize=finalize,
))
