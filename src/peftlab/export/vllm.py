"""Will vLLM load this LoRA adapter? The rules of vLLM's LoRA loader, applied offline.

vLLM is not a dependency (it needs a GPU build); this module restates what the loader of vLLM
0.34.0 checks (``vllm/lora/peft_helper.py`` ``PEFTHelper``, ``vllm/lora/lora_model.py``
``LoRAModel.from_local_checkpoint``, ``vllm/lora/utils.py`` ``parse_fine_tuned_lora_name``, and
the model classes' ``packed_modules_mapping``/``embedding_modules``) so an adapter can be checked
where it is made. ``tests/test_export_vllm.py`` runs those vLLM 0.34.0 files themselves (read
out of the PyPI wheel, never committed) on a set of adapters and requires this check
to agree with them; other vLLM releases differ (noted below where known).

1. ``adapter_config.json`` exists and has ``r`` (> 0), ``lora_alpha`` and ``target_modules``
   (``PEFTHelper`` requires them); other unknown keys are dropped by vLLM (older vLLM and PEFT
   releases fail on some, so they are reported as warnings).
2. ``PEFTHelper._validate_features`` refuses: ``modules_to_save`` other than a classification
   head (``classifier``/``score``) unless the caller allows it; ``use_dora``; ``lora_bias``;
   ``init_lora_weights`` naming an init that changes the base when PEFT loads the adapter
   (``pissa``, ``olora``, ``corda``, ``loftq``...; ``gaussian``, ``eva``, ``orthogonal``, ``mica``,
   ``lora_ga`` and booleans are fine); ``alora_invocation_tokens``; ``layer_replication``;
   ``use_bdlora``; ``use_qalora``.
3. ``bias`` must be ``"none"`` ("Adapter bias is not supported").
4. The largest of ``r`` and the ``rank_pattern`` ranks must not exceed the server's
   ``--max-lora-rank`` (vLLM's default is 16).
5. Weights come from ``adapter_model.safetensors`` (``.bin``/``.pt`` only as a fallback; peftlab
   never writes or reads those). Every tensor name must parse: ``<module>.lora_A.weight``,
   ``<module>.lora_B.weight`` or ``<module>.lora_embedding_A|B`` after the optional
   ``base_model.model.`` prefix (``...embed_tokens.base_layer.weight``/``...lm_head.base_layer.weight``
   are skipped). Anything else (``lora_magnitude_vector``, ``lora_B.bias``, an adapter name such as
   ``lora_A.default.weight``, VeRA/IA3 vectors) is "unsupported LoRA weight".
6. The last component of every module name must be one of the model's LoRA-capable modules
   (vLLM's linear layers expanded through ``packed_modules_mapping`` — q/k/v_proj are packed into
   ``qkv_proj``, gate/up_proj into ``gate_up_proj`` — plus the model's ``embedding_modules``);
   otherwise "expected target modules in [...] but received [...]". The table below lists the
   architectures checked (from vLLM 0.34.0's model files).
7. Warnings, not errors: ``rank_pattern``/``alpha_pattern`` are applied by vLLM 0.34 but ignored
   by older releases (per-layer ranks then take the global scaling alpha/r: wrong outputs);
   ``layers_to_transform`` is not read (vLLM loads whichever tensors the file has);
   ``fan_in_fan_out`` is not read (vLLM assumes [r, in] / [out, r] tensors, which is what PEFT
   files hold).

What is not checked against vLLM's code: the per-architecture module table and the
architectures without LoRA support (the engine refuses those at start-up, outside the loader).

``check_vllm_compatible(dir)`` returns a ``VLLMReport``; ``python -m peftlab.export.vllm DIR``
prints it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from .adapter import CONFIG_NAME, PEFTLAB_NAME, PICKLE_NAMES, WEIGHTS_NAME

VLLM_DEFAULT_MAX_LORA_RANK = 16

VLLM_VERSION = "0.34.0"  # the release whose loader this module restates (and the tests run)

_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_EMBEDDINGS = ("embed_tokens", "lm_head")  # the class's embedding_modules
# model_type -> leaf module names vLLM 0.34.0 accepts LoRA weights for (packed modules expanded,
# embedding_modules added), read from vllm/model_executor/models/<arch>.py.
SUPPORTED_MODULES: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LIKE + _EMBEDDINGS,
    "mistral": _LLAMA_LIKE,  # MistralForCausalLM sets embedding_modules = {}
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE + _EMBEDDINGS,
    "gemma2": _LLAMA_LIKE,
    "gemma3": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE + _EMBEDDINGS,
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj") + _EMBEDDINGS,  # a LlamaForCausalLM subclass
}
# init_lora_weights values PEFTHelper accepts (strings; booleans always pass)
VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# modules_to_save entries vLLM accepts (a classification head)
VLLM_HEADS = ("classifier", "score")
# Architectures whose vLLM implementation has no LoRA support at all.
NO_LORA = {"gpt2": "GPT2LMHeadModel"}

# PEFTHelper's fields: the keys vLLM reads from adapter_config.json.
VLLM_KEYS = {"r", "lora_alpha", "target_modules", "bias", "modules_to_save", "task_type", "use_rslora", "use_dora",
             "lora_bias", "init_lora_weights", "alora_invocation_tokens", "layer_replication", "use_bdlora",
             "use_qalora", "rank_pattern", "alpha_pattern"}
# Keys PEFT itself writes for LoRA that vLLM drops without harm.
HARMLESS_KEYS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "lora_dropout",
    "fan_in_fan_out", "init_lora_weights", "layers_pattern", "auto_mapping", "megatron_config",
    "megatron_core", "loftq_config", "layer_replication", "runtime_config", "lora_bias", "exclude_modules",
    "eva_config", "corda_config", "target_parameters", "trainable_token_indices", "use_qalora",
    "qalora_group_size", "alora_invocation_tokens", "arrow_config", "ensure_weight_tying", "peft_version",
    "rank_pattern", "alpha_pattern", "layers_to_transform",
}

@dataclass
class VLLMReport:
    adapter_dir: Path
    model_type: str | None
    problems: list[str] = field(default_factory=list)  # vLLM refuses the adapter
    warnings: list[str] = field(default_factory=list)  # vLLM loads it, but something differs

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        head = f"{self.adapter_dir}: " + ("vLLM can load this adapter" if self.ok else "vLLM would reject this adapter")
        lines = [head] + [f"  error: {p}" for p in self.problems] + [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _model_type(d: Path, config: dict) -> str | None:
    try:
        record = json.loads((d / PEFTLAB_NAME).read_text())
        mt = record.get("base_fingerprint", {}).get("model_type")
        if mt:
            return mt
    except (OSError, ValueError):
        pass
    base = config.get("base_model_name_or_path")
    if base and (Path(base) / "config.json").is_file():
        try:
            return json.loads((Path(base) / "config.json").read_text()).get("model_type")
        except ValueError:
            return None
    return None


def parse_lora_name(name: str) -> str | None:
    """The module path vLLM derives from a tensor name, or None when vLLM cannot parse it
    (``parse_fine_tuned_lora_name``: "unsupported LoRA weight")."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    parts = name.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[:-2])
    if len(parts) >= 2 and parts[-1] in ("weight", "bias") and parts[-2] in VLLM_HEADS:
        return parts[-2]  # a classification head's modules_to_save tensors
    if len(parts) >= 2 and parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[:-1])
    return None


