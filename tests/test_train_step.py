"""The one optimiser step (train/step.py) and what a method's StepEffects do to the optimiser.

Expected values are the formulas written out here: the step the loop's docstring describes,
computed by hand; the AdamW state a regroup keeps; the moments a prune zeroes; ReLoRA's jagged
learning rate.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import tiny_model
from peftlab import registry
from peftlab.config import Config, TrainConfig, build_dataclass
from peftlab.model.params import trainable_parameters
from peftlab.train.loss import causal_lm_loss
from peftlab.train.optim import (
    build_optimizer,
    build_scheduler,
    lr_factor,
    prune_moments,
    regroup,
    warmup_steps,
)
from peftlab.train.step import start_training, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def applied(method: str, arch: str = "llama", **options):
    model, _ = tiny_model(arch)
    m = registry.get(method)
    cfg = build_dataclass(m.config_cls, {"method": method, **options}, "peft")
    torch.manual_seed(0)
    m.apply(model, cfg)
    return model, cfg


def batch(seed: int, rows: int, length: int, prompt: int = 0) -> dict:
    """Random ids; the first ``prompt`` labels of each row are masked (-100)."""
    ids = torch.randint(3, 900, (rows, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def run_config(peft, **train) -> Config:
    return Config(peft=peft, train=TrainConfig(**{"mixed_precision": "no", **train}))


# ---------------------------------------------------------------------------- the step itself


def test_train_step_equals_the_step_computed_by_hand():
    """Two steps of two micro-batches with different label counts, clipping on and a warm-up +
    cosine schedule: the records and the weights equal the loop's formula done by hand
    (token-weighted loss over the whole step, clip, AdamW at the schedule's lr)."""
    model, cfg = applied("lora", r=4, dropout=0.0)
    reference = copy.deepcopy(model)
    t = dict(lr=1e-2, max_grad_norm=0.05, warmup=1, schedule="cosine", min_lr_ratio=0.1)
    state = start_training(model, run_config(cfg, **t), total_steps=4)
    steps = [[batch(0, 2, 12, prompt=3), batch(1, 3, 9, prompt=5)], [batch(2, 2, 10), batch(3, 1, 12, prompt=4)]]

    params = trainable_parameters(reference)
    opt = torch.optim.AdamW(params, lr=t["lr"], betas=(0.9, 0.999), weight_decay=0.0, fused=True)
    reference.train()
    for k, micro in enumerate(steps):
        record = train_step(state, micro)
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total = torch.zeros(())  # the step's loss sum, accumulated in fp32 as the loop does
        for b in micro:
            loss_sum, count = causal_lm_loss(reference, b)
            (loss_sum / n).backward()
            total += loss_sum.detach()
        norm = torch.nn.utils.clip_grad_norm_(params, t["max_grad_norm"])
        lr = t["lr"] * lr_factor(k, 4, warmup_steps(t["warmup"], 4), "cosine", t["min_lr_ratio"])
        opt.param_groups[0]["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert (record["step"], record["label_tokens"], record["lr"]) == (k + 1, n, lr)
        assert record["loss"] == round(float(total) / n, 6)
        assert record["grad_norm"] == round(float(norm), 6) and float(norm) > t["max_grad_norm"]  # clipped
    assert state.step == 2
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name
    assert all(p.grad is None for p in model.parameters())


def test_a_non_finite_step_is_skipped_and_counted():
    model, cfg = applied("lora", r=2)
    state = start_training(model, run_config(cfg, max_bad_steps=3), total_steps=5)
    before = [p.detach().clone() for p in state.params]
    with torch.no_grad():
        state.params[0].fill_(math.nan)
    assert train_step(state, [batch(0, 2, 8)]) is None
    assert (state.step, state.skipped, state.bad_in_row) == (0, 1, 1)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(state.params[1:], before[1:]))


# ---------------------------------------------------------------------------- StepEffects mechanics


def test_regroup_drops_the_state_of_parameters_that_left_and_groups_newcomers_like_the_start():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    method, peft = registry.get("full"), build_dataclass(registry.get("full").config_cls, {"method": "full"}, "peft")
    train = TrainConfig(lr=1e-2, weight_decay=0.1, warmup=2)
    opt = build_optimizer(model, method, peft, train)
    build_scheduler(opt, train, 10)  # rewrites each group's lr (the warm-up's first step): regroup must still match
    model(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    first, norm, last = model
    assert len(opt.state) == 6

    for p in first.parameters():
        p.requires_grad_(False)
    regroup(opt, model, method, peft, train)
    decay, no_decay = (g["params"] for g in opt.param_groups)
    assert decay == [last.weight] and no_decay == [norm.weight, norm.bias, last.bias]  # model order
    assert set(opt.state) == {*decay, *no_decay}  # the frozen layer's AdamW state is gone
    kept = opt.state[last.weight]["exp_avg"].clone()

    for p in first.parameters():
        p.requires_grad_(True)
    for p in norm.parameters():
        p.requires_grad_(False)
    regroup(opt, model, method, peft, train)
    decay, no_decay = (g["params"] for g in opt.param_groups)
    assert decay == [first.weight, last.weight] and no_decay == [first.bias, last.bias]
    assert first.weight not in opt.state and norm.weight not in opt.state  # new ones start afresh
    assert torch.equal(opt.state[last.weight]["exp_avg"], kept)  # the ones that stayed keep theirs
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    model(torch.randn(5, 4)).square().sum().backward()
    w = first.weight.detach().clone()
    opt.step()  # AdamW takes the newcomers
    assert not torch.equal(first.weight, w)


def test_lisa_steps_keep_the_optimiser_on_exactly_the_active_layers():
    model, cfg = applied("lisa", layers=1, interval=1, seed=3)
    state = start_training(model, run_config(cfg, lr=1e-3), total_steps=6)
    seen = set()
    for k in range(6):
        record = train_step(state, [batch(k, 2, 8)])
        seen.add(record["lisa_layers"])
        in_opt = [p for g in state.optimizer.param_groups for p in g["params"]]
        assert {id(p) for p in in_opt} == {id(p) for p in trainable_parameters(model)} == {id(p) for p in state.params}
        assert {id(p) for p in state.optimizer.state} <= {id(p) for p in in_opt}
    assert len(seen) > 1  # the schedule did switch layers


def test_prune_zeroes_the_fraction_with_the_smallest_first_moment_in_both_moments():
    p = nn.Parameter(torch.zeros(4, 5))
    opt = torch.optim.AdamW([p])
    g = torch.Generator().manual_seed(0)
    m = (torch.randperm(20, generator=g) + 1).float() * torch.randint(0, 2, (20,), generator=g).mul(2).sub(1)
    m = m.view(4, 5)  # distinct |m|, mixed signs
    v = torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) + 1
    for fraction in (0.0, 0.3, 0.99, 1.0):
        opt.state[p] = {"exp_avg": m.clone(), "exp_avg_sq": v.clone(), "step": torch.tensor(1.0)}
        prune_moments(opt, [p], fraction)
        k = int(fraction * 20)
        drop = torch.zeros(20, dtype=torch.bool)
        drop[m.abs().flatten().argsort()[:k]] = True
        drop = drop.view(4, 5)
        assert torch.equal(opt.state[p]["exp_avg"], m.masked_fill(drop, 0.0)), fraction
        assert torch.equal(opt.state[p]["exp_avg_sq"], v.masked_fill(drop, 0.0)), fraction


def test_lr_scale_gives_relora_its_jagged_schedule():
    """ReLoRA asks for lr_scale after each restart; the lr a step runs at (its record's) is the
    schedule's times ((k - 1) mod R + 1) / W for the W steps after a restart."""
    R, W, total = 3, 2, 9
    model, cfg = applied("relora", r=2, reset_every=R, restart_warmup=W, reset_prune=0.5)
    t = dict(lr=1e-2, warmup=2, schedule="cosine")
    state = start_training(model, run_config(cfg, **t), total_steps=total)
    for k in range(1, total + 1):
        record = train_step(state, [batch(k, 2, 8)])
        since = (k - 1) % R
        want = t["lr"] * lr_factor(k - 1, total, 2, "cosine", 0.0)
        if k - 1 >= R and since < W:
            want *= (since + 1) / W
        assert record["lr"] == pytest.approx(want, rel=1e-12), k


# ---------------------------------------------------------------------------- another objective


class RowMean:
    """A sequence-level objective: each row's mean token loss, one unit per row (the shape a
    preference loss has: a sum over pairs, averaged over the step's pairs)."""

    def __init__(self):
        self.calls = 0

    def units(self, batch: dict) -> int:
        return int(batch["labels"].shape[0])

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        self.calls += 1
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        tok = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                                reduction="none")
        mask = labels != -100
        return ((tok * mask).sum(1) / mask.sum(1)).sum()


