"""Run configuration: four sections of typed dataclasses, YAML files and dotted overrides.

    model  -> ModelConfig        which base model, dtype, device, quantisation
    peft   -> the method's config dataclass, chosen by ``peft.method`` (see registry)
    data   -> DataConfig         where the examples come from and how they become tokens
    train  -> TrainConfig        the loop: objective, optimiser, schedule, batches, checkpoints
    pref   -> PreferenceConfig   the knobs of the preference objectives (train.objective=dpo, ...)
    grpo   -> GRPOConfig         the knobs of GRPO (train.objective=grpo: train/grpo.py)

Every key is validated: an unknown key is an error that lists the valid keys of its section. A
method's own options live only in its config class, so ``peft.r`` is valid for LoRA and an error for
full fine-tuning. This module knows no method (it stands below the registry);
``configure.load_config(path, ["train.lr=1e-3", ...])`` reads an optional YAML file, applies the
overrides and builds the ``peft`` section with the class the registry names.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"
# train.lr left unset takes the method's own default: its config class's ``default_lr`` attribute (a
# plain class attribute, not a key), chosen by benchmarks/recipes.py (docs/results.md); a method that
# names none takes DEFAULT_LR. GRPO takes GRPO_LR_SHARE of it (1e-4 beat 5e-4 for LoRA there).
DEFAULT_LR = 2e-4
GRPO_LR_SHARE = 0.2
SCHEDULES = ("cosine", "linear", "constant", "wsd")  # train.schedule: the decay after warm-up (train/optim.py)


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL  # HF directory, built-in asset name, or config:<arch>
    dtype: str = "float32"  # storage dtype of the base weights: float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    quantize: str | None = None  # none | nf4 | int8 (the frozen base; LoRA-family methods)
    tokenizer: str | None = None  # defaults to the model's own
    config_overrides: dict = field(default_factory=dict)  # for config:<arch>, e.g. {n_layer: 2}
    attn_implementation: str | None = None  # sdpa | eager (None: transformers' default)
    gradient_checkpointing: bool = False
    checkpoint_layers: float = 1.0  # with gradient_checkpointing: the share of decoder layers recomputed
    seed: int | None = None  # init seed for config:<arch> models (default: train.seed)

    def validate(self) -> None:
        from .validate import finite

        finite(self.checkpoint_layers, "model.checkpoint_layers", 0.0, 1.0, low_open=True)


@dataclass
class DataConfig:
    path: str | None = None  # file or directory; None means the built-in quickstart task
    format: str = "auto"  # auto | alpaca | sharegpt | messages | text | preference
    template: str = "auto"  # auto | chat (the tokenizer's) | alpaca | vicuna | default | chatml | qwen | llama3 | gemma
    system: str | None = None  # system prompt for templates that have one
    max_length: int = 512  # tokens per example (and per packed row)
    max_prompt_length: int | None = None  # preference data: a longer prompt keeps its last tokens
    eval_split: float = 0.05  # fraction (< 1) or count (>= 1) of records held out for eval
    eval_path: str | None = None  # a separate eval file (or registry name) instead of a split
    skip_bad_records: bool = False  # skip malformed records (counted) instead of stopping
    train_on_prompt: bool = False  # also learn the prompt tokens (labels not masked)
    packing: bool = False  # pack several examples into one row (block-diagonal attention)
    shuffle: bool = True
    train: list[str] = field(default_factory=list)  # dataset names from data.registry, or paths
    registry: str | None = None  # dataset registry file (YAML/JSON; LLaMA-Factory's dataset_info.json works)
    columns: dict = field(default_factory=dict)  # for data.path: our field name -> the file's field name
    placeholders: dict = field(default_factory=dict)  # {{key}} -> value, e.g. {name: peftlab, author: me}
    mix: dict = field(default_factory=dict)  # dataset name -> sampling weight (share of the training set)
    mix_size: int | None = None  # training records after mixing (default: as many as before)
    dedup: bool = True  # remove exact-duplicate records (counted)
    source_length: int | None = None  # max tokens of each prompt message's content
    target_length: int | None = None  # max tokens of each answer's content
    overlong: str = "truncate"  # over max_length: truncate | drop_oldest (turns) | drop (the record)
    objective: str = "auto"  # sft | pretrain (labels = ids, fixed blocks) | preference | auto (from the records)
    block_size: int | None = None  # pre-training block length (default: max_length)
    group_by_length: bool = False  # batches of similar length (the non-packed way to cut padding)
    streaming: bool = False  # read the training data as a stream (one window in memory; needs eval_path)

    def validate(self) -> None:
        from .validate import check_data_settings

        check_data_settings(self)


OBJECTIVES = ("lm", "dpo", "orpo", "simpo", "kto", "reward", "grpo")  # train.objective (train/pref_setup.py)
DPO_LOSSES = ("sigmoid", "ipo", "robust")
REFERENCES = ("auto", "adapter_off", "frozen_copy", "precomputed", "none")


@dataclass
class PreferenceConfig:
    """The knobs of the preference objectives, named as in their papers (and TRL)."""

    loss: str = "sigmoid"  # dpo: sigmoid (DPO) | ipo (IPO) | robust (rDPO, label_smoothing = flip rate)
    beta: float = 0.1  # DPO/IPO/KTO: the KL strength; SimPO: the reward scale; ORPO: no effect
    label_smoothing: float = 0.0  # dpo sigmoid/robust and simpo: assumed rate of flipped labels, < 0.5
    simpo_gamma: float = 0.5  # SimPO's target reward margin (γ)
    orpo_lambda: float = 0.1  # ORPO's λ: weight of the odds-ratio term beside the NLL (TRL's beta)
    desirable_weight: float = 1.0  # KTO's λ_D
    undesirable_weight: float = 1.0  # KTO's λ_U
    reference: str = "auto"  # auto | adapter_off | frozen_copy | precomputed | none (dpo, kto)
    center_rewards: float = 0.0  # reward model: weight of mean((r_c + r_r)^2) (TRL's center_rewards_coefficient)

    def validate(self) -> None:
        from .validate import finite

        if self.loss not in DPO_LOSSES:
            raise ConfigError(f"pref.loss {self.loss!r} is not one of {', '.join(DPO_LOSSES)}")
        if self.reference not in REFERENCES:
            raise ConfigError(f"pref.reference {self.reference!r} is not one of {', '.join(REFERENCES)}")
        finite(self.beta, "pref.beta", 0.0, low_open=True, hint="DPO usually takes 0.1 (0.01 to 0.5)")
        finite(self.label_smoothing, "pref.label_smoothing", 0.0, 0.5, high_open=True,
               hint="the share of pairs assumed flipped: 0 (none) to below 0.5")
        finite(self.simpo_gamma, "pref.simpo_gamma", 0.0)
        finite(self.orpo_lambda, "pref.orpo_lambda", 0.0)
        finite(self.desirable_weight, "pref.desirable_weight", 0.0)
        finite(self.undesirable_weight, "pref.undesirable_weight", 0.0)
        finite(self.center_rewards, "pref.center_rewards", 0.0)


GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
SHARE_PROMPT = ("auto", "true", "false")  # grpo.share_prompt


@dataclass
class GRPOConfig:
    """GRPO's knobs (train.objective=grpo), named as TRL's GRPOConfig names them. A step trains on
    train.batch_size prompts per micro-batch, each with num_generations sampled completions."""

    loss_type: str = "grpo"  # grpo (mean per completion) | bnpo (mean per token) | dr_grpo (sum / (rows x max len))
    num_generations: int = 8  # completions per prompt (the group the advantage is relative to)
    temperature: float = 1.0  # sampling temperature (log-probabilities are taken at the same temperature)
    top_p: float = 1.0  # nucleus sampling
    max_completion_length: int = 32  # new tokens per completion
    beta: float = 0.0  # KL coefficient (k3 estimator against the model with adapters off); 0: no reference pass
    epsilon: float = 0.2  # clip range below (and above, unless epsilon_high)
    epsilon_high: float | None = None  # DAPO's upper clip range (None: epsilon)
    num_iterations: int = 1  # optimiser steps per generation batch (TRL's num_iterations, μ)
    scale_rewards: str = "group"  # group | batch | none: divide advantages by the group's (batch's) std, or not
    rewards: list[str] = field(default_factory=lambda: ["exact_match"])  # built-in names, module:fn, path.py:fn
    reward_weights: list[float] | None = None  # one per reward (None: all 1)
    format_pattern: str | None = None  # the `format` reward: 1 when the completion matches this regex
    log_completions: int = 4  # sampled completions written to metrics.jsonl at each evaluation
    share_prompt: str = "auto"  # auto | true | false: each prompt's forward runs once for its group (train/grpo_share.py)

    def validate(self) -> None:
        from .validate import finite

        if self.loss_type not in GRPO_LOSSES:
            raise ConfigError(f"grpo.loss_type {self.loss_type!r} is not one of {', '.join(GRPO_LOSSES)}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"grpo.scale_rewards {self.scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)}")
        if self.num_generations < 2:
            raise ConfigError(f"grpo.num_generations must be >= 2 (an advantage is relative to the other "
                              f"completions of the same prompt), got {self.num_generations}")
        for key in ("max_completion_length", "num_iterations"):
            if getattr(self, key) < 1:
                raise ConfigError(f"grpo.{key} must be >= 1, got {getattr(self, key)}")
        if self.log_completions < 0:
            raise ConfigError(f"grpo.log_completions must be >= 0, got {self.log_completions}")
        spelled = {"on": "true", "yes": "true", "1": "true", "off": "false", "no": "false", "0": "false"}
        self.share_prompt = spelled.get(str(self.share_prompt).lower(), str(self.share_prompt).lower())
        if self.share_prompt not in SHARE_PROMPT:
            raise ConfigError(f"grpo.share_prompt {self.share_prompt!r} is not one of {', '.join(SHARE_PROMPT)}")
        finite(self.temperature, "grpo.temperature", 0.0, low_open=True,
               hint="GRPO samples its completions; 0.7 to 1.0 is usual")
        finite(self.top_p, "grpo.top_p", 0.0, 1.0, low_open=True)
        finite(self.beta, "grpo.beta", 0.0, hint="0 turns the KL term (and the reference pass) off")
        finite(self.epsilon, "grpo.epsilon", 0.0, low_open=True)
        if self.epsilon_high is not None:
            finite(self.epsilon_high, "grpo.epsilon_high", 0.0, low_open=True)
        if not self.rewards:
            raise ConfigError("grpo.rewards is empty; name at least one reward (e.g. exact_match, or module:function)")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(f"grpo.reward_weights has {len(self.reward_weights)} weights for {len(self.rewards)} "
                              f"rewards ({', '.join(self.rewards)}); give one weight per reward")
        if self.reward_weights is not None:
            for i, w in enumerate(self.reward_weights):
                finite(w, f"grpo.reward_weights[{i}]")


@dataclass
class TrainConfig:
    objective: str = "lm"  # one of OBJECTIVES: lm (next-token loss; SFT, pre-training) | dpo | orpo | simpo | kto | reward
    lr: float | None = None  # None: the method's own default (LoRA family 5e-4, full 5e-5; see default_lr)
    steps: int | None = None  # optimiser steps; None means train.epochs over the data
    epochs: float = 1.0
    batch_size: int = 4  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    warmup: int | float = 0.03  # a share of the run's steps below 1 (0.03) or a whole count of steps (10); not 1.0
    schedule: str = "wsd"  # one of SCHEDULES: wsd | constant | cosine | linear (benchmarks/recipes.py chose wsd)
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio
    decay: float = 0.2  # wsd: the share of the steps after warm-up spent decaying (linearly)
    weight_decay: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float | None = 1.0  # None or 0 disables clipping
    eval_every: int = 50  # optimiser steps between eval-loss passes (0: only at the end)
    eval_batches: int | None = None  # cap eval at this many batches (None: the whole split)
    log_every: int = 1
    save_every: int = 0  # optimiser steps between checkpoints (0: only the final save)
    save_total_limit: int = 2  # checkpoints kept (the newest good one is never deleted)
    output_dir: str = "runs/latest"
    overwrite: bool = False  # replace a finished or stopped run in output_dir instead of refusing
    seed: int = 42
    mixed_precision: str = "auto"  # auto | bf16 | fp16 | no
    threads: int = 0  # CPU threads for torch (0: the cores actually free)
    progress: bool = True
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    distributed: str = "ddp"  # ddp | fsdp (ZeRO-3-like) | fsdp_grad_op (ZeRO-2-like); under torchrun only
    deepspeed: str | None = None  # a DeepSpeed JSON (ds_z3_config.json): mapped onto these keys at load (ds_config.py)
    # speed levers (benchmarks/README.md measures each one)
    fused_loss: bool = True  # LM head + CE in chunks whose backward keeps no logits
    loss_chunk: int = 1024  # label rows per LM-head chunk
    fast_lora: bool = True  # LoRA layers without dropout run one autograd function saving only x
    skip_pad_mask: bool = True  # right-padded batches: causal attention without the padding mask
    unpad: bool = True  # right-padded batches run their real tokens only, as one row (train/unpad.py)
    compile: bool = False  # torch.compile the backbone (slow first steps; recompiles per shape)

    def validate(self) -> None:
        """Every value the loop relies on, checked where the config is built."""
        from .validate import check_path, finite, warmup_setting

        for key in ("batch_size", "grad_accum", "max_bad_steps", "loss_chunk"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "log_every", "save_every", "save_total_limit", "threads", "seed"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1 (or none to train by epochs), got {self.steps}")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ConfigError(f"train.eval_batches must be >= 1 (or none for all), got {self.eval_batches}")
        if self.lr is not None:  # None is filled with the method's default by Config
            finite(self.lr, "train.lr", 0.0, low_open=True,
                   hint="a learning rate of 0 trains nothing; LoRA usually takes 1e-4 to 1e-3")
        finite(self.epochs, "train.epochs", 0.0, low_open=True)
        self.warmup = warmup_setting(self.warmup)
        finite(self.min_lr_ratio, "train.min_lr_ratio", 0.0, 1.0)
        finite(self.decay, "train.decay", 0.0, 1.0, low_open=True)
        finite(self.weight_decay, "train.weight_decay", 0.0)
        if self.max_grad_norm is not None:
            finite(self.max_grad_norm, "train.max_grad_norm", 0.0)
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas must be two numbers, e.g. [0.9, 0.999]; got {self.adam_betas!r}")
        self.adam_betas = [finite(coerce(b, float, f"train.adam_betas[{i}]"), f"train.adam_betas[{i}]", 0.0, 1.0,
                                  high_open=True) for i, b in enumerate(self.adam_betas)]
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no", "fp32", "none", "false", "off"):
            raise ConfigError(f"train.mixed_precision {self.mixed_precision!r} is not one of auto, bf16, fp16, no")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"train.objective {self.objective!r} is not one of {', '.join(OBJECTIVES)} "
                              "(the preference objectives take their knobs from the pref section)")
        if self.distributed not in ("ddp", "fsdp", "fsdp_grad_op"):
            raise ConfigError(f"train.distributed {self.distributed!r} is not one of ddp, fsdp, fsdp_grad_op")
        check_path(self.output_dir, "train.output_dir")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: Any = None  # the method's config dataclass instance
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pref: PreferenceConfig = field(default_factory=PreferenceConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    notes: list = field(default_factory=list, repr=False, compare=False)  # what loading mapped (not saved)

    def __post_init__(self) -> None:
        if self.train.lr is None and self.peft is not None:
            self.train.lr = default_lr(self.peft, self.train.objective)

    def to_dict(self) -> dict:
        return {
            "model": dataclasses.asdict(self.model),
            "peft": dataclasses.asdict(self.peft),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "pref": dataclasses.asdict(self.pref),
            "grpo": dataclasses.asdict(self.grpo),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def default_lr(peft_cfg: Any, objective: str = "lm") -> float:
    """The learning rate a run of this method and objective gets when train.lr is not given."""
    lr = float(getattr(peft_cfg, "default_lr", DEFAULT_LR))
    return lr * GRPO_LR_SHARE if objective == "grpo" else lr


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "pref": PreferenceConfig,
            "grpo": GRPOConfig}
DEFAULT_METHOD = "lora"


# ---------------------------------------------------------------------------- value coercion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        if isinstance(value, str) and int in args and float in args:
            value = _number(value)  # "1" -> 1, "1.0" -> 1.0: which one was written can matter (train.warmup)
        # a value that already has one of the types keeps it (1 stays an int, 1.0 a float, in int | float)
        args = sorted(args, key=lambda a: (typing.get_origin(a) or a) is not type(value))
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key {key!r}: cannot be {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads no/yes/off/on as booleans
            return str(value).lower()
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"config key {key!r}: unsupported type {_type_name(tp)}")


def _number(text: str) -> int | float | str:
    """The number a string spells, int or float as written; the string itself when it is no number."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def build_dataclass(cls: type, raw: dict, section: str) -> Any:
    """Instantiate ``cls`` from a dict, coercing values and rejecting unknown keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in valid]
    if unknown:
        raise ConfigError(
            f"unknown config key {section}.{unknown[0]}; valid keys of {section!r}"
            + (" for this method" if section == "peft" else "")
            + f": {', '.join(valid)}"
        )
    kwargs = {k: coerce(v, hints[k], f"{section}.{k}") for k, v in raw.items()}
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


# ---------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` -> (["train", "lr"], 0.001). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.lr=1e-3)")
    key, _, value = text.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise ConfigError(
            f"override key {key!r} needs a section, e.g. train.lr; sections: model, peft, data, train, pref, grpo"
        )
    if value.strip().lower() in ("yes", "no", "on", "off", "y", "n"):
        parsed = value.strip()  # words, not YAML 1.1 booleans (train.mixed_precision=no)
    else:
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
    # keep things such as 1e-3 as numbers even where YAML 1.1 reads them as strings
    if isinstance(parsed, str):
        try:
            parsed = float(parsed) if any(c in parsed for c in ".eE") else int(parsed)
        except ValueError:
            pass
    return path, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = node[part]
        node[path[-1]] = value
    return raw


# ---------------------------------------------------------------------------- loading


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r}{where}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections")
    return raw


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """Command-line ``[CONFIG] [key=value ...]`` -> (config file or None, overrides)."""
    path, overrides = None, []
    for i, a in enumerate(args):
        if "=" in a:
            overrides.append(a)
        elif i == 0:
            path = a
        else:
            raise ConfigError(f"unexpected argument {a!r}: after the config file give key=value overrides")
    return path, overrides
