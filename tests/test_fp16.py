"""float16 mixed precision with dynamic loss scaling (train.mixed_precision=fp16), on CPU.

torch has fp16 autocast on CPU, so the whole path runs here: GradScaler multiplies the loss by the
scale, the gradients are unscaled before clipping, an overflow skips the step (counted, logged,
the scale halved), and the scaler's state is in the checkpoint. The tolerances are measured
(see each test) and stated; the reference is the same steps in fp32 on the same batches.
"""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from conftest import small_model
from peftlab import registry
from peftlab.config import Config, TrainConfig, build_dataclass
from peftlab.errors import ConfigError
from peftlab.train import checkpoint as ckpt
from peftlab.train.runtime import resolve_precision
from peftlab.train.step import start_training, train_step
from test_resume import assert_same_run, metrics, overrides, run_in_process, run_killed, write_data

pytestmark = pytest.mark.usefixtures("one_thread")


def applied(seed: int = 0):
    model = small_model("llama")
    m = registry.get("lora")
    cfg = build_dataclass(m.config_cls, {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, "peft")
    torch.manual_seed(seed)
    m.apply(model, cfg)
    return model, cfg


def batch(seed: int, rows: int = 2, length: int = 16) -> dict:
    ids = torch.randint(3, 1000, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def config(peft, precision: str, **train) -> Config:
    return Config(peft=peft, train=TrainConfig(**{"mixed_precision": precision, "lr": 2e-3, "warmup": 0,
                                                  "schedule": "constant", **train}))


def updates(precision: str, steps: int, **train) -> tuple[list[dict], object]:
    """``steps`` applied updates over fixed batches (two micro-batches each); a skipped step is
    retried on the same batches, so both precisions see the same data at every update."""
    model, peft = applied()
    state = start_training(model, config(peft, precision, **train), total_steps=steps)
    records = []
    while state.step < steps:
        micro = [batch(2 * state.step), batch(2 * state.step + 1)]
        record = train_step(state, micro)
        if record is not None:
            records.append(record)
    return records, state


def test_fp16_resolves_on_cpu_and_auto_never_picks_it_there():
    cpu = torch.device("cpu")
    assert resolve_precision("fp16", cpu) is torch.float16
    assert resolve_precision("auto", cpu) in (None, torch.bfloat16)
    with pytest.raises(ConfigError, match="fp16 runs on CUDA or CPU"):
        resolve_precision("fp16", torch.device("meta"))


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_a_cuda_gpu_is_bf16_where_supported_else_fp16_with_a_scaler(monkeypatch, bf16, expected):
    from peftlab.train.runtime import grad_scaler

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda) is expected
    assert (grad_scaler(cuda, expected) is not None) == (expected is torch.float16)


def test_fp16_run_follows_the_fp32_loss():
    """Measured on this CPU (tiny Llama with a 1,024-token vocabulary, LoRA r=4, lr 2e-3, 12
    updates of 2 micro-batches of 2 x 16 random tokens; loss ~14, the tiny model's large initial
    logits): largest relative difference 6.6e-4 on the loss and 2.8e-2 on the gradient norm over
    the 12 updates. Asserted: 2e-3 on the loss, 6e-2 on the gradient norm (fp16 keeps ~3 decimal
    digits in every matmul; two fp32 runs agree exactly). The gradient norms agree, so the
    gradients were unscaled before clipping (a scaled norm would be 2**16 times larger)."""
    ref, _ = updates("no", 12)
    got, state = updates("fp16", 12)
    loss_rel = max(abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(ref, got))
    norm_rel = max(abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"] for a, b in zip(ref, got))
    assert loss_rel < 2e-3, loss_rel
    assert norm_rel < 6e-2, norm_rel
    assert loss_rel > 0  # fp16 really ran (an fp32 run would match to the 6 logged decimals)
    assert all("loss_scale" in r and "overflow_steps" in r for r in got)
    assert got[-1]["overflow_steps"] == state.overflows
    assert "loss_scale" not in ref[0]


def test_an_injected_overflow_is_skipped_counted_and_lowers_the_scale():
    model, peft = applied()
    state = start_training(model, config(peft, "fp16", max_bad_steps=2), total_steps=4)
    first, armed = state.params[0], [False]

    def poison(grad):  # an inf in one gradient element, once armed
        return grad.index_fill(0, torch.tensor([0]), math.inf) if armed[0] else grad

    first.register_hook(poison)
    while train_step(state, [batch(0), batch(1)]) is None:  # natural overflows at 2**16 first, if any
        pass
    armed[0], overflows = True, state.overflows
    scale, lr_before = state.scaler.get_scale(), state.scheduler.last_epoch
    weights = [p.detach().clone() for p in state.params]
    moments = {k: v.clone() for k, v in state.optimizer.state[first].items()}
    assert train_step(state, [batch(2), batch(3)]) is None
    assert state.scaler.get_scale() == scale / 2
    assert (state.step, state.overflows - overflows, state.bad_in_row) == (1, 1, 0)
    assert state.scheduler.last_epoch == lr_before  # the schedule does not move on a skipped step
    assert all(torch.equal(p, w) for p, w in zip(state.params, weights))
    assert all(torch.equal(state.optimizer.state[first][k], v) for k, v in moments.items())  # Adam saw nothing
    assert all(p.grad is None for p in model.parameters())
    armed[0] = False
    record = train_step(state, [batch(2), batch(3)])  # the next one applies and reports the overflow
    assert record["step"] == 2 and record["overflow_steps"] == state.overflows and record["loss_scale"] == scale / 2


def test_a_non_finite_loss_under_fp16_is_a_bad_step_not_an_overflow():
    model, peft = applied()
    state = start_training(model, config(peft, "fp16", max_bad_steps=3), total_steps=4)
    with torch.no_grad():
        state.params[0].fill_(math.nan)
    assert train_step(state, [batch(0)]) is None
    assert (state.skipped, state.overflows, state.bad_in_row) == (1, 0, 1)


def test_a_run_logs_overflows_in_metrics_and_summary_and_resumes_exactly(tmp_path):
    """The tiny model's first steps overflow at the initial scale 2**16 (its logits are large):
    the run reports them. Killed with SIGKILL after step 7 and resumed from step 6's checkpoint, it
    ends bit-identical to an uninterrupted run; it could not without the scaler's state, since a
    fresh scaler starts at 2**16 again and overflows again (other steps skipped, other data)."""
    data = write_data(tmp_path / "add.jsonl")
    args = overrides(data, tmp_path / "ref", **{"train.mixed_precision": "fp16", "train.steps": 10})
    run_in_process(args)
    ref = tmp_path / "ref"
    summary = json.loads((ref / "summary.json").read_text())
    rows = metrics(ref)
    assert summary["overflow_steps"] >= 1 and summary["skipped_steps"] >= summary["overflow_steps"]
    assert rows[-1]["overflow_steps"] == summary["overflow_steps"] and summary["loss_scale"] < 2**16
    assert [r["step"] for r in rows] == list(range(1, 11))  # ten updates, whatever was skipped
    saved = json.loads((ref / "checkpoints" / "step-000010" / "trainer_state.json").read_text())
    assert saved["grad_scaler"]["scale"] == summary["loss_scale"] and saved["overflow_steps"] == summary["overflow_steps"]

    out = tmp_path / "run"
    args = overrides(data, out, **{"train.mixed_precision": "fp16", "train.steps": 10})
    assert run_killed(tmp_path, args, "after_step", 7) == -signal.SIGKILL
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3, 6]
    saved = json.loads((out / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert saved["grad_scaler"]["scale"] < 2**16  # the lowered scale is what the resume starts from
    run_in_process(args, resume=True)
    assert_same_run_steps(out, ref, 10)


def assert_same_run_steps(run, ref, steps: int) -> None:
    import test_resume

    saved, test_resume.STEPS = test_resume.STEPS, steps
    try:
        assert_same_run(run, ref)
    finally:
        test_resume.STEPS = saved


@pytest.mark.parametrize("objective", ["dpo", "kto", "simpo", "orpo", "reward", "grpo"])
def test_every_objective_trains_in_fp16_through_the_shared_step(tmp_path, objective):
    """Preference losses and GRPO go through the same ``train_step`` (train/step.py), so the
    scaler, the unscale before clipping and the overflow guard apply to them unchanged; GRPO
    also samples its rollouts under the fp16 autocast. Each runs 2 updates with finite losses."""
    from peftlab.configure import load_config
    from peftlab.train.loop import train

    if objective == "grpo":
        from test_grpo import grpo_args as make
    else:
        from test_preference import run_args

        def make(tmp, *extra):
            return run_args(tmp, objective, *extra)
    result = train(load_config(None, make(tmp_path, "train.mixed_precision=fp16", "train.steps=2")))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert result.steps == 2 and "loss_scale" in summary
    assert all(math.isfinite(r["loss"]) and "loss_scale" in r for r in result.metrics)