def test_another_objective_runs_through_the_engine_and_averages_over_its_units():
    """``start_training(..., objective=)``: the engine computes that objective (so DDP/FSDP hooks
    run around it), the step's loss is its sum over every micro-batch / its units over the step,
    and the weights move by that loss's gradient (equal to a hand-made AdamW step on a copy)."""
    from peftlab.train.evaluate import evaluate_loss

    model, peft = applied("lora", r=4, alpha=8)
    cfg = run_config(peft, lr=1e-2, warmup=0, schedule="constant", max_grad_norm=0.0, weight_decay=0.0)
    micro = [batch(1, 2, 10, prompt=3), batch(2, 3, 7, prompt=1)]
    twin = copy.deepcopy(model)
    objective = RowMean()
    state = start_training(model, cfg, total_steps=2, objective=objective)
    assert state.engine.objective is objective
    record = train_step(state, micro)
    assert objective.calls == 2

    check = RowMean()
    params = trainable_parameters(twin)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    total = sum(check.loss(twin, b) for b in micro) / 5  # 2 + 3 rows
    assert record["label_tokens"] == 5 and record["loss"] == pytest.approx(total.item(), rel=1e-6)
    total.backward()
    opt.step()
    for (name, p), q in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad), params):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    rows = [{k: v[i] for k, v in micro[0].items()} for i in range(2)]
    collate = lambda ex: {k: torch.stack([e[k] for e in ex]) for k in ex[0]}  # noqa: E731
    got = evaluate_loss(model, rows, 2, collate, torch.device("cpu"), None, objective=RowMean())
    with torch.no_grad():  # evaluation averages over the objective's units too: rows, not tokens
        assert got == pytest.approx(float(check.loss(model, micro[0])) / 2, rel=1e-6)