def _is_base_embedding(name: str) -> bool:
    """Tensors vLLM skips without parsing (``is_base_embedding_weights``)."""
    return name.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight"))


def check_vllm_compatible(adapter_dir: str | Path, *, model_type: str | None = None,
                          max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
                          allow_modules_to_save: bool = False) -> VLLMReport:
    """Apply vLLM's LoRA loading rules to ``adapter_dir`` (see the module docstring).

    ``model_type`` (e.g. ``llama``) defaults to what the adapter records about its base;
    ``max_lora_rank`` is the serving engine's ``--max-lora-rank``.
    """
    d = Path(adapter_dir)
    report = VLLMReport(d, model_type)
    try:
        config = json.loads((d / CONFIG_NAME).read_text())
    except FileNotFoundError:
        report.problems.append(f"no {CONFIG_NAME} (vLLM reads the LoRA config from it)")
        return report
    except ValueError as e:
        report.problems.append(f"{CONFIG_NAME} is not valid JSON ({e})")
        return report
    report.model_type = model_type = model_type or _model_type(d, config)

    if config.get("peft_type", "LORA") != "LORA":
        report.problems.append(f"peft_type is {config.get('peft_type')!r}; vLLM serves LoRA adapters only")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            report.problems.append(f"{CONFIG_NAME} has no {key!r} (a required field of vLLM's PEFTHelper)")
    heads = [m for m in config.get("modules_to_save") or [] if m not in VLLM_HEADS]
    if heads and not allow_modules_to_save:
        report.problems.append(
            f"modules_to_save={config['modules_to_save']!r}: vLLM only supports modules_to_save being None "
            "(or a classification head) (save the adapter without modules_to_save, or merge it: peftlab merge)")
    if config.get("use_dora"):
        report.problems.append("use_dora=true: vLLM does not support DoRA (merge it instead: peftlab merge)")
    if config.get("lora_bias"):
        report.problems.append("lora_bias=true: vLLM does not support LoRA bias (merge it instead: peftlab merge)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_INITS:
        report.problems.append(
            f"init_lora_weights={init!r}: PEFT changes the base weights when it loads this adapter and vLLM "
            "does not (convert it to a plain LoRA delta with PEFT's path_initial_model_for_weight_conversion)")
    for key, what in (("alora_invocation_tokens", "Activated LoRA (aLoRA)"), ("layer_replication", "layer_replication"),
                      ("use_bdlora", "block-diagonal LoRA"), ("use_qalora", "QALoRA")):
        if config.get(key):
            report.problems.append(f"{key} is set: vLLM does not support {what}")
    if config.get("bias", "none") not in ("none", None):
        report.problems.append(f"bias={config['bias']!r}: vLLM does not load adapter biases (train with bias=none)")
    r = config.get("r")
    ranks = [v for v in (config.get("rank_pattern") or {}).values()]
    if "r" in config and (not isinstance(r, int) or r <= 0):
        report.problems.append(f"r={r!r}: vLLM needs a positive integer rank")
    if any(not isinstance(v, int) or v <= 0 for v in ranks):
        report.problems.append(f"rank_pattern={config['rank_pattern']!r}: vLLM needs positive integer ranks")
    largest = max([v for v in [r, *ranks] if isinstance(v, int)], default=0)
    if largest > max_lora_rank:
        report.problems.append(f"rank {largest} is greater than the server's max_lora_rank {max_lora_rank} "
                               f"(start vLLM with --max-lora-rank {_next_rank(largest)})")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        report.warnings.append("rank_pattern/alpha_pattern: vLLM 0.34 applies them, older vLLM releases ignore "
                               "them (layers with another rank or alpha then get lora_alpha/r: wrong outputs)")
    if config.get("layers_to_transform") is not None:
        report.warnings.append("layers_to_transform is ignored by vLLM (it loads whichever tensors the file has)")
    if config.get("fan_in_fan_out"):
        report.warnings.append("fan_in_fan_out=true (a Conv1D model such as GPT-2); vLLM assumes nn.Linear layout")
    unknown = sorted(set(config) - VLLM_KEYS - HARMLESS_KEYS)
    if unknown:
        report.warnings.append(f"keys vLLM ignores and older PEFT/vLLM releases reject: {', '.join(unknown)}")

    weights = d / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [n for n in PICKLE_NAMES if (d / n).exists()]
        report.problems.append(
            f"no {WEIGHTS_NAME}" + (f" (only the pickle {pickles[0]}; convert it to safetensors)" if pickles else ""))
        return report
    with safe_open(str(weights), framework="pt") as f:
        names = list(f.keys())
    if not names:
        report.problems.append(f"{WEIGHTS_NAME} holds no tensors")
    modules, unparsable = [], []
    for n in names:
        if _is_base_embedding(n):
            continue
        module = parse_lora_name(n)
        (unparsable.append(n) if module is None else modules.append(module))
    if unparsable:
        report.problems.append(f"{len(unparsable)} tensors vLLM cannot parse as LoRA weights (\"unsupported LoRA "
                               f"weight\"), e.g. {unparsable[0]}")
    if model_type in NO_LORA:
        report.problems.append(f"vLLM's {NO_LORA[model_type]} ({model_type}) does not support LoRA adapters")
    elif model_type in SUPPORTED_MODULES:
        allowed = SUPPORTED_MODULES[model_type]
        saved = tuple(config.get("modules_to_save") or ())
        bad = sorted({m for m in modules if m.split(".")[-1] not in allowed + saved})
        if bad:
            report.problems.append(
                f"target modules vLLM does not adapt for {model_type}: {', '.join(sorted({b.split('.')[-1] for b in bad}))} "
                f"(e.g. {bad[0]}); vLLM expects target modules in {list(allowed)}")
    else:
        report.warnings.append(
            f"base architecture {model_type or 'unknown'!s}: target module names not checked "
            f"(known: {', '.join(sorted(SUPPORTED_MODULES))}); pass model_type=")
    return report


def _next_rank(r: int) -> int:
    for choice in (8, 16, 32, 64, 128, 256, 320, 512):
        if choice >= r:
            return choice
    return r


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m peftlab.export.vllm ADAPTER_DIR [MODEL_TYPE]", file=sys.stderr)
        return 2
    report = check_vllm_compatible(args[0], model_type=args[1] if len(args) > 1 else None)
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
