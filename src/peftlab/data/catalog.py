"""The dataset registry file: names -> file + format + column mapping.

A YAML or JSON mapping, one entry per dataset (paths relative to the registry file)::

    alpaca_en:
      path: data/alpaca_en_demo.json      # a file, a directory, or a save_to_disk directory
      format: alpaca                      # auto | alpaca | sharegpt | messages | text | preference
    my_qa:
      path: qa.csv
      format: alpaca
      columns: {instruction: question, output: answer}   # our field name: the file's field name
      num_samples: 500                    # keep the first N records
    identity:
      path: identity.json
      placeholders: {name: peftlab, author: you}         # fills {{name}} and {{author}}

so a config says ``data.train: [alpaca_en, identity]``. LLaMA-Factory's ``dataset_info.json``
reads unchanged: ``file_name``, ``formatting`` (alpaca | sharegpt | openai), ``ranking``,
``columns`` (prompt, query, response, history, messages, system, tools, chosen, rejected) and
``tags`` (role_tag, content_tag, user_tag, ...) are translated to the keys above; an entry whose
only column is ``prompt`` is a pre-training corpus (format ``text``), as in LLaMA-Factory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import ConfigError, DataError


@dataclass
class DatasetSpec:
    """Where one dataset lives and how to read it."""

    name: str
    path: str
    format: str = "auto"
    columns: dict = field(default_factory=dict)  # canonical field name -> the file's field name
    split: str | None = None  # for save_to_disk DatasetDicts
    num_samples: int | None = None  # keep only the first N records
    placeholders: dict = field(default_factory=dict)  # {{key}} -> value in every message


NATIVE_KEYS = ("path", "format", "columns", "split", "num_samples", "placeholders")
# LLaMA-Factory's column names -> ours
LF_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "messages": "conversations"}
LF_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
           "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}


def _from_llamafactory(name: str, raw: dict, where: str) -> dict:
    for remote in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url"):
        if remote in raw and "file_name" not in raw:
            raise DataError(f"{where}: dataset {name!r} is remote ({remote}); nothing is downloaded here — "
                            "download it once and give its local file as path:")
    out = {"path": raw["file_name"]}
    formatting = raw.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise DataError(f"{where}: dataset {name!r}: formatting {formatting!r} is not alpaca, sharegpt or openai")
    # LLaMA-Factory's "openai" formatting is ShareGPT under other names: messages / role / content.
    cols = ({"conversations": "messages", "from": "role", "value": "content", "human": "user",
             "gpt": "assistant"} if formatting == "openai" else {})
    for lf_name, theirs in (raw.get("columns") or {}).items():
        cols[LF_COLUMNS.get(lf_name, lf_name)] = theirs
    for tag, theirs in (raw.get("tags") or {}).items():
        if tag in LF_TAGS:
            cols[LF_TAGS[tag]] = theirs
    out["format"] = "preference" if raw.get("ranking") else ("alpaca" if formatting == "alpaca" else "sharegpt")
    if set(raw.get("columns") or {}) == {"prompt"} and formatting == "alpaca" and not raw.get("ranking"):
        out["format"], cols = "text", {"text": raw["columns"]["prompt"]}  # a pre-training corpus
    out["columns"] = cols
    for key in ("split", "num_samples"):
        if key in raw:
            out[key] = raw[key]
    return out


def load_registry(path: str | Path) -> dict[str, DatasetSpec]:
    """Read a registry file; relative paths are resolved against the file's directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.registry {str(path)!r} does not exist")
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"data.registry {str(path)!r} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"data.registry {str(path)!r}: expected a mapping of dataset names to entries")
    out = {}
    for name, entry in raw.items():
        where = f"data.registry {path}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: entry {name!r} must be a mapping (path:, format:, columns:)")
        if "file_name" in entry or any(k in entry for k in ("hf_hub_url", "ms_hub_url", "script_url")):
            entry = _from_llamafactory(name, entry, where)
        unknown = [k for k in entry if k not in NATIVE_KEYS]
        if unknown:
            raise ConfigError(f"{where}: entry {name!r} has unknown key {unknown[0]!r}; valid keys: "
                              f"{', '.join(NATIVE_KEYS)} (or LLaMA-Factory's file_name, formatting, columns, tags)")
        if "path" not in entry:
            raise ConfigError(f"{where}: entry {name!r} has no path:")
        p = str(entry["path"])
        if not p.startswith("builtin:") and not Path(p).is_absolute():
            p = str((path.parent / p).resolve())
        for key in ("columns", "placeholders"):
            if not isinstance(entry.get(key, {}), dict):
                raise ConfigError(f"{where}: entry {name!r}: {key} must be a mapping")
        out[str(name)] = DatasetSpec(
            name=str(name), path=p, format=str(entry.get("format", "auto")),
            columns={str(k): str(v) for k, v in (entry.get("columns") or {}).items()},
            split=entry.get("split"),
            num_samples=int(entry["num_samples"]) if entry.get("num_samples") is not None else None,
            placeholders={str(k): str(v) for k, v in (entry.get("placeholders") or {}).items()},
        )
    return out


def resolve(items: list[str], data_cfg, key: str = "data.train") -> list[DatasetSpec]:
    """Dataset names (from ``data.registry``) or paths -> specs. A path takes ``data.format``/``columns``."""
    registry = load_registry(data_cfg.registry) if data_cfg.registry else {}
    specs = []
    for item in items:
        if item in registry:
            specs.append(registry[item])
        elif item.startswith("builtin:") or Path(item).exists():
            specs.append(DatasetSpec(name=item, path=item, format=data_cfg.format, columns=dict(data_cfg.columns)))
        else:
            known = f"; datasets in {data_cfg.registry}: {', '.join(registry)}" if registry else \
                " and no data.registry is set to look names up in"
            raise ConfigError(f"{key} item {item!r} is neither an existing file or directory{known}")
    return specs
