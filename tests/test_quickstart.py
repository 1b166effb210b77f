"""The main job end to end on the real offline model (slow: ~5 minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import peftlab

SRC = str(Path(peftlab.__file__).resolve().parents[1])


@pytest.mark.slow
def test_quickstart_improves_exact_match(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "peftlab", "quickstart", f"train.output_dir={out}", "train.progress=false"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["exact_match_after"] >= summary["exact_match_before"] + 0.3
    curve = [v for _, v in summary["eval_loss_curve"]]
    assert curve[-1] < 0.5 * curve[0]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert "exact match on" in proc.stdout
