"""The "new run" form: generated from the config dataclasses, checked by the CLI's own validator.

``schema(method)`` lists every section and key (type, default, the comment beside the field in the
source as its help, the choices where the code names them); the ``peft`` section is the chosen
method's config class. ``check(ws, values)`` turns the form's changed fields into the ``key=value``
overrides ``peftlab train`` takes, builds the config exactly as the CLI does
(``configure.load_config``), and returns either the error with the field it names or the
command line and YAML that reproduce the run. Paths in the config must stay inside the workspace.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import shlex
import typing
from functools import cache

import yaml

from .. import registry
from ..config import OBJECTIVES, SCHEDULES, SECTIONS, apply_overrides, default_lr
from ..configure import load_config
from ..errors import ConfigError, PeftlabError
from ..model.load import ASSET_ALIASES, ASSETS
from .workspace import Workspace

ORDER = ("model", "peft", "data", "train", "pref", "grpo")
CHOICES = {
    "train.schedule": SCHEDULES, "train.objective": OBJECTIVES,
    "model.dtype": ("float32", "bfloat16", "float16"), "model.device": ("auto", "cpu", "cuda"),
    "data.overlong": ("truncate", "drop_oldest", "drop"),
    "data.objective": ("auto", "sft", "pretrain", "preference"),
    "train.mixed_precision": ("auto", "bf16", "fp16", "no"),
}
# Keys whose value is a path (or a name that may be one): they must stay inside the workspace.
PATH_KEYS = ("model.name", "model.tokenizer", "data.path", "data.eval_path", "data.registry", "data.train",
             "peft.init_from", "peft.merge_first", "peft.tokenizer", "peft.adapters", "train.deepspeed",
             "grpo.rewards")
BOARD_KEYS = ("train.output_dir", "train.overwrite")  # the board decides where a run goes
KEY_RX = re.compile(r"\b(model|peft|data|train|pref|grpo)\.([A-Za-z_][A-Za-z0-9_]*)")


@cache
def _comments(cls: type) -> dict[str, str]:
    """field name -> the ``# comment`` beside it in the class's source (the form's help text)."""
    out = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return out
    for line in source.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _kind(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if len(args) == 1 else tp
    base = typing.get_origin(base) or base
    if len(args) > 1:
        return "number"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}.get(base, "str")


def as_text(value) -> str:
    """A default as the form shows it (and as an override would spell it)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def section_fields(section: str, cls: type) -> list[dict]:
    hints, notes = typing.get_type_hints(cls), _comments(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f"{section}.{f.name}" in BOARD_KEYS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        key = f"{section}.{f.name}"
        choices = CHOICES.get(key)
        if key == "peft.method":
            choices = tuple(registry.names())
        fields.append({"key": key, "name": f.name, "kind": _kind(hints[f.name]), "default": as_text(default),
                       "help": notes.get(f.name, ""), "choices": list(choices) if choices else None})
    return fields


def schema(method: str = "lora") -> dict:
    """Every section and key of a run's config, the ``peft`` section for ``method``."""
    m = registry.get(method)
    classes = {**SECTIONS, "peft": m.config_cls}
    sections = [{"name": s, "fields": section_fields(s, classes[s])} for s in ORDER]
    for f in (f for s in sections for f in s["fields"] if f["key"] == "train.lr"):
        f["default"] = as_text(default_lr(m.config_cls))  # unset, the run takes the method's own
        f["by_objective"] = {o: as_text(default_lr(m.config_cls, o)) for o in OBJECTIVES}  # the page follows train.objective
        f["help"] = f"{m.name}'s own learning rate when left as it is (train.objective=grpo takes a fifth of it)"
    return {"method": m.name, "sections": sections}


def overrides_of(values: dict) -> list[str]:
    """``{"train.lr": "1e-3", ...}`` (the fields the user changed) -> ``["train.lr=1e-3", ...]``."""
    if not isinstance(values, dict):
        raise ConfigError("values must be an object of {section.key: text}")
    out = []
    for key, text in values.items():
        if not isinstance(key, str) or not KEY_RX.fullmatch(key):
            raise ConfigError(f"{key!r} is not a config key; keys look like section.key (train.lr)")
        if key in BOARD_KEYS:
            raise ConfigError(f"{key} is set by the board (runs go to runs/<name> in the workspace); leave it out")
        if not isinstance(text, (str, int, float, bool)):
            raise ConfigError(f"{key}: give the value as text, got {text!r}")
        text = as_text(text) if not isinstance(text, str) else text
        out.append(f"{key}={text.strip() if text.strip() else 'none'}")
    return out


def _path_values(key: str, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) and key in ("data.train", "peft.merge_first", "peft.adapters", "grpo.rewards"):
        value = [v.strip() for v in value.split(",") if v.strip()]  # a list, as config.coerce splits it
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        v = str(v)
        if key == "grpo.rewards":  # a user's reward from a file: path.py:function (names and module:fn are not paths)
            if ".py:" not in v:
                continue
            v = v.rsplit(":", 1)[0]
        if re.match(r"^[a-z]+:", v) and not v.startswith("file:"):  # config:llama, builtin:tasks
            continue
        if key in ("model.name", "model.tokenizer", "peft.tokenizer") and (
                v.lower() in ASSETS or v.lower() in ASSET_ALIASES or v == "gpt2"):
            continue
        out.append(v)
    return out


def check_paths(ws: Workspace, raw: dict) -> None:
    """Every path-like value of the config stays inside the workspace (ConfigError naming the key)."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        for v in _path_values(key, (raw.get(section) or {}).get(name)):
            if v.startswith("~"):
                raise ConfigError(f"{key} {v!r} starts with '~'; give a path inside the workspace {ws.root}")
            ws.inside(v, key)


def field_of(message: str, keys) -> str | None:
    """The config key an error message is about (the first one it names that the form has)."""
    found = [f"{a}.{b}" for a, b in KEY_RX.findall(message)]
    return next((k for k in found if k in keys), found[0] if found else None)


def check(ws: Workspace, values: dict, name: str | None = None) -> dict:
    """{"ok": True, "overrides", "cli", "yaml", "config"} or {"ok": False, "field", "error"}."""
    keys = set(values) if isinstance(values, dict) else set()
    try:
        overrides = overrides_of(values)
        raw = apply_overrides({}, overrides)
        check_paths(ws, raw)
        run_id = ws.new_run_dir(name)[0] if name is not None else "runs/NAME"
        full = [*overrides, f"train.output_dir={run_id}"]
        cfg = load_config(None, full)  # the CLI's own validation, every key and value
    except PeftlabError as e:
        msg = str(e)
        field = "name" if msg.startswith("name ") else field_of(msg, keys)
        return {"ok": False, "field": field, "error": msg}
    raw.setdefault("train", {})["output_dir"] = run_id
    return {"ok": True, "overrides": full, "cli": "peftlab train " + " ".join(shlex.quote(o) for o in full),
            "yaml": yaml.safe_dump(raw, sort_keys=False), "config": cfg.to_dict(),
            "target_steps": cfg.train.steps}
