"""Launching ``peftlab train`` as a subprocess, watching it, and stopping it cleanly.

A launch runs ``python -m peftlab train key=value ... train.output_dir=runs/<name>`` in the
workspace (so relative paths mean what they mean on the command line), in its own process group,
with stdout and stderr in ``.board/runs+<name>.log``. The board's record (``.json`` beside it) holds the
command, pid, start and, once it ends, the end time and the return code. "Stop" sends SIGINT
(the CLI's KeyboardInterrupt path: it prints "interrupted" and exits 130), then SIGTERM and
SIGKILL if the process is still there after ``grace`` seconds. One run at a time unless the board
was started with ``--parallel N``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..io import atomic_write_text
from .workspace import Workspace

RUN_TRAIN = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from peftlab.cli import main; sys.exit(main(['train', *sys.argv[1:]]))")


@dataclass
class Job:
    run_id: str
    proc: subprocess.Popen
    record: dict
    stopping: bool = False


class Jobs:
    def __init__(self, ws: Workspace, max_running: int = 1, grace: float = 15.0):
        if max_running < 1:
            raise ConfigError(f"--parallel must be >= 1, got {max_running}")
        self.ws, self.max_running, self.grace = ws, max_running, grace
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def running(self) -> set[str]:
        with self._lock:
            return {rid for rid, j in self._jobs.items() if j.proc.poll() is None}

    def _write(self, run_id: str, record: dict) -> None:
        atomic_write_text(self.ws.record_path(run_id, ".json"), json.dumps(record, indent=2))

    def launch(self, run_id: str, overrides: list[str], target_steps: int | None = None) -> dict:
        """Start ``peftlab train`` for ``run_id``; ConfigError when the board is at its limit."""
        with self._lock:
            busy = [rid for rid, j in self._jobs.items() if j.proc.poll() is None]
            if len(busy) >= self.max_running:
                raise ConfigError(f"{', '.join(busy)} is still running; the board runs {self.max_running} "
                                  "at a time (stop it first, or start the board with --parallel N)")
            # SIGINT is the board's clean stop. A board started in the background of a non-interactive shell
            # has SIGINT ignored, and Python leaves an inherited SIG_IGN alone, so the child restores the
            # KeyboardInterrupt handler before running the CLI (the stop would otherwise wait for SIGTERM).
            cmd = [sys.executable, "-c", RUN_TRAIN, *overrides]
            src = str(Path(__file__).resolve().parents[2])  # the child runs this same peftlab
            path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
            log = open(self.ws.record_path(run_id, ".log"), "wb")
            try:
                proc = subprocess.Popen(cmd, cwd=self.ws.root, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            finally:
                log.close()
            record = {"command": ["peftlab", "train", *overrides], "pid": proc.pid, "started": time.time(),
                      "target_steps": target_steps}
            self._write(run_id, record)
            job = self._jobs[run_id] = Job(run_id, proc, record)
        threading.Thread(target=self._watch, args=(job,), daemon=True, name=f"board-{run_id}").start()
        return record

    def _watch(self, job: Job) -> None:
        code = job.proc.wait()
        job.record.update(ended=time.time(), returncode=code, stopped=job.stopping)
        self._write(job.run_id, job.record)

    def stop(self, run_id: str) -> dict:
        """End the run cleanly: SIGINT (the CLI's KeyboardInterrupt path; 4 x ``grace`` seconds, as a loaded
        machine can take long to reach it), then SIGTERM, then SIGKILL after ``grace`` seconds each."""
        with self._lock:
            job = self._jobs.get(run_id)
        if job is None or job.proc.poll() is not None:
            raise ConfigError(f"run {run_id!r} is not running from this board; nothing to stop")
        job.stopping = True
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(job.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                job.proc.wait(self.grace * (4 if sig == signal.SIGINT else 1))
                break
            except subprocess.TimeoutExpired:
                continue
        for _ in range(50):  # the watcher writes the record
            if "returncode" in job.record:
                break
            time.sleep(0.05)
        return job.record

    def stop_all(self) -> None:
        for run_id in self.running():
            try:
                self.stop(run_id)
            except ConfigError:
                pass
