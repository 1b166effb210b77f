"""Adapter directories that Hugging Face PEFT (and vLLM, for LoRA) load unchanged.

    adapter_config.json          PEFT's config: peft_type, r, lora_alpha, target_modules, ...
    adapter_model.safetensors    tensors named as PEFT names them (base_model.model.<path>...)
    peftlab.json                 peftlab's own record: the full method config and the base
                                 model's fingerprint (PEFT ignores this file)

Only keys PEFT knows go into adapter_config.json (older loaders and vLLM reject unknown
keys); everything else lives in peftlab.json. Loading reads safetensors only and refuses
pickle files (``adapter_model.bin``) with an explanation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import registry
from ..config import build_dataclass
from ..errors import ConfigError
from ..io import atomic_dir
from ..methods.modules_to_save import prepare_base_for_adapter
from ..model.params import freeze
from ..quant.convert import model_is_quantized, quantize_model
from ..version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFTLAB_NAME = "peftlab.json"
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt")


def _owned(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(part.startswith(prefixes) for part in name.split("."))


def adapter_state(model: nn.Module, method: registry.Method) -> dict[str, torch.Tensor]:
    """The method's own tensors (parameters and persistent buffers), by module path."""
    if not method.state_prefixes:
        raise ConfigError(f"method {method.name!r} has no adapter tensors to save")
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if _owned(name, method.state_prefixes):
            state[name] = tensor
    return state


FINGERPRINT_ROWS = 4  # embedding rows hashed into the base fingerprint


def _embedding_rows(model: nn.Module) -> torch.Tensor | None:
    """The first rows of the input embedding [FINGERPRINT_ROWS, d] as fp32 CPU, or None.

    Under FSDP the embedding is row-sharded; rank 0 (which saves) holds the first rows.
    """
    try:
        weight = model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):
        return None
    if weight.requires_grad and not all(p.requires_grad for p in model.parameters()):
        return None  # a method froze the base but trains the embedding: not the base's values any more
    if hasattr(weight, "to_local"):  # a DTensor
        weight = weight.to_local()
    if weight.dim() != 2 or weight.shape[0] < FINGERPRINT_ROWS or weight.is_meta:
        return None
    return weight.detach()[:FINGERPRINT_ROWS].to("cpu", torch.float32)


def base_fingerprint(model: nn.Module) -> dict:
    """What an adapter needs of its base: architecture, the shapes it was built on, and its weights.

    ``weights_sha256`` hashes the first embedding rows rounded to bf16 (so the same base loaded
    in fp32 or bf16 gives the same hash); ``weights_sample`` keeps 8 of those values so a base
    that differs only by precision (fp16, a quantised copy) can be told from another model.
    """
    cfg = getattr(model, "config", None)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
            "num_attention_heads", "num_key_value_heads")
    out = {k: getattr(cfg, k, None) for k in keys if cfg is not None and getattr(cfg, k, None) is not None}
    rows = _embedding_rows(model)
    if rows is not None:
        import hashlib

        raw = rows.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        out["weights_sha256"] = hashlib.sha256(raw).hexdigest()
        out["weights_sample"] = [round(float(v), 6) for v in rows.reshape(-1)[:8]]
    return out


