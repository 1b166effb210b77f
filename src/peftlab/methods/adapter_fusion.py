"""AdapterFusion: a learned, per-layer attention over N frozen task adapters.

Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer Learning" (2021),
arXiv:2005.00247.

Stage one trains task adapters (``peft.method=adapter``, one run per task). Stage two,
``peft.method=adapter_fusion peft.adapters=[DIR, DIR, ...]``, loads them frozen and trains, at every
sublayer F the adapters wrap (attention and/or FFN of each decoder layer):

    y = F(x);   a_n = A_n(y) (serial) or s_n A_n(x) (parallel): adapter n's update    n = 1..N
    s_n = softmax_n( (Q y) · (K a_n) )                                              per token
    out = y + Σ_n s_n V a_n,        Q, K ∈ R^{d×d} ~ N(0, 0.02²),  V ∈ R^{d×d} = I at init

Query from the sublayer output, keys and values from the adapters' outputs, V initialised to the
identity as in the paper, so at step 0 the output is y plus a convex mixture of the adapters'
updates (exactly one adapter's output when N = 1). The residual y is added outside the mixture, as
adapter-transformers does. The adapters are peftlab's ``BottleneckAdapter`` (their ``adapt``),
loaded from their files and frozen.

DIR is a run directory (its ``adapter/`` is used) or an adapter directory saved by peftlab with
``peft.method=adapter``. Each is checked before anything is built: it exists, it is a bottleneck
adapter, it was trained for a base of this architecture and size, and its tensors fit this model;
all adapters must share ``sites`` and ``drop_layers``. Errors name the directory.

Trainable: **3·d²** per fused sublayer = (L - n_drop)·|sites|·3·d². The adapters are saved with the
fusion (``fusion_adapters``), so a saved fusion loads without its source directories' tensors.
Cannot merge (the mixture depends on the input). peft_type ``ADAPTER_FUSION`` (peftlab only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import ConfigError
from ..model.params import freeze
from ..registry import Method, add_peft_prefix, register, strip_peft_prefix
from .adapter import BottleneckAdapter, decoder_layers, sublayer
from .virtual_tokens import model_dims

SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


@dataclass
class AdapterFusionConfig:
    method: str = "adapter_fusion"
    adapters: list[str] = field(default_factory=list)  # run dirs or adapter dirs of peft.method=adapter

    def validate(self) -> None:
        if len(self.adapters) < 1:
            raise ConfigError("peft.adapters is empty: give the task adapters to fuse, "
                              "e.g. peft.adapters=[runs/codes,runs/zh] (run dirs or adapter dirs)")
        for d in self.adapters:
            adapter_dir(d)


def adapter_dir(d: str) -> Path:
    """The adapter directory of ``d`` (a run dir's ``adapter/``, or ``d`` itself)."""
    p = Path(d)
    if not p.is_dir():
        raise ConfigError(f"peft.adapters: {d!r} does not exist; give a run directory or an adapter directory "
                          "saved by peftlab with peft.method=adapter")
    if (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    if not (p / "adapter_config.json").is_file():
        raise ConfigError(f"peft.adapters: {d} is not an adapter: it has neither adapter_config.json nor "
                          "adapter/adapter_config.json (a finished run of peft.method=adapter has the latter)")
    return p


def read_task_adapter(d: str, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(its adapter settings, its tensors by module path) after checking it fits ``model``."""
    p = adapter_dir(d)
    try:
        config = json.loads((p / "adapter_config.json").read_text())
        record = json.loads((p / "peftlab.json").read_text()) if (p / "peftlab.json").is_file() else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"peft.adapters: {d}: a JSON file there is damaged (line {e.lineno}: {e.msg})") from None
    if config.get("peft_type") != "BOTTLENECK_ADAPTER":
        raise ConfigError(f"peft.adapters: {d} is a {config.get('peft_type')} adapter; AdapterFusion fuses "
                          "bottleneck adapters (train each task with peft.method=adapter)")
    saved = record.get("base_fingerprint") or {}
    diff = [f"{k}: adapter {saved[k]} vs model {getattr(model.config, k, None)}" for k in SHAPE_KEYS
            if k in saved and getattr(model.config, k, None) not in (None, saved[k])]
    if diff:
        raise ConfigError(f"peft.adapters: {d} was trained for another base model ({record.get('base_model')}; "
                          f"{', '.join(diff)}); fuse adapters trained on this base")
    if not (p / "adapter_model.safetensors").is_file():
        raise ConfigError(f"peft.adapters: {d} has no adapter_model.safetensors")
    return config, strip_peft_prefix(load_file(str(p / "adapter_model.safetensors")))


class FusedAdapters(nn.Module):
    """A sublayer F (``base``, called) plus N frozen adapters and the fusion attention.

    x -> F(x) [B, T, d] (or a tuple whose first item is); ``fusion_adapters`` hold the adapters
    (each a ``BottleneckAdapter`` around nothing: only its ``adapt`` is used), ``fusion_query`` /
    ``fusion_key`` / ``fusion_value`` are Q, K, V [d, d].
    """

    def __init__(self, base: nn.Module, adapters: list[BottleneckAdapter], d: int, device=None):
        super().__init__()
        self.base = base
        self.fusion_adapters = nn.ModuleList(adapters)
        self.fusion_query = nn.Linear(d, d, bias=False, device=device)
        self.fusion_key = nn.Linear(d, d, bias=False, device=device)
        self.fusion_value = nn.Linear(d, d, bias=False, device=device)
        nn.init.normal_(self.fusion_query.weight, std=0.02)
        nn.init.normal_(self.fusion_key.weight, std=0.02)
        with torch.no_grad():
            self.fusion_value.weight.copy_(torch.eye(d))

    def updates(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """a_n: [B, T, N, d] (each adapter's update of y, serial or parallel)."""
        out = []
        for a in self.fusion_adapters:
            out.append(a.adapt(y) if a.placement == "serial" else a.scaling * a.adapt(x))
        return torch.stack(out, dim=-2)

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        x = args[0] if args else kwargs["hidden_states"]
        w = self.fusion_query.weight
        a = self.updates(x, y).to(w.dtype)  # [B, T, N, d]
        q = self.fusion_query(y.to(w.dtype))  # [B, T, d]
        scores = torch.einsum("btd,btnd->btn", q, self.fusion_key(a)).softmax(dim=-1)
        fused = torch.einsum("btn,btnd->btd", scores, self.fusion_value(a))
        y = y + fused.to(y.dtype)
        return (y, *out[1:]) if isinstance(out, tuple) else y


def apply(model: nn.Module, cfg: AdapterFusionConfig) -> None:
    freeze(model)
    d = model_dims(model)["d"]
    device = model.get_input_embeddings().weight.device
    layers = decoder_layers(model)
    tasks = [(path, *read_task_adapter(path, model)) for path in cfg.adapters]
    first, first_cfg = tasks[0][0], tasks[0][1]
    for path, conf, _ in tasks[1:]:
        for key in ("sites", "drop_layers"):
            if conf.get(key, 0) != first_cfg.get(key, 0):
                raise ConfigError(f"peft.adapters: {path} has {key}={conf.get(key, 0)} but {first} has "
                                  f"{first_cfg.get(key, 0)}; fused adapters must sit at the same places")
    for i, (layer_path, layer) in enumerate(layers):
        if i < first_cfg.get("drop_layers", 0):
            continue
        for site in first_cfg["sites"]:
            name = sublayer(layer_path, layer, site)
            bodies = []
            for path, conf, tensors in tasks:
                body = BottleneckAdapter(nn.Identity(), d, int(conf["bottleneck"]), conf.get("activation", "relu"),
                                         conf["placement"], float(conf.get("scaling", 1.0)), device=device)
                _load_body(body, tensors, f"{layer_path}.{name}", path)
                bodies.append(body.requires_grad_(False))
            setattr(layer, name, FusedAdapters(getattr(layer, name), bodies, d, device=device))


def _load_body(body: BottleneckAdapter, tensors: dict, prefix: str, path: str) -> None:
    with torch.no_grad():
        for pname, p in body.named_parameters():
            key = f"{prefix}.{pname}"
            if key not in tensors:
                raise ConfigError(f"peft.adapters: {path} has no tensor {key}; was it trained on another base "
                                  "model or with other peft.sites?")
            if tensors[key].shape != p.shape:
                raise ConfigError(f"peft.adapters: {path}: {key} has shape {tuple(tensors[key].shape)}, this model "
                                  f"needs {tuple(p.shape)} (another base model?)")
            p.copy_(tensors[key].to(p.dtype))


def to_peft_config(cfg: AdapterFusionConfig, model: nn.Module) -> dict:
    return {"peft_type": "ADAPTER_FUSION", "task_type": "CAUSAL_LM", "adapters": list(cfg.adapters),
            "inference_mode": True}


def from_peft_config(d: dict) -> AdapterFusionConfig:
    return AdapterFusionConfig(adapters=list(d["adapters"]))


register(Method(
    name="adapter_fusion", config_cls=AdapterFusionConfig, apply=apply, merge=None, peft_type="ADAPTER_FUSION",
    state_prefixes=("fusion_",), to_peft_config=to_peft_config, from_peft_config=from_peft_config,
    to_peft_keys=add_peft_prefix, from_peft_keys=strip_peft_prefix,
))