def test_train_takes_an_objective_for_its_steps_and_its_evaluation(tmp_path):
    """``train(cfg, objective=)``: the run's steps and its eval loss are that objective's, averaged
    over its units (rows here): the reported eval loss equals RowMean over the held-out rows of
    the trained model, which differs from the token-weighted causal-LM loss."""
    from conftest import tiny_overrides
    from peftlab.configure import load_config
    from peftlab.train.evaluate import evaluate_loss
    from peftlab.train.loop import train

    cfg = load_config(None, [*tiny_overrides("llama"), "train.progress=false", "train.mixed_precision=no",
                             "train.threads=1", "data.path=builtin:tasks", "train.steps=3", "train.batch_size=4",
                             f"train.output_dir={tmp_path}"])
    objective = RowMean()
    result = train(cfg, objective=objective)
    assert objective.calls >= 3 and len(result.metrics) == 3
    assert all(r["label_tokens"] == 4 for r in result.metrics)  # units: 4 rows a step
    data, device = result.data, torch.device("cpu")
    rows = evaluate_loss(result.model, data.eval, 4, data.collate, device, None, objective=RowMean())
    tokens = evaluate_loss(result.model, data.eval, 4, data.collate, device, None)
    assert result.eval_loss == pytest.approx(rows, rel=1e-9) and abs(rows - tokens) > 10 * abs(result.eval_loss - rows)