def check_fingerprint(adapter_dir: Path, record: dict, model: nn.Module) -> None:
    """Raise when the adapter recorded a base that is not ``model`` (shapes or weights)."""
    saved = record.get("base_fingerprint") or {}
    if not saved:
        return
    if not isinstance(saved, dict):
        raise ConfigError(f"{adapter_dir / PEFTLAB_NAME}: base_fingerprint must be an object; the file is damaged")
    mine = base_fingerprint(model)
    shape_keys = [k for k in saved if k not in ("weights_sha256", "weights_sample")]
    diff = {k: (saved[k], mine.get(k)) for k in shape_keys if mine.get(k) not in (None, saved[k])}
    if diff:
        detail = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in diff.items())
        raise ConfigError(
            f"{adapter_dir} was trained for another base model ({record.get('base_model')}); {detail}. "
            "Load the base it was trained on"
        )
    if "weights_sha256" not in saved or "weights_sha256" not in mine or saved["weights_sha256"] == mine["weights_sha256"]:
        return
    try:
        a = torch.tensor([float(v) for v in saved.get("weights_sample", [])][:8])
    except (TypeError, ValueError):
        a = torch.zeros(0)
    b = torch.tensor(mine["weights_sample"][: len(a)])
    if len(a) and len(a) == len(b) and torch.allclose(a, b, rtol=2e-2, atol=1e-3):
        import warnings

        warnings.warn(f"{adapter_dir}: the base model's weights differ slightly from the ones the adapter was "
                      "trained on (another precision or a quantised copy?)", stacklevel=3)
        return
    raise ConfigError(
        f"{adapter_dir} was trained on other base weights ({record.get('base_model')}): same architecture and "
        "shapes, but the embedding fingerprint differs. Load the base model it was trained on "
        "(a fine-tuned or different checkpoint of the same architecture gives wrong outputs)"
    )


def save_adapter(model: nn.Module, peft_cfg, out_dir: str | Path, base_model_name: str | None = None) -> Path:
    """Write the adapter of ``model`` (built by ``peft_cfg.method``) atomically to ``out_dir``."""
    method = registry.get(peft_cfg.method)
    if method.peft_type is None:
        raise ConfigError(f"method {method.name!r} saves a whole model, not an adapter")
    if method.saved_config is not None:  # e.g. PiSSA is saved as a plain LoRA against the untouched base
        peft_cfg = method.saved_config(peft_cfg, model)
    state = method.to_peft_keys(adapter_state(model, method))
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    config = method.to_peft_config(peft_cfg, model) if method.to_peft_config else {"peft_type": method.peft_type}
    config["base_model_name_or_path"] = base_model_name
    record = {
        "peftlab_version": __version__,
        "method": dataclasses.asdict(peft_cfg),
        "base_model": base_model_name,
        "base_fingerprint": base_fingerprint(model),
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / PEFTLAB_NAME).write_text(json.dumps(record, indent=2))
    return out_dir


