"""The board's workspace: the one directory it reads and writes, and the runs and sweeps inside it.

    WORKSPACE/
      runs/<name>/              what the board launches (``peftlab train`` writes it)
      .board/runs+<name>.json   the board's record of a launch: command, pid, start, end, return code
      .board/runs+<name>.log    the launched process's stdout and stderr
      anything else             runs and sweeps made elsewhere, found up to 4 levels deep

Every path that comes from a request goes through ``Workspace.inside``: a path with ``..``, an
absolute path outside the workspace, or one whose symlinks lead out is refused with a
``ConfigError`` naming the field. Runs are addressed by their path relative to the workspace
(``runs/lora-r8``, ``sweeps/knobs/runs/r4``), each component a plain name.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..rundir import (
    CONFIG,
    is_run_dir,
    peak_memory_bytes,
    read_json,
    read_metrics,
    read_summary,
    run_artifact,
    saved_config,
)
from ..validate import check_name, check_path

BOARD_DIR = ".board"
RUNS_DIR = "runs"
SCAN_DEPTH = 4  # runs/<name>, sweeps/<sweep>/runs/<name>
RECENT_S = 120.0  # a run not launched here whose metrics changed this recently counts as running
STEPS_RX = re.compile(r"^\w+: trainable [\d,]+ / [\d,]+ \([\d.]+%\); (\d+) steps\b", re.M)  # train's announcement


class Workspace:
    def __init__(self, root: str | Path):
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"--workspace {str(root)!r} is not a directory; create it or pick another")
        self.root = root.resolve()
        (self.root / BOARD_DIR).mkdir(exist_ok=True)

    # -------------------------------------------------------------------- path safety

    def inside(self, value: str, key: str, *, must_exist: bool = False) -> Path:
        """``value`` (relative to the workspace, or absolute) as a path inside it; ConfigError otherwise.

        Refused: ``..`` components, absolute paths outside the workspace, and paths whose symlinks
        resolve outside it (checked on the resolved path, so a link anywhere on the way counts)."""
        check_path(value, key)
        p = Path(value)
        if ".." in p.parts:
            raise ConfigError(f"{key} {value!r} contains '..'; give a path inside the workspace {self.root}")
        full = p if p.is_absolute() else self.root / p
        resolved = full.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            lexical = Path(os.path.normpath(full))
            why = ("leads outside it through a symlink" if lexical == self.root or self.root in lexical.parents
                   else "is outside it")
            raise ConfigError(f"{key} {value!r} {why}; the board reads and writes only inside the workspace "
                              f"{self.root}")
        if must_exist and not resolved.exists():
            raise ConfigError(f"{key} {value!r} does not exist in the workspace {self.root}")
        return resolved

    def run_dir(self, run_id: str, key: str = "run") -> Path:
        """The directory of run ``run_id`` (a relative path of plain names); ConfigError if it is none."""
        if isinstance(run_id, str) and run_id.startswith("/"):
            raise ConfigError(f"{key} {run_id!r} is an absolute path; a run is named by its path inside the "
                              f"workspace {self.root}, e.g. runs/NAME")
        parts = run_id.split("/") if isinstance(run_id, str) else [run_id]
        for part in parts:
            check_name(part, key)
        path = self.inside(run_id, key)
        if not (is_run_dir(path) or (path / "sweep.json").is_file() or self.record(run_id) is not None):
            raise ConfigError(f"{key} {run_id!r} is not a run or sweep in the workspace; "
                              "pick one from the runs page")
        return path

    def new_run_dir(self, name: str) -> tuple[str, Path]:
        """(run id, directory) for a new run called ``name``; refused when the name is taken."""
        check_name(name, "name")
        run_id = f"{RUNS_DIR}/{name}"
        path = self.inside(run_id, "name")
        if path.exists() or self.record(run_id) is not None:
            raise ConfigError(f"name {name!r}: a run called that exists already in {self.root / RUNS_DIR}; "
                              "choose another name")
        return run_id, path

    # -------------------------------------------------------------------- the board's launch records

    def record_path(self, run_id: str, suffix: str) -> Path:
        return self.root / BOARD_DIR / (run_id.replace("/", "+") + suffix)  # "+" is in no name: reversible

    def record(self, run_id: str) -> dict | None:
        return read_json(self.record_path(run_id, ".json"))

    def log_tail(self, run_id: str, lines: int = 40) -> str:
        """The last lines of the launched process's output (progress bars' carriage returns as lines)."""
        path = self.record_path(run_id, ".log")
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 64_000))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        rows = [r for r in text.replace("\r", "\n").split("\n") if r.strip()]
        # a progress bar redraws its line: keep only the newest drawing of each run of them
        rows = [r for i, r in enumerate(rows) if not (r.startswith("train:") and i + 1 < len(rows)
                                                       and rows[i + 1].startswith("train:"))]
        return "\n".join(rows[-lines:])

    def announced_steps(self, run_id: str) -> int | None:
        """The run's total steps as train announces them in its log ("...; 120 steps at lr 0.0005 (wsd); ..."): a run
        by epochs knows its length only once the data is loaded."""
        try:
            with open(self.record_path(run_id, ".log"), "rb") as f:
                head = f.read(16_000).decode("utf-8", errors="replace")
        except OSError:
            return None
        m = STEPS_RX.search(head)
        return int(m.group(1)) if m else None

    # -------------------------------------------------------------------- finding runs

    def find(self) -> tuple[list[str], list[str]]:
        """(run ids, sweep ids) under the workspace; symlinks are not followed."""
        runs, sweeps = [], []

        def walk(d: Path, depth: int) -> None:
            try:
                children = sorted(c for c in d.iterdir() if c.is_dir() and not c.is_symlink())
            except OSError:
                return
            for c in children:
                if c.name.startswith("."):
                    continue
                rel = c.relative_to(self.root).as_posix()
                if (c / "sweep.json").is_file():
                    sweeps.append(rel)
                elif (c / CONFIG).is_file() or self.record(rel) is not None:
                    runs.append(rel)
                    continue
                if depth < SCAN_DEPTH:
                    walk(c, depth + 1)

        walk(self.root, 1)
        for rec in sorted((self.root / BOARD_DIR).glob("*.json")):  # launched, config not written yet
            run_id = rec.stem.replace("+", "/")
            if run_id not in runs:
                runs.append(run_id)
        return runs, sweeps


@dataclass
class RunRow:
    """One line of the runs table."""

    id: str
    kind: str = "run"  # run | sweep
    status: str = "done"  # running | done | failed | killed | incomplete
    method: str = "?"
    trainable: int | None = None
    eval_loss: float | None = None
    exact_match: float | None = None
    wall_time: float | None = None
    peak_memory: int | None = None
    steps: int | None = None
    target_steps: int | None = None
    started: float | None = None
    note: str = ""
    artifact: str | None = None
    extra: dict = field(default_factory=dict)


def run_status(ws: Workspace, run_id: str, path: Path, running: set[str]) -> tuple[str, str]:
    """(status, note) of a run: the board's own record first, then what the directory holds."""
    if run_id in running:
        return "running", ""
    rec = ws.record(run_id) or {}
    summary = read_summary(path)
    if rec.get("stopped"):
        return "killed", "stopped from the board"
    if "returncode" in rec and rec["returncode"] != 0:
        return "failed", f"exit status {rec['returncode']}"
    if summary is not None:
        return "done", ""
    result = read_json(path / "result.json") or {}
    if result.get("train_info", {}).get("status") == "failed":
        return "failed", (result.get("run_info", {}).get("error_msg") or "")[:200]
    metrics = path / "metrics.jsonl"
    if metrics.is_file() and time.time() - metrics.stat().st_mtime < RECENT_S:
        return "running", "started outside the board"
    return "incomplete", "no summary.json: stopped or crashed outside the board"


