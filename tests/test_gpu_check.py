"""benchmarks/gpu_check.sh works up to the device: its dry mode runs every step on the CPU.

The CUDA figures themselves need a GPU machine; these tests make sure the script that gathers
them runs through (the slow one: the whole dry run, ~3 min on 2 busy cores) and refuses clearly
where there is no CUDA device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_the_script_says_to_use_dry(tmp_path):
    proc = run(str(tmp_path))
    assert proc.returncode == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert "no CUDA device visible to torch: run with --dry" in summary
    assert "torch " in summary and "peft:" in summary


@pytest.mark.slow
def test_dry_run_goes_through_every_step(tmp_path):
    proc = run("--dry", str(tmp_path))
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stderr[-2000:]
    assert "all steps passed" in summary and "step tests: exit 0" in summary and "step bench: exit 0" in summary
    checks = [json.loads(line)["check"] for line in (tmp_path / "measured.jsonl").read_text().splitlines()]
    assert checks == ["autocast_bf16", "autocast_fp16", "packing_sdpa", "nf4", "generation", "multi_adapter"]
    bench = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert set(bench["sides"]) == {"peftlab", "peft_trainer"}
    for side in bench["sides"].values():
        assert side["tokens_per_s"] > 0 and side["peak_rss_gb"] > 0 and side["trainable"] == 32768
    # the same random batches and the same seeded init: both sides start at the same loss
    a, b = (bench["sides"][s]["first_loss"] for s in ("peftlab", "peft_trainer"))
    assert abs(a - b) < 1e-4
    assert len(list(tmp_path.iterdir())) <= 8  # the device machine returns at most 8 files
