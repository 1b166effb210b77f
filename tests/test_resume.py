"""Exact resume: a run killed with SIGKILL anywhere and resumed ends bit-identical to one that never stopped.

The reference is one uninterrupted in-process run. Each killed run is a real subprocess that
dies by SIGKILL (no cleanup, no atexit): right after a checkpoint, in the middle of writing
one, or whenever the test's poller sees training under way. The resumed run must reproduce
the reference's adapter bit for bit and its metrics.jsonl line for line (except the wall-clock
``tokens_per_s``). Dropout is on, so the RNG states must come back too.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import tiny_overrides
from peftlab.configure import load_config
from peftlab.io import atomic_dir, sweep_stale
from peftlab.train import checkpoint as ckpt
from peftlab.train.loop import train

SRC = str(Path(peftlab.__file__).resolve().parents[1])
STEPS = 20  # 60 train examples / (2 x 2) = 15 steps per epoch: the run crosses an epoch boundary


def write_data(path: Path, n: int = 64) -> Path:
    r = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            a, b = r.randint(0, 99), r.randint(0, 99)
            f.write(json.dumps({"instruction": f"Add {a} and {b}.", "output": f"{a} plus {b} is {a + b}."}) + "\n")
    return path


def overrides(data: Path, out: Path, **extra) -> list[str]:
    base = {
        "data.path": data, "data.eval_split": 4, "data.max_length": 48, "peft.r": 4, "peft.dropout": 0.1,
        "train.steps": STEPS, "train.batch_size": 2, "train.grad_accum": 2, "train.lr": 1e-3,
        "train.save_every": 3, "train.save_total_limit": 2, "train.eval_every": 5, "train.threads": 1,
        "train.mixed_precision": "no", "train.progress": False, "train.output_dir": out,
    }
    base.update(extra)
    return tiny_overrides("llama") + [f"{k}={v}" for k, v in base.items()]


def run_in_process(args: list[str], resume: bool = False):
    return train(load_config(None, args), resume=resume)


KILLER = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from peftlab.configure import load_config
    from peftlab.train.loop import train
    mode, k, args = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    callbacks = []
    if mode == "after_step":          # dies right after step k is logged
        callbacks.append(lambda rec: rec["step"] == k and os.kill(os.getpid(), signal.SIGKILL))
    elif mode == "mid_checkpoint":    # dies inside the k-th checkpoint write: files written, no manifest, no rename
        import peftlab.io as io
        calls, original = [0], io.write_manifest
        def write_manifest(d):
            calls[0] += 1
            if calls[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            original(d)
        io.write_manifest = write_manifest
    train(load_config(None, args), resume=True, callbacks=callbacks)
""")


def run_killed(tmp: Path, args: list[str], mode: str, k: int) -> int:
    script = tmp / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), mode, str(k), json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode


class Stop(Exception):
    """Ends an in-process run early (where how it stops does not matter)."""


def stop_at(step: int):
    def cb(rec: dict) -> None:
        if rec["step"] == step:
            raise Stop
    return cb


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("tokens_per_s")  # wall-clock, the one field that may differ
    return rows


def assert_same_run(run: Path, ref: Path) -> None:
    a, b = adapter(run), adapter(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert metrics(run) == metrics(ref)
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "add.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    run_in_process(overrides(data, out))
    return out


def test_reference_is_deterministic_and_checkpoints_rotate(reference, data, tmp_path):
    """Two uninterrupted runs agree bitwise (else no resume test could), and rotation keeps 2."""
    out = tmp_path / "again"
    run_in_process(overrides(data, out))
    assert_same_run(out, reference)
    steps = [s for s, _ in ckpt.list_checkpoints(reference)]
    assert steps == [18, 20]
    state = json.loads((reference / "checkpoints" / "step-000020" / "trainer_state.json").read_text())
    assert state["sampler"] == {"epoch": 1, "position": 10}  # 40 micro-batches, 30 per epoch
    assert state["step"] == STEPS and len(state["rng"]) == 1


def test_sigkill_after_checkpoint_then_resume_is_exact(reference, data, tmp_path):
    out = tmp_path / "run"
    args = overrides(data, out)
    assert run_killed(tmp_path, args, "after_step", 7) == -signal.SIGKILL
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3, 6]
    assert max(r["step"] for r in metrics(out)) == 7  # step 7 was logged, its work is lost
    run_in_process(args, resume=True)
    assert_same_run(out, reference)


def test_sigkill_while_writing_a_checkpoint_then_resume_is_exact(reference, data, tmp_path):
    out = tmp_path / "run"
    args = overrides(data, out)
    assert run_killed(tmp_path, args, "mid_checkpoint", 3) == -signal.SIGKILL  # inside the step-9 write
    root = out / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3, 6]
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".step-000009.tmp-")]
    assert leftovers, "the torn write should have left its temp directory"
    run_in_process(args, resume=True)
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "stale temp directories are swept"
    assert_same_run(out, reference)


def test_sigkill_while_writing_the_final_adapter_then_resume_finishes_without_training(reference, data, tmp_path):
    """Manifests written: checkpoints 3..18 (6), the final step-20 checkpoint (7th), the adapter (8th)."""
    out = tmp_path / "run"
    args = overrides(data, out)
    assert run_killed(tmp_path, args, "mid_checkpoint", 8) == -signal.SIGKILL
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [18, 20]
    result = run_in_process(args, resume=True)
    assert result.steps == STEPS
    assert_same_run(out, reference)


