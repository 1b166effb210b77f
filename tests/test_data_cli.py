"""``peftlab data inspect`` end to end, and the training loop on packed and length-grouped data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import peftlab
from conftest import tiny_overrides
from peftlab.cli import main
from peftlab.config import load_config
from peftlab.train.loop import train

SRC = str(Path(peftlab.__file__).resolve().parents[1])


def cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "peftlab", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def data_file(tmp_path, n=40, bad=False):
    recs = [{"instruction": f"Say {i} twice" + " please" * (i % 9), "output": f"{i} {i}"} for i in range(n)]
    lines = [json.dumps(r) for r in recs]
    if bad:
        lines.insert(3, json.dumps({"instruction": "no output here"}))
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_inspect_prints_example_histogram_counts_and_padding(tmp_path, capsys):
    path = data_file(tmp_path, bad=True)
    args = ["data", "inspect", "model.name=config:gpt2", f"data.path={path}", "data.template=alpaca",
            "train.batch_size=4", "data.max_length=64"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{path} line 4: missing field 'output'" in err and "--skip-bad-records" in err
    r = cli(*args, "--skip-bad-records", "--no-color")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "1 bad records skipped" in out and f"skipped: {path} line 4" in out
    assert "### Response:\n⟦" in out and "<|endoftext|>⟧" in out  # the trained span, eos inside it
    assert "token lengths of" in out and "padding waste, batch 4" in out and "packing into rows of 64" in out


def run_cfg(tmp_path, path, extra):
    return load_config(None, [*tiny_overrides("gpt2"), f"data.path={path}", "data.template=alpaca",
                              "data.max_length=128", "data.eval_split=4", "train.steps=2", "train.batch_size=2",
                              "train.progress=false", "train.eval_every=0", f"train.output_dir={tmp_path / 'run'}",
                              "train.overwrite=true", *extra])


def test_training_runs_on_packed_and_grouped_data(tmp_path):
    path = data_file(tmp_path)
    for extra in (["data.packing=true"], ["data.group_by_length=true"]):
        result = train(run_cfg(tmp_path, path, extra))
        assert result.steps == 2 and all(math.isfinite(m["loss"]) for m in result.metrics)
        if extra == ["data.packing=true"]:
            assert all(len(e.seq_lens) >= 1 for e in result.data.train)
            assert result.data.stats.packed_from > len(result.data.train)
