"""Merge an adapter into its base and export a plain Hugging Face model directory.

    W' = W + ΔW          (LoRA: ΔW = s·B A; every method with a ``merge`` in the registry)

The result is what ``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads with no
peftlab installed: ``model.safetensors`` (+ shards), ``config.json``, the tokenizer files,
``generation_config.json`` (eos/pad set so generation stops where training taught it to), and
``peftlab_merge.json`` (provenance: base, adapter, method, dtype, the measured logit difference).

Precision: the base is loaded in fp32, the update is added in fp32, and the sum is rounded once
to the output dtype — the base checkpoint's own dtype unless ``dtype`` says otherwise (never
silently fp32 for a bf16 base). Before the directory is put in place, the export is loaded back
with plain transformers and its logits on a probe are compared with the unmerged model's; in
fp32 a difference above ``FP32_TOLERANCE`` × max(1, max |logit|) aborts the export (nothing is written).

Tied embeddings: when a method changes a weight that is tied to another (LoRA on ``lm_head`` of a
model with ``tie_word_embeddings``), the two are untied in the export so the input embeddings
keep their trained values; ``config.tie_word_embeddings`` is set to false accordingly.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .. import registry
from ..config import ModelConfig
from ..configure import load_config
from ..errors import ConfigError
from ..io import atomic_dir
from ..model.load import DTYPES, asset_dir, is_config_name, resolve_dtype
from ..rundir import is_run_dir, run_config
from ..version import __version__
from .adapter import adapter_method_config, load_adapter, read_adapter_config

# max |logit difference| merged vs unmerged in fp32, relative to max(1, max |logit|); measured ~1e-6
FP32_TOLERANCE = 1e-5
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Merging must not change a single answer: 1, 2, 3."


@dataclass
class MergeResult:
    out_dir: Path
    method: str
    base: str
    dtype: str
    max_abs_diff: float | None  # merged export vs unmerged model, logits on the probe
    untied: bool  # tied embeddings had to be untied


def cannot_merge_error(method_name: str, adapter_dir: str | Path) -> ConfigError:
    return ConfigError(
        f"method {method_name!r} (adapter {str(adapter_dir)!r}) cannot be merged into the base weights "
        "because its math adds inputs or modules rather than a weight update; serve it unmerged instead: "
        f"`peftlab serve model.name=BASE --adapters DIR`, `peftlab chat --adapter {adapter_dir}` or "
        f"`peftlab generate --adapter {adapter_dir}`"
    )


def _stored_dtype(model_cfg: ModelConfig) -> str:
    """The dtype the base checkpoint is stored in (config.json), or the run's model.dtype."""
    name = model_cfg.name
    if is_config_name(name):
        return model_cfg.dtype
    try:
        path = asset_dir(name) if not Path(name).is_dir() else Path(name)
    except KeyError:
        return model_cfg.dtype
    try:
        conf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return model_cfg.dtype
    stored = conf.get("dtype") or conf.get("torch_dtype")
    return stored if stored in DTYPES else model_cfg.dtype


def resolve_base(adapter_dir: Path | None, run_dir: Path | None, overrides: list[str]) -> tuple[ModelConfig, int, Path]:
    """(base ModelConfig, init seed for config:<arch> bases, adapter directory)."""
    if run_dir is not None:
        if is_run_dir(run_dir) and (run_dir / "model" / "config.json").is_file() and not (run_dir / "adapter").exists():
            raise ConfigError(
                f"{run_dir} is a full fine-tuning run: {run_dir / 'model'} is already a plain Hugging Face "
                "model directory, there is no adapter to merge"
            )
        cfg = run_config(run_dir, overrides)
        seed = cfg.model.seed if cfg.model.seed is not None else cfg.train.seed
        return cfg.model, seed, run_dir / "adapter"
    assert adapter_dir is not None
    cfg = load_config(None, overrides)
    if not any(o.split("=", 1)[0].strip() == "model.name" for o in overrides):
        config, record = read_adapter_config(adapter_dir)
        base = (record or {}).get("base_model") or config.get("base_model_name_or_path")
        if not base:
            raise ConfigError(
                f"{adapter_dir} does not say which base model it was trained on; "
                "name it with model.name=DIR_OR_ASSET"
            )
        if is_config_name(base):
            raise ConfigError(
                f"{adapter_dir} was trained on a randomly initialised {base!r} model; merge it from its run "
                "directory (--run RUN_DIR), which records the model's shape and seed"
            )
        cfg.model.name = base
    seed = cfg.model.seed if cfg.model.seed is not None else cfg.train.seed
    return cfg.model, seed, adapter_dir


def _probe_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    if tokenizer is not None:
        ids = tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids
    else:
        ids = list(range(1, 33))
    ids = [i % vocab_size for i in ids][:48]
    return torch.tensor([ids])


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits.float().cpu()


def _tie_snapshot(model: nn.Module):
    """(input embedding Parameter, a copy of it) when the head shares it, else None."""
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if inp is None or out is None:
        return None
    out_base = getattr(out, "base_layer", out)  # the method may have wrapped the head
    if getattr(out_base, "weight", None) is not inp.weight:
        return None
    return inp.weight, inp.weight.detach().clone()


def _untie_if_changed(model: nn.Module, snapshot) -> bool:
    """After merging: if the shared weight changed, give the embeddings their old copy back."""
    if snapshot is None:
        return False
    shared, before = snapshot
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not model.get_input_embeddings().weight:
        pass  # the method's merge already gave the head its own weight (embeddings unchanged)
    elif torch.equal(shared.detach(), before):
        return False
    else:
        model.get_input_embeddings().weight = nn.Parameter(before, requires_grad=False)
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        text.tie_word_embeddings = False
    return True