def test_sigkill_at_a_random_moment_then_resume_is_exact(reference, data, tmp_path):
    """Kill the process from outside at a moment of the poller's choosing while it trains."""
    out = tmp_path / "run"
    args = overrides(data, out)
    script = tmp_path / "plain.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    rng = random.Random(1234)
    for _ in range(1):
        seen = len(metrics(out)) if (out / "metrics.jsonl").exists() else 0
        target = seen + rng.randint(1, 4)
        proc = subprocess.Popen([sys.executable, str(script), "none", "0", json.dumps(args)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            p = out / "metrics.jsonl"
            if p.exists() and len(p.read_text().splitlines()) >= target:
                break
            time.sleep(0.005)
        time.sleep(rng.random() * 0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    run_in_process(args, resume=True)
    assert_same_run(out, reference)


def test_torn_newest_checkpoint_falls_back_to_previous(reference, data, tmp_path):
    out = tmp_path / "run"
    args = overrides(data, out)
    with pytest.raises(Stop):
        train(load_config(None, args), callbacks=[stop_at(10)])
    newest = out / "checkpoints" / "step-000009"
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # a damaged file behind a complete-looking directory
    with pytest.warns(UserWarning, match="skipping torn checkpoint"):
        run_in_process(args, resume=True)
    assert_same_run(out, reference)


def test_every_checkpoint_torn_is_an_error_not_a_restart(data, tmp_path):
    out = tmp_path / "run"
    args = overrides(data, out, **{"train.steps": 6})
    run_in_process(args)
    (out / "summary.json").unlink()
    for _, p in ckpt.list_checkpoints(out):
        (p / "MANIFEST.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="every checkpoint .* is damaged"), pytest.warns(UserWarning):
        run_in_process(args, resume=True)


def test_resume_of_a_finished_run_changes_nothing(reference, data, tmp_path):
    for save_every in (3, 0):
        out = tmp_path / f"done{save_every}"
        args = overrides(data, out, **{"train.steps": 5, "train.save_every": save_every})
        first = run_in_process(args)
        files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
        again = run_in_process(args, resume=True)
        assert again.steps == 5 and again.eval_loss == first.eval_loss and again.artifact == first.artifact
        assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == files


def test_resume_extends_a_finished_run_from_its_last_checkpoint(reference, data, tmp_path):
    """steps=10 then resume with steps=20: the same as 20 steps only if the schedule is the same,
    so compare against the checkpoint chain instead: the extension starts at step 10."""
    out = tmp_path / "run"
    run_in_process(overrides(data, out, **{"train.steps": 10}))
    result = run_in_process(overrides(data, out), resume=True)
    assert result.steps == STEPS
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))


def test_pickle_files_in_a_checkpoint_are_refused(data, tmp_path):
    out = tmp_path / "run"
    args = overrides(data, out, **{"train.steps": 3})
    run_in_process(args)
    (out / "summary.json").unlink()
    (out / "checkpoints" / "step-000003" / "optimizer.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ckpt.CheckpointError, match="pickle files .*optimizer.pt"):
        run_in_process(args, resume=True)


def test_rotation_never_deletes_the_newest_good_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        with atomic_dir(root / f"step-{step:06d}") as d:
            (d / "x.json").write_text(str(step))
    (root / "step-000004" / "x.json").write_text("damaged")  # newer than every good one, and torn
    (root / "step-000003" / "MANIFEST.json").unlink()  # torn too
    with pytest.warns(UserWarning, match="deleting torn checkpoint"):
        ckpt.rotate(root, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"


def test_a_kill_between_the_two_renames_of_a_rewrite_is_recovered(tmp_path):
    target = tmp_path / "step-000005"
    with atomic_dir(target) as d:
        (d / "a.json").write_text("old")
    os.replace(target, tmp_path / ".step-000005.old-999")  # what a kill after the first rename leaves
    (tmp_path / ".step-000005.tmp-abc").mkdir()
    sweep_stale(target)
    assert (target / "a.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000005"]


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_manifest_naming_a_file_outside_its_checkpoint_is_damaged(tmp_path, monkeypatch, where):
    """A manifest entry "../x" or "/abs/x" makes the checkpoint torn, even when the file it names
    exists with exactly the listed size and hash, and nothing outside the folder is ever read."""
    import hashlib

    from peftlab import io as pio

    root = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        with atomic_dir(root / f"step-{step:06d}") as d:
            (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    outside = tmp_path / "run" / "outside.json"  # beside the checkpoints, what "../../outside.json" reaches
    outside.write_text('{"step": 99}')
    rel = "../../outside.json" if where == "parent" else str(outside)
    newest = root / "step-000002"
    manifest = json.loads((newest / "MANIFEST.json").read_text())
    manifest["files"][rel] = {"size": outside.stat().st_size,
                              "sha256": hashlib.sha256(outside.read_bytes()).hexdigest()}
    (newest / "MANIFEST.json").write_text(json.dumps(manifest))
    hashed = []
    original = pio.sha256_file
    monkeypatch.setattr(pio, "sha256_file", lambda p: hashed.append(Path(p).resolve()) or original(p))

    problem = pio.verify_manifest(newest)
    assert problem is not None and "outside the directory" in problem and repr(rel) in problem
    assert pio.verify_manifest(newest, deep=False) is not None  # rotation's cheap check agrees
    with pytest.warns(UserWarning, match="skipping torn checkpoint.*outside the directory"):
        assert ckpt.latest_checkpoint(tmp_path / "run") == root / "step-000001"
    assert hashed and all(p.is_relative_to(root.resolve()) for p in hashed), hashed