def read_adapter_config(adapter_dir: str | Path) -> tuple[dict, dict | None]:
    d = Path(adapter_dir)
    if not d.is_dir():
        raise ConfigError(f"adapter directory {str(d)!r} does not exist")
    if not (d / WEIGHTS_NAME).is_file():
        pickles = [n for n in PICKLE_NAMES if (d / n).exists()]
        if pickles:
            raise ConfigError(
                f"{d / pickles[0]} is a pickle file; peftlab never loads pickled weights because "
                "unpickling can run arbitrary code. Convert it to safetensors where you trust it "
                "(PEFT: model.save_pretrained(dir, safe_serialization=True))"
            )
        raise ConfigError(f"{d} has no {WEIGHTS_NAME}")
    try:
        config = json.loads((d / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{d} has no {CONFIG_NAME}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{d / CONFIG_NAME} line {e.lineno}: not valid JSON ({e.msg})") from None
    record = None
    if (d / PEFTLAB_NAME).is_file():
        try:
            record = json.loads((d / PEFTLAB_NAME).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{d / PEFTLAB_NAME} line {e.lineno}: not valid JSON ({e.msg})") from None
    return config, record


def adapter_method_config(adapter_dir: str | Path):
    """The method config an adapter directory was saved with (peftlab's or PEFT's)."""
    config, record = read_adapter_config(adapter_dir)
    if record and "method" in record:
        raw = dict(record["method"])
        method = registry.get(raw.get("method", ""))
        return build_dataclass(method.config_cls, raw, "peft")
    method = registry.by_peft_type(str(config.get("peft_type")))
    if method.from_peft_config is None:
        raise ConfigError(f"{adapter_dir}: peft_type {config.get('peft_type')} cannot be read by peftlab")
    return method.from_peft_config(config)


def load_adapter(model: nn.Module, adapter_dir: str | Path, peft_cfg=None):
    """Apply the adapter's method to ``model`` and load its tensors; returns the method config.

    Errors name the missing or unexpected tensors and shape mismatches (an adapter trained
    on another base model fails here, before any output is produced).
    """
    adapter_dir = Path(adapter_dir)
    config, record = read_adapter_config(adapter_dir)
    cfg = peft_cfg or adapter_method_config(adapter_dir)
    method = registry.get(cfg.method)
    merge_adapters_first(model, getattr(cfg, "merge_first", None))  # the base this adapter was trained on
    # tokens added before training: grow the base's embeddings to the adapter's vocabulary first
    tensors = prepare_base_for_adapter(model, load_file(str(adapter_dir / WEIGHTS_NAME)))
    if record:
        check_fingerprint(adapter_dir, record, model)
    method.apply(model, cfg)
    if method.finalize is not None:  # saved adapters hold the inference form (e.g. P-tuning's folded prompt)
        method.finalize(model, cfg)
    loaded = method.from_peft_keys(tensors)
    expected = adapter_state(model, method)
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise ConfigError(
            f"{adapter_dir / WEIGHTS_NAME} does not fit this model: "
            + (f"missing {len(missing)} tensors (e.g. {missing[0]}) " if missing else "")
            + (f"unexpected {len(unexpected)} tensors (e.g. {unexpected[0]})" if unexpected else "")
            + "; was it trained on another base model or with other targets?"
        )
    with torch.no_grad():
        for name, target in expected.items():
            src = loaded[name]
            if tuple(src.shape) != tuple(target.shape):
                raise ConfigError(
                    f"{adapter_dir / WEIGHTS_NAME}: tensor {name} has shape {tuple(src.shape)}, "
                    f"the model expects {tuple(target.shape)} (another base model or rank?)"
                )
            target.copy_(src.to(target.dtype))
    return cfg


# ---------------------------------------------------------------------------- continuing from an adapter


def merge_adapters_first(model: nn.Module, dirs: list[str] | None) -> None:
    """``peft.merge_first``: load each adapter, merge it into the base (in order), freeze again.

    Called before ``method.apply`` wherever a method config is applied (the training loop,
    ``load_adapter``). A quantised base is dequantised for the merge and quantised again after it
    (lossy: the merged weights are rounded to the 4/8-bit grid once more).
    """
    if not dirs or any(p.is_meta for p in model.parameters()):
        return
    kind = model_is_quantized(model)
    for d in dirs:
        if not Path(d).is_dir():
            raise ConfigError(f"peft.merge_first: adapter directory {d!r} does not exist")
        cfg = load_adapter(model, d)
        method = registry.get(cfg.method)
        if method.merge is None:
            raise ConfigError(f"peft.merge_first: {d} is a {cfg.method} adapter, which cannot be merged into "
                              "the base; continue training it with peft.init_from instead")
        method.merge(model)
    if kind:
        quantize_model(model, kind)
    freeze(model)


def init_from_adapter(model: nn.Module, method: registry.Method, adapter_dir: str) -> None:
    """``peft.init_from``: copy an adapter's tensors into the freshly applied method's tensors
    (the training loop calls this after ``method.on_train_start``)."""
    read_adapter_config(adapter_dir)  # clear errors for a missing directory or pickle files
    loaded = method.from_peft_keys(prepare_base_for_adapter(model, load_file(str(Path(adapter_dir) / WEIGHTS_NAME))))
    expected = adapter_state(model, method)
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    shapes = [(k, tuple(loaded[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in loaded and loaded[k].shape != v.shape]
    if missing or unexpected or shapes:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                  else f"{shapes[0][0]} has shape {shapes[0][1]}, this run builds {shapes[0][2]}")
        raise ConfigError(
            f"peft.init_from={adapter_dir}: the adapter does not fit this run's {method.name} setup ({detail}); "
            "use the same peft.method, peft.r and peft.targets it was trained with (a PiSSA/OLoRA adapter "
            "is saved as plain LoRA of rank 2r: continue it with peft.init=kaiming and peft.r=2r)"
        )
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(loaded[k].to(v.device, v.dtype))
