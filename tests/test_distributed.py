"""Two processes (torchrun, Gloo on CPU) train exactly like one process on the same global batch.

One process runs micro-batches of 2 with grad_accum=4; two processes run micro-batches of 2 with
grad_accum=2 each. The sampler gives rank r every 2nd micro-batch of one global order, so each
optimiser step sees the same 8 examples and the same label-token count. The loss curve, the
gradient norms and the final adapter must agree to fp32 round-off (the only difference is the
order of the cross-rank sums, which changes gradients by ~1e-7 relative and then the weights they
update): tolerance 5e-6 relative (+1e-6 for the 6-decimal rounding of metrics.jsonl) on the logged
loss, gradient norm and eval loss, and 1e-5 absolute on the adapter weights (fp32). The weight
tolerance is 1% of one step's movement (lr 1e-3): Adam divides each gradient element by its own
running magnitude, so an element whose gradient is near zero turns 1e-7 round-off into ~1e-6.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import tiny_overrides
from peftlab.configure import load_config
from peftlab.errors import ConfigError
from peftlab.train.distributed import DistContext, LossModule
from peftlab.train.loop import train
from test_resume import write_data

SRC = str(Path(peftlab.__file__).resolve().parents[1])
TORCHRUN = Path(sys.executable).with_name("torchrun")


def overrides(data: Path, out: Path, **extra) -> list[str]:
    base = {
        "data.path": data, "data.eval_split": 8, "data.max_length": 96, "peft.r": 4,
        "train.steps": 4, "train.batch_size": 2, "train.lr": 1e-3, "train.eval_every": 2,
        "train.threads": 1, "train.mixed_precision": "no", "train.progress": False, "train.output_dir": out,
    }
    base.update(extra)
    return tiny_overrides("llama") + [f"{k}={v}" for k, v in base.items()]


def torchrun(args: list[str], resume: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "peftlab", "train", *args]
    proc = subprocess.run(cmd + (["--resume"] if resume else []), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(run: Path, ref: Path) -> None:
    a, b = metrics(run), metrics(ref)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]  # rank 0 alone logs
    for x, y in zip(a, b):
        assert x["label_tokens"] == y["label_tokens"] and x["lr"] == y["lr"]
        for key in ("loss", "grad_norm", "eval_loss"):
            assert (key in x) == (key in y)
            if key in x:
                assert abs(x[key] - y[key]) <= 5e-6 * abs(y[key]) + 1e-6, (x["step"], key, x[key], y[key])
    wa = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)
    assert any(wa[k].abs().max() > 1e-4 for k in wa if "lora_B" in k), "the adapters must have trained"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "add.jsonl")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    train(load_config(None, overrides(data, out, **{"train.grad_accum": 4})))
    return out


def test_ddp_two_processes_match_one(one_process, data, tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun(overrides(data, out, **{"train.grad_accum": 2, "train.distributed": "ddp"}))
    assert "2 processes (ddp)" in proc.stderr
    assert proc.stdout.count("run directory:") == 1  # only rank 0 reports
    assert_same_training(out, one_process)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_fsdp_two_processes_match_one(one_process, data, tmp_path):
    """FSDP2 shards base and adapters over the two ranks; the saved adapter is gathered whole."""
    out = tmp_path / "fsdp"
    proc = torchrun(overrides(data, out, **{"train.grad_accum": 2, "train.distributed": "fsdp"}))
    assert "2 processes (fsdp)" in proc.stderr
    assert_same_training(out, one_process)


# Run by `python` (one process) or by torchrun on each rank: trains, and with KILL_AFTER=k rank 0
# SIGKILLs itself as soon as step k is logged (no cleanup, no atexit); torchrun then stops the others.
LAUNCHED = """
import json, os, signal, sys
from peftlab.configure import load_config
from peftlab.train.loop import train
kill_after, resume, args = int(sys.argv[1]), sys.argv[2] == "resume", json.loads(sys.argv[3])
callbacks = [lambda rec: rec["step"] == kill_after and os.kill(os.getpid(), signal.SIGKILL)] if kill_after else []
train(load_config(None, args), resume=resume, callbacks=callbacks)
"""


def launch(tmp: Path, args: list[str], processes: int, kill_after: int = 0,
           resume: bool = False) -> subprocess.CompletedProcess:
    """One training run in fresh processes; with ``kill_after`` it must die by SIGKILL after that step."""
    script = tmp / "launched.py"
    script.write_text(LAUNCHED)
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    head = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    proc = subprocess.run([*head, str(script), str(kill_after), "resume" if resume else "fresh", json.dumps(args)],
                          env=env, capture_output=True, text=True, timeout=300)
    if not kill_after:
        assert proc.returncode == 0, proc.stderr[-3000:]
    elif processes == 1:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    else:  # torchrun reports the rank that died and stops the other
        assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in proc.stderr, proc.stderr[-3000:]
    return proc


def assert_killed_after(run: Path, step: int) -> None:
    """What a run killed after ``step`` (checkpoints every 2 steps) left behind: no artifact."""
    assert [r["step"] for r in metrics(run)] == list(range(1, step + 1))
    assert not (run / "summary.json").exists() and not (run / "adapter").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "fsdp_grad_op"])
def test_fsdp_killed_mid_run_resumes_bit_identical(one_process, data, tmp_path, mode):
    """Both FSDP modes match one process; a run killed by SIGKILL after step 3 and resumed from its
    step-2 checkpoint (sharded optimiser state rebuilt from the gathered checkpoint) ends
    bit-identical to the uninterrupted run."""
    def args(out: Path) -> list[str]:
        return overrides(data, out, **{"train.grad_accum": 2, "train.distributed": mode, "train.save_every": 2})

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = launch(tmp_path, args(whole), 2)
    assert f"2 processes ({mode})" in proc.stderr
    assert_same_training(whole, one_process)
    launch(tmp_path, args(killed), 2, kill_after=3)
    assert_killed_after(killed, 3)
    proc = launch(tmp_path, args(killed), 2, resume=True)
    assert "resumed from" in proc.stderr and "step-000002" in proc.stderr
    assert_same_training(killed, one_process)
    first = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    again = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    for k in first:
        assert torch.equal(first[k], again[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("written, resumed", [(2, 1), (1, 2)])
def test_a_checkpoint_written_by_n_processes_resumes_on_m(one_process, data, tmp_path, written, resumed):
    """Killed after step 3 on ``written`` processes, resumed from step 2 on ``resumed`` (FSDP where
    there are two: the gathered checkpoint is re-sharded, or a sharded run's checkpoint is loaded
    whole). The global batch is kept (batch 2 x grad_accum x processes = 8) and dropout is 0, so
    the run equals the uninterrupted one-process run to cross-rank round-off."""
    out = tmp_path / "run"

    def args(processes: int) -> list[str]:
        return overrides(data, out, **{"train.grad_accum": 4 // processes, "train.distributed": "fsdp",
                                       "train.save_every": 2})

    launch(tmp_path, args(written), written, kill_after=3)
    assert_killed_after(out, 3)
    proc = launch(tmp_path, args(resumed), resumed, resume=True)
    assert "resumed from" in proc.stderr and "step-000002" in proc.stderr
    assert f"written by {written} process(es), this run has {resumed}" in proc.stderr  # the dropout warning
    assert_same_training(out, one_process)
    assert json.loads((out / "summary.json").read_text())["world_size"] == resumed


def test_one_process_needs_no_engine():
    ctx = DistContext()
    model = torch.nn.Linear(2, 2)
    assert isinstance(ctx.wrap(model, "fsdp"), LossModule) and ctx.grad_scale == 1.0 and ctx.mode == "none"
    with pytest.raises(ConfigError, match="train.distributed 'zero3' is not one of ddp, fsdp, fsdp_grad_op"):
        ctx.wrap(model, "zero3")
    with pytest.raises(ConfigError, match="train.distributed"):
        load_config(None, ["train.distributed=deepspeed"])


def test_grad_scale_undoes_averaging():
    """The arithmetic the loop relies on: W ranks, each loss x W / N, averaged -> sum / N."""
    ctx = DistContext(rank=0, world_size=2, mode="ddp")
    per_rank = [torch.tensor(3.0), torch.tensor(5.0)]
    n_global = 4
    averaged = sum(g * ctx.grad_scale / n_global for g in per_rank) / ctx.world_size
    assert averaged == sum(per_rank) / n_global


@pytest.mark.parametrize("env, match", [
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "train.distributed=fsdp_grad_op"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "train.distributed=fsdp "),
    ({"ACCELERATE_USE_FSDP": "true"}, "set train.distributed=fsdp"),
])
def test_a_deepspeed_or_fsdp_launch_is_never_silently_run_as_ddp(monkeypatch, env, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=match):
        DistContext().wrap(torch.nn.Linear(2, 2), "ddp")


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_fp16_with_loss_scaling_two_processes_match_one(data, tmp_path, mode):
    """fp16 under torchrun: DDP's gradients are all-reduced before the scaler checks them, and
    under FSDP ShardedGradScaler all-reduces each rank's overflow check, so every rank skips the
    same steps and holds the same scale. The tiny model overflows at the initial scale 2**16 on
    its first step (both runs skip it and log the same updates). Measured: the losses agree to
    ~1e-6 relative (each micro-batch's fp16 forward is the same; only the order of the fp32
    gradient sums differs); asserted 1e-4 relative on loss and gradient norm, 1e-4 absolute on
    the adapter."""
    fp16 = {"train.mixed_precision": "fp16"}
    ref = tmp_path / "one"
    train(load_config(None, overrides(data, ref, **{"train.grad_accum": 4}, **fp16)))
    out = tmp_path / mode
    torchrun(overrides(data, out, **{"train.grad_accum": 2, "train.distributed": mode}, **fp16))
    a, b = metrics(out), metrics(ref)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (out, ref))
    assert sa["overflow_steps"] == sb["overflow_steps"] >= 1 and sa["loss_scale"] == sb["loss_scale"]
    for x, y in zip(a, b):
        assert x["loss_scale"] == y["loss_scale"] and x["overflow_steps"] == y["overflow_steps"]
        for key in ("loss", "grad_norm"):
            assert abs(x[key] - y[key]) <= 1e-4 * abs(y[key]), (x["step"], key, x[key], y[key])
    wa = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=0)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~35 s on 2 cores: two torchrun agents, each starting a worker
def test_two_node_agents_with_c10d_rendezvous_match_one(one_process, data, tmp_path):
    """``torchrun --nnodes 2`` as on a cluster: two node agents (separate torchrun processes, one
    worker each) meet at a c10d rendezvous on 127.0.0.1, as two machines meet at the first
    node's address. The two-rank job equals one process on the same global batch (the same
    tolerances as the single-node runs above)."""
    out = tmp_path / "nodes"
    args = overrides(data, out, **{"train.grad_accum": 2, "train.distributed": "ddp"})
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    port = free_port()
    agents = []
    for node in (0, 1):
        cmd = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"peftlab-{port}", "--node-rank", str(node),
               "-m", "peftlab", "train", *args]
        agents.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for agent in agents:
            stdout, stderr = agent.communicate(timeout=300)
            outputs.append((agent.returncode, stdout, stderr))
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for code, _, stderr in outputs:
        assert code == 0, stderr[-3000:]
    logs = "".join(stderr for _, _, stderr in outputs)
    assert "2 processes (ddp)" in logs
    assert sum(stdout.count("run directory:") for _, stdout, _ in outputs) == 1  # global rank 0 alone
    assert_same_training(out, one_process)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
