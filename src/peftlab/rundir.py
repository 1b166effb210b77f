"""Reading a run directory, the one place that knows its layout.

``peftlab train`` writes into ``train.output_dir``::

    config.yaml      the resolved config (every default filled in)
    metrics.jsonl    one JSON record per logged step; a crash can tear the last line
    summary.json     written last: steps, losses, parameter counts, time, memory, the artifact
    adapter/         the saved adapter (PEFT methods) -- or --
    model/           the whole model (full fine-tuning), a plain Hugging Face directory
    checkpoints/     resumable state (train/checkpoint.py)

Everything that reads a run (resume, ``generate``/``eval``/``merge``/``serve`` with ``--run``,
the lab's report and sweep worker) goes through these functions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from .config import Config
from .configure import load_config
from .errors import ConfigError
from .io import atomic_write_text

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
ARTIFACTS = ("adapter", "model")  # what a finished run saved: an adapter, or the whole model


def read_json(path: str | Path) -> dict | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_metrics(path: str | Path, step: int | None = None) -> list[dict]:
    """The metric records of ``metrics.jsonl`` (``path`` is the file or its run directory), up to
    ``step`` when given; a line torn by a crash is skipped, a missing file reads as no records."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and (step is None or rec.get("step", 0) <= step):
            kept.append(rec)
    return kept


def trim_metrics(path: str | Path, step: int) -> list[dict]:
    """Keep the records up to ``step`` in ``metrics.jsonl`` (a resumed run rewrites what came after)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    kept = read_metrics(path, step)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def read_summary(run_dir: str | Path) -> dict | None:
    """``summary.json`` (present once the run finished); None when missing or damaged."""
    return read_json(Path(run_dir) / SUMMARY)


def peak_memory_bytes(summary: dict) -> int | None:
    """The training process's peak memory in bytes (CUDA allocated, else CPU peak RSS) from a summary."""
    mb = summary.get("peak_cuda_mb") or summary.get("peak_rss_mb")
    return int(mb * 2**20) if mb else None


def saved_config(run_dir: str | Path) -> dict | None:
    """The run's ``config.yaml`` as a plain mapping (no validation); None when there is none.

    Raises ConfigError naming the file when it cannot be read as YAML."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        raise ConfigError(f"{path} is damaged (not readable YAML)") from None
    return raw if isinstance(raw, dict) else None


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The run's config (``config.yaml``) with ``key=value`` overrides applied; a clear error
    naming the directory when it is not a run directory."""
    if not is_run_dir(run_dir):
        raise ConfigError(f"--run {str(run_dir)!r} is not a run directory (no {CONFIG})")
    return load_config(Path(run_dir) / CONFIG, list(overrides))


def run_artifact(run_dir: str | Path) -> Path | None:
    """What the run saved: its ``adapter/`` or (full fine-tuning) ``model/`` directory; None before
    the run finished."""
    for name in ARTIFACTS:
        if (Path(run_dir) / name).is_dir():
            return Path(run_dir) / name
    return None


def artifact_size(run_dir: str | Path) -> int | None:
    """Bytes of the saved weights: ``adapter/adapter_model.safetensors``, or the ``*.safetensors``
    of ``model/``; None when the run saved neither."""
    adapter = Path(run_dir) / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():
        return adapter.stat().st_size
    files = list((Path(run_dir) / "model").glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None