def _generation_config(model: nn.Module, tokenizer, encoder) -> object:
    from transformers import GenerationConfig

    gen = copy.deepcopy(getattr(model, "generation_config", None)) or GenerationConfig()
    if tokenizer is not None:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for s in encoder.renderer.stop_strings if encoder is not None else ():
            ids = tokenizer(s, add_special_tokens=False).input_ids
            if len(ids) == 1 and ids[0] not in eos:
                eos.append(ids[0])
        if eos:
            gen.eos_token_id = eos[0] if len(eos) == 1 else eos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is not None:
            gen.pad_token_id = pad
        if tokenizer.bos_token_id is not None:
            gen.bos_token_id = tokenizer.bos_token_id
    return gen


@dataclass
class MergedModel:
    """A base with an adapter merged into it, in float32, with what the exports need beside it."""

    model: nn.Module
    tokenizer: object
    model_cfg: ModelConfig
    peft_cfg: object
    method_name: str
    adapter_dir: Path
    untied: bool
    probe: torch.Tensor  # token ids the exports are checked on
    ref_logits: torch.Tensor | None  # the unmerged model's logits on ``probe``


def merge_adapter(*, adapter: str | Path | None = None, run: str | Path | None = None,
                  overrides: list[str] | None = None, reference: bool = True) -> MergedModel:
    """Load the base in float32, load ``adapter`` (or run directory ``run``'s) and merge it.
    ``reference``: also keep the unmerged model's logits on a probe, for checking an export."""
    if (adapter is None) == (run is None):
        raise ConfigError("give exactly one of --adapter DIR or --run RUN_DIR")
    overrides = list(overrides or [])
    model_cfg, seed, adapter_dir = resolve_base(Path(adapter) if adapter else None,
                                                Path(run) if run else None, overrides)
    peft_cfg = adapter_method_config(adapter_dir)
    method = registry.get(peft_cfg.method)
    if method.merge is None:
        raise cannot_merge_error(method.name, adapter_dir)

    from ..model.load import load_model

    work_cfg = copy.deepcopy(model_cfg)
    work_cfg.dtype = "float32"  # merge in fp32, round once at the end
    model, tokenizer = load_model(work_cfg, seed=seed)
    load_adapter(model, adapter_dir, peft_cfg)
    probe = _probe_ids(tokenizer, model.config.vocab_size)
    ref = _logits(model, probe) if reference else None

    snapshot = _tie_snapshot(model)
    method.merge(model)
    untied = _untie_if_changed(model, snapshot)
    leftovers = [n for n, p in model.named_parameters() if any(x in n for x in method.state_prefixes)]
    if leftovers:
        raise ConfigError(f"merging left adapter tensors in the model (e.g. {leftovers[0]}); this is a bug in "
                          f"method {method.name!r}")
    model.config.use_cache = True
    return MergedModel(model, tokenizer, model_cfg, peft_cfg, method.name, adapter_dir, untied, probe, ref)


def chat_encoder(tokenizer, template: str | None):
    """The chat template's encoder (its stop strings), or None for a tokenizer with no usable template."""
    from ..data.tokenize import Encoder

    if tokenizer is None:
        return None
    try:
        return Encoder(tokenizer, template or "auto")
    except Exception:  # a tokenizer with no usable template: generation config without stop strings
        return None


def export_merged(out_dir: str | Path, *, adapter: str | Path | None = None, run: str | Path | None = None,
                  overrides: list[str] | None = None, dtype: str | None = None, verify: bool = True,
                  template: str | None = None) -> MergeResult:
    """Merge ``adapter`` (or the adapter of run directory ``run``) into its base; write ``out_dir``.

    ``overrides`` are ``key=value`` config overrides (``model.name=...`` names the base of an
    adapter that does not record it). ``dtype`` (float32 | bfloat16 | float16) defaults to the
    base checkpoint's stored dtype.
    """
    merged = merge_adapter(adapter=adapter, run=run, overrides=overrides, reference=verify)
    model, tokenizer, model_cfg = merged.model, merged.tokenizer, merged.model_cfg
    out_name = dtype or _stored_dtype(model_cfg)
    out_dtype = resolve_dtype(out_name)
    out_name = str(out_dtype).replace("torch.", "")
    model.to(out_dtype)
    encoder = chat_encoder(tokenizer, template)
    probe, ref, untied, adapter_dir = merged.probe, merged.ref_logits, merged.untied, merged.adapter_dir

    diff = None
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _generation_config(model, tokenizer, encoder).save_pretrained(tmp)
        if verify:
            from transformers import AutoModelForCausalLM

            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=out_dtype)
            got = _logits(reloaded, probe)
            del reloaded
            diff = float((got - ref).abs().max())
            tol = FP32_TOLERANCE * max(1.0, float(ref.abs().max()))
            if out_dtype == torch.float32 and not diff <= tol:
                raise ConfigError(
                    f"the merged export's logits differ from the unmerged model's by {diff:.3g} "
                    f"(> {tol:.3g} in fp32); nothing was written to {out_dir}. This is a bug: please "
                    "report it with the adapter's adapter_config.json"
                )
        info = {
            "peftlab_version": __version__,
            "base_model": model_cfg.name,
            "adapter": str(adapter_dir),
            "method": asdict(merged.peft_cfg),
            "dtype": out_name,
            "max_abs_logit_diff_vs_unmerged": diff,
            "untied_embeddings": untied,
        }
        (tmp / "peftlab_merge.json").write_text(json.dumps(info, indent=2))
    return MergeResult(out_dir, merged.method_name, model_cfg.name, out_name, diff, untied)
