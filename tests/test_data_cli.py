"""``peftlab data inspect`` end to end, and the training loop on packed and length-grouped data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import peftlab
from conftest import tiny_overrides, tokenizer_for
from peftlab.cli import main
from peftlab.configure import load_config
from peftlab.data.dataset import build_datasets
from peftlab.errors import ConfigError
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


def metrics(run_dir):
    return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
            for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stream_cfg(out, path, eval_path, *extra):
    return load_config(None, [*tiny_overrides("gpt2"), f"data.path={path}", f"data.eval_path={eval_path}",
                              "data.template=alpaca", "data.max_length=64", "data.eval_split=0",
                              "data.objective=sft", "train.batch_size=2", "train.progress=false",
                              "train.mixed_precision=no", "train.threads=1", "train.eval_every=3", "train.lr=1e-2",
                              f"train.output_dir={out}", *extra])


def test_streaming_trains_on_the_same_tokens_as_in_memory(tmp_path):
    path, eval_path = data_file(tmp_path, n=30), tmp_path / "eval.jsonl"
    eval_path.write_text(json.dumps({"instruction": "Say 7", "output": "7 7"}) + "\n")
    common = ["train.steps=6", "data.shuffle=false"]
    memory = train(stream_cfg(tmp_path / "m", path, eval_path, *common))
    stream = train(stream_cfg(tmp_path / "s", path, eval_path, *common, "data.streaming=true"))
    assert type(stream.data.train).__name__ == "TrainStream" and len(stream.data.train) == len(memory.data.train)
    assert metrics(tmp_path / "s") == metrics(tmp_path / "m")  # same batches, same losses, bit for bit


def test_streaming_resumes_exactly(tmp_path, monkeypatch, capsys):
    import shutil

    from safetensors.torch import load_file

    from peftlab.data import stream

    monkeypatch.setattr(stream, "WINDOW", 8)  # 30 examples: four windows, shuffled inside each
    path, eval_path = data_file(tmp_path, n=30), tmp_path / "eval.jsonl"
    eval_path.write_text(json.dumps({"instruction": "Say 7", "output": "7 7"}) + "\n")
    # 15 batches an epoch: resuming at step 9 lands mid-epoch, inside the second window
    args = ["train.steps=20", "train.save_every=9", "train.save_total_limit=5", "data.streaming=true"]
    full = train(stream_cfg(tmp_path / "a", path, eval_path, *args))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name in ("step-000018", "step-000020"):
        shutil.rmtree(tmp_path / "b" / "checkpoints" / name)
    shutil.rmtree(tmp_path / "b" / "adapter")
    capsys.readouterr()
    resumed = train(stream_cfg(tmp_path / "b", path, eval_path, *args), resume=True)
    assert "at step 9" in capsys.readouterr().err
    a, b = (load_file(str(r.artifact / "adapter_model.safetensors")) for r in (full, resumed))
    assert all(a[k].equal(b[k]) for k in a)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert resumed.data.train._rows and len(resumed.data.train._rows) <= 8  # one window in memory


def test_streaming_config_errors(tmp_path):
    path = data_file(tmp_path)
    with pytest.raises(ConfigError, match="cannot hold out a random split"):
        build_datasets(load_config(None, [f"data.path={path}", "data.streaming=true", "data.objective=sft"]).data,
                       tokenizer_for("gpt2"), 0)
    with pytest.raises(ConfigError, match="does not combine with data.group_by_length"):
        build_datasets(load_config(None, [f"data.path={path}", "data.streaming=true", "data.group_by_length=true",
                                          "data.objective=sft", "data.eval_split=0"]).data, tokenizer_for("gpt2"), 0)


def test_streaming_packs_like_memory_window_by_window(tmp_path, monkeypatch):
    """data.streaming + data.packing: a corpus within one window packs exactly as in memory; a
    larger one packs each window on its own (rows never mix two windows), and the loop trains on it."""
    from peftlab.data import stream
    from peftlab.data.packing import pack_examples

    path, eval_path = data_file(tmp_path, n=30), tmp_path / "eval.jsonl"
    eval_path.write_text(json.dumps({"instruction": "Say 7", "output": "7 7"}) + "\n")
    base = [f"data.path={path}", "data.objective=sft", "data.eval_split=0", "data.template=alpaca",
            "data.max_length=128", "data.packing=true"]
    tok = tokenizer_for("gpt2")
    memory = build_datasets(load_config(None, base).data, tok, 0)
    streamed = build_datasets(load_config(None, [*base, "data.streaming=true"]).data, tok, 0)
    rows = lambda d: [(e.input_ids, e.labels, e.seq_lens) for e in (d.train[i] for i in range(len(d.train)))]  # noqa: E731
    assert streamed.packing and rows(streamed) == rows(memory)
    assert streamed.stats.packed_from == memory.stats.packed_from == 30 and len(memory.train) < 30

    monkeypatch.setattr(stream, "WINDOW", 8)
    small = build_datasets(load_config(None, [*base, "data.streaming=true"]).data, tok, 0)
    plain = build_datasets(load_config(None, [f"data.path={path}", "data.objective=sft", "data.eval_split=0",
                                              "data.template=alpaca", "data.max_length=128"]).data, tok, 0)
    expected = [r for i in range(0, 30, 8) for r in pack_examples(plain.train[i:i + 8], 128)]
    assert rows(small) == [(e.input_ids, e.labels, e.seq_lens) for e in expected]
    result = train(stream_cfg(tmp_path / "s", path, eval_path, "train.steps=4", "data.streaming=true",
                              "data.packing=true", "data.max_length=128"))
    assert result.steps == 4 and type(result.data.train).__name__ == "TrainStream"
    assert result.data.stats.packed_from == 30 and len(result.data.train) < 30 and result.data.packing