def run_row(ws: Workspace, run_id: str, running: set[str]) -> RunRow:
    path = ws.root / run_id
    row = RunRow(run_id)
    row.status, row.note = run_status(ws, run_id, path, running)
    rec = ws.record(run_id) or {}
    row.started = rec.get("started")
    try:
        row.method = str(((saved_config(path) or {}).get("peft") or {}).get("method", "?"))
    except ConfigError:
        row.method = "?"
    summary = read_summary(path) or {}
    metrics = read_metrics(path)
    row.trainable = summary.get("trainable")
    row.eval_loss = summary.get("eval_loss")
    if row.eval_loss is None:
        evals = [r["eval_loss"] for r in metrics if r.get("eval_loss") is not None]
        row.eval_loss = evals[-1] if evals else None
    scores = read_json(path / "eval" / "metrics.json") or {}
    row.exact_match = scores.get("exact_match")
    row.wall_time = summary.get("wall_time_s")
    row.peak_memory = peak_memory_bytes(summary) if summary else None
    row.steps = summary.get("steps") or (metrics[-1].get("step") if metrics else None)
    row.target_steps = summary.get("target_steps") or rec.get("target_steps") or ws.announced_steps(run_id)
    artifact = run_artifact(path)
    row.artifact = artifact.name if artifact else None
    return row


def sweep_row(ws: Workspace, sweep_id: str, rows: list[RunRow]) -> RunRow:
    plan = read_json(ws.root / sweep_id / "sweep.json") or {}
    mine = [r for r in rows if r.id.startswith(sweep_id + "/")]
    statuses = {r.status for r in mine}
    status = next((s for s in ("running", "failed", "killed", "incomplete") if s in statuses), "done")
    if len(mine) < len(plan.get("runs", [])) and status == "done":
        status = "incomplete"
    methods = sorted({r.method for r in mine})
    losses = [r.eval_loss for r in mine if r.eval_loss is not None]
    return RunRow(sweep_id, kind="sweep", status=status, method=", ".join(methods) or "?",
                  eval_loss=min(losses) if losses else None,
                  wall_time=sum(r.wall_time for r in mine if r.wall_time) or None,
                  note=f"{len(mine)} of {len(plan.get('runs', []))} runs")
