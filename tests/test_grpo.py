"""GRPO (train.objective=grpo): its loss against TRL's GRPOTrainer code path, the group advantages
and the k3 KL against their formulas, rollouts against ``peftlab generate``, rewards' errors, and
the objective in the loop (it moves the policy toward high advantages; bad settings are named)."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from conftest import randomize, tiny_model, tiny_overrides
from peftlab.configure import load_config
from peftlab.errors import ConfigError
from peftlab.train import grpo_loss

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- formulas


def test_group_advantages_equal_the_formula():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 2.0, 3.0], dtype=torch.float64)
    for scale in ("group", "batch", "none"):
        got = grpo_loss.group_advantages(rewards, 4, scale)
        want = []
        for g in (rewards[:4].tolist(), rewards[4:].tolist()):
            sd = {"group": statistics.stdev(g), "batch": statistics.stdev(rewards.tolist()), "none": None}[scale]
            want += [(r - statistics.mean(g)) / (sd + 1e-4) if sd is not None else r - statistics.mean(g) for r in g]
        assert got.tolist() == pytest.approx(want, abs=1e-12), scale
    same = grpo_loss.group_advantages(torch.tensor([1.0, 1.0, 1.0]), 3)  # a group all alike teaches nothing
    assert same.tolist() == [0.0, 0.0, 0.0]


def test_k3_kl_equals_its_formula_and_is_zero_only_at_equality():
    logp = torch.tensor([-1.0, -2.5, -0.1, -3.0])
    ref = torch.tensor([-1.0, -2.0, -0.4, -5.0])
    got = grpo_loss.k3_kl(logp, ref)
    want = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp.tolist(), ref.tolist())]
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    assert got[0] == 0 and (got[1:] > 0).all()


# ---------------------------------------------------------------------------- TRL as the oracle

def trl_loss(logps, inputs: dict, loss_type: str, beta: float, eps: float, eps_high: float, max_len: int):
    """TRL 1.16's GRPOTrainer._compute_loss itself, on an object holding the attributes it reads;
    the model's per-token log-probs are given (``logps``: what its forward would return)."""
    pytest.importorskip("trl", reason="TRL is the test-only oracle of the GRPO loss")
    from trl.trainer.grpo_trainer import GRPOTrainer

    ident = SimpleNamespace(reduce=lambda t, reduction="sum": t, gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high, use_vllm=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, accelerator=ident, _metrics=defaultdict(lambda: defaultdict(list)))
    return GRPOTrainer._compute_loss(trainer, None, inputs), trainer._metrics["train"]


def fixed_inputs(seed: int = 0, rows: int = 6, width: int = 5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 1, 4, 5, 2])[:rows]
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    logps = (-torch.rand(rows, width, generator=g) * 3).requires_grad_(True)
    old = (logps.detach() + 0.3 * torch.randn(rows, width, generator=g)).clamp(max=0)  # ratios beyond the clip
    ref = logps.detach() - 0.5 * torch.rand(rows, width, generator=g)
    adv = grpo_loss.group_advantages(torch.randn(rows, generator=g), 3)
    inputs = {"prompt_ids": torch.zeros(rows, 2, dtype=torch.long), "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
              "completion_ids": torch.zeros(rows, width, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref}
    return logps, inputs


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta,eps_high,off_policy", [(0.0, 0.2, True), (0.04, 0.28, True), (0.04, 0.2, False)])
def test_loss_and_gradient_equal_trls(loss_type, beta, eps_high, off_policy):
    """peftlab's sum / units (what the loop computes for one micro-batch) equals TRL's loss, and so
    does its gradient with respect to the per-token log-probs; on-policy (old = current, detached)
    too; with TRL's clip fraction and KL metrics."""
    logps, inputs = fixed_inputs()
    if not off_policy:
        inputs.pop("old_per_token_logps")
    max_len = 7
    want, metrics = trl_loss(logps, inputs, loss_type, beta, 0.2, eps_high, max_len)
    (want_grad,) = torch.autograd.grad(want, logps)
    mask = inputs["completion_mask"]
    old = inputs.get("old_per_token_logps", logps.detach())
    per_token, info = grpo_loss.per_token_loss(logps, old, inputs["advantages"], inputs["ref_per_token_logps"], beta,
                                               0.2, eps_high)
    got = grpo_loss.token_loss_sum(per_token, mask, loss_type) / grpo_loss.units(mask, loss_type, max_len)
    (got_grad,) = torch.autograd.grad(got, logps)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6, abs=1e-9)
    assert torch.allclose(got_grad, want_grad, rtol=1e-5, atol=1e-8)
    assert want_grad.abs().sum() > 0
    m = mask.bool()
    assert float(info["clipped"][m].float().mean()) == pytest.approx(metrics["clip_ratio/region_mean"][0])
    if off_policy:
        assert metrics["clip_ratio/region_mean"][0] > 0  # the fixture's ratios do reach the clip
    if beta:
        assert float(info["kl"][m].detach().mean()) == pytest.approx(metrics["kl"][0], rel=1e-6)


def test_model_loss_and_lora_gradients_equal_trls_on_a_tiny_model():
    """GRPO.loss on a LoRA model (its own completion log-probs at the sampling temperature) equals
    TRL's loss on log-probs from a plain HF forward of [prompt ; completion], and the LoRA
    gradients agree; with grpo.share_prompt's default (auto: each prompt runs once for its group)."""
    from conftest import with_method
    from peftlab.train.grpo_rollout import completion_logps, layout
    from peftlab.train.grpo_share import resolve, share_layout

    model, _ = tiny_model("llama")
    model, _, _ = with_method(model, "lora", r=4, targets="all-linear")
    randomize(model)
    g = torch.Generator().manual_seed(3)
    unique = [torch.randint(5, 900, (4,), generator=g).tolist() for _ in range(2)]
    prompts = [p for p in unique for _ in range(3)]  # two groups of three
    completions = [torch.randint(5, 900, (n,), generator=g).tolist() for n in (3, 5, 2, 5, 1, 4)]
    batch = layout(prompts, completions, 0)
    batch.update(share_layout(unique, completions, 0))
    batch["advantages"] = grpo_loss.group_advantages(torch.tensor([1.0, 0.0, 2.0, 0.5, 0.5, 3.0]), 3)
    temperature, lc = 0.7, batch["completion_mask"].shape[1]
    params = [p for p in model.parameters() if p.requires_grad]

    def hf_logps():
        ids = torch.cat([torch.tensor(prompts), torch.tensor([c + [0] * (lc - len(c)) for c in completions])], 1)
        logits = model(input_ids=ids).logits[:, -lc - 1:-1].float() / temperature
        return logits.log_softmax(-1).gather(-1, ids[:, -lc:, None]).squeeze(-1) * batch["completion_mask"]

    from peftlab.train.grpo import GRPO

    obj = GRPO.__new__(GRPO)  # the objective's loss alone: settings, no data or rollout
    from peftlab.train.preference import Stats

    obj.g = SimpleNamespace(loss_type="bnpo", temperature=temperature, beta=0.0, max_completion_length=6)
    obj.eps_low = obj.eps_high = 0.2
    obj.stats = Stats()
    obj.share = resolve("auto", model, "lora")
    assert obj.share
    model.train()
    got = obj.loss(model, batch) / obj.units(batch)
    got_grads = torch.autograd.grad(got, params)
    logps = hf_logps()
    for shared in (False, True):  # rtol: log-probs of ~-30 here, whose fp32 ulp is 4e-6
        assert torch.allclose(completion_logps(model, batch, temperature, shared), logps, atol=1e-5, rtol=1e-6)
    inputs = {"prompt_ids": torch.tensor(prompts), "prompt_mask": torch.ones(6, 4, dtype=torch.long),
              "completion_ids": torch.zeros(6, lc, dtype=torch.long), "completion_mask": batch["completion_mask"],
              "advantages": batch["advantages"]}
    want, _ = trl_loss(logps, inputs, "bnpo", 0.0, 0.2, 0.2, 6)
    want_grads = torch.autograd.grad(want, params)
    assert float(got.detach()) == pytest.approx(float(want.detach()), abs=1e-6)
    for a, b in zip(got_grads, want_grads):  # the shared forward's rounding: ~1e-6 of the gradient's norm
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4) and float((a - b).norm()) <= 1e-5 * float(b.norm())
    assert sum(float(a.abs().sum()) for a in got_grads) > 0


# ---------------------------------------------------------------------------- rollouts and the loop

QA = [("Add 2 and 3.", "5"), ("Name a colour.", "red"), ("Say hi.", "hi"), ("Count to three.", "one two three"),
      ("What is 4 + 4?", "8"), ("Spell cat.", "c a t"), ("Say yes.", "yes"), ("Say no.", "no")]


def write_data(tmp_path, n: int = 16):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in (QA * 4)[:n]))
    return path


def grpo_args(tmp_path, *extra: str, name: str = "run") -> list[str]:
    return [*tiny_overrides("llama"), f"data.path={write_data(tmp_path)}", "data.template=chatml",
            "data.max_length=64", "data.eval_split=4", "data.dedup=false", "peft.r=4", "train.objective=grpo",
            "train.steps=2", "train.batch_size=2", "train.lr=5e-3", "train.progress=false", "train.threads=1",
            "train.mixed_precision=no", "train.warmup=0", "train.eval_every=0", f"train.output_dir={tmp_path / name}",
            "grpo.num_generations=3", "grpo.max_completion_length=6", *extra]


def started(tmp_path, *extra: str):
    """(config, model, tokenizer, data, state) as the loop sets them up, for a GRPO run."""
    from peftlab.train import setup
    from peftlab.train.pref_setup import build_objective, prepare_data
    from peftlab.train.step import start_training

    cfg = load_config(None, grpo_args(tmp_path, *extra))
    model, tok = setup.prepared_model(cfg, None, None)
    data = setup.load_data(cfg, tok, cfg.train.seed)
    prepare_data(cfg, data)
    objective = build_objective(cfg, model, {}, data)
    return cfg, model, tok, data, start_training(model, cfg, cfg.train.steps, objective=objective)


def test_rollout_equals_peftlab_generate_for_the_same_adapter_and_seed(tmp_path):
    """The completions a training step samples (adapters live, train mode) are what ``peftlab
    generate`` answers with the saved adapter, the same sampling settings and the rollout's seed."""
    from peftlab.data.formats import Conversation
    from peftlab.data.prompts import prompts_from_examples
    from peftlab.eval.generate import generate, load_for_generation
    from peftlab.export.adapter import save_adapter
    from peftlab.train.grpo_rollout import rollout, rollout_seed

    cfg, model, tok, data, state = started(tmp_path, "grpo.temperature=0.9", "grpo.top_p=0.95",
                                           "grpo.max_completion_length=8")
    randomize(model, std=0.3)
    questions = ["Add 2 and 3.", "Say hi."]
    examples = prompts_from_examples(
        [data.encoder.encode(Conversation([{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]))
         for q in questions], tok)
    seed = rollout_seed(cfg.train.seed, 5, 1)
    model.train()
    _, _, samples = rollout(state.objective, state, examples, seed)
    save_adapter(model, cfg.peft, tmp_path / "adapter")
    gen_model, gen_tok, encoder, _ = load_for_generation(None, str(tmp_path / "adapter"), grpo_args(tmp_path))
    prompts = [q for q in questions for _ in range(3)]
    answers = generate(gen_model, gen_tok, encoder, prompts, max_new_tokens=8, temperature=0.9, top_p=0.95,
                       batch_size=len(prompts), seed=seed)
    assert [s["completion"] for s in samples] == answers
    assert len(set(answers[:3])) > 1  # sampled: a group differs (else the test could not tell seeds apart)
    other = generate(gen_model, gen_tok, encoder, prompts, max_new_tokens=8, temperature=0.9, top_p=0.95,
                     batch_size=len(prompts), seed=seed + 1)
    assert other != answers


REWARDS = '''
def bad_raises(completion, answer):
    raise ValueError("no digits in " + completion[:5])

def bad_string(completion):
    return "high"

def chars(completion, **kwargs):
    return len(completion) / 10
'''


@pytest.mark.parametrize("fn,message", [("bad_raises", "raised ValueError: no digits in"),
                                        ("bad_string", "returned 'high'; a reward must return a finite number")])
def test_a_bad_reward_stops_the_run_naming_function_record_and_value(tmp_path, fn, message):
    from peftlab.train.loop import train
    from peftlab.train.rewards import RewardError

    (tmp_path / "rw.py").write_text(REWARDS)
    with pytest.raises(RewardError) as e:
        train(load_config(None, grpo_args(tmp_path, f"grpo.rewards=[exact_match,{tmp_path / 'rw.py'}:{fn}]")))
    text = str(e.value)
    assert f"rw.py:{fn}" in text and "qa.jsonl" in text and message in text and "completion" in text


@pytest.mark.parametrize("extra,message", [
    (["grpo.rewards=[nosuch]"], "neither a built-in"),
    (["grpo.rewards=[format]"], "grpo.format_pattern is not set"),
    (["grpo.rewards=[json:nosuch]"], "json has no function 'nosuch'"),
    (["grpo.rewards=[exact_match]", "grpo.reward_weights=[1,2]"], "2 weights for 1 rewards"),
    (["grpo.num_generations=1"], "grpo.num_generations must be >= 2"),
    (["grpo.num_iterations=2", "train.save_every=3"], "not a multiple of grpo.num_iterations=2"),
])
def test_bad_grpo_settings_are_named(tmp_path, extra, message):
    from peftlab.train.loop import train

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        train(load_config(None, grpo_args(tmp_path, *extra)))


def test_a_step_moves_the_policy_toward_high_advantages_and_mu_reuses_the_generation(tmp_path):
    """With num_iterations=2 the second step trains on the first step's completions (the sampler
    does not move); after one step their probability has risen where the advantage is positive
    and fallen where it is negative; the KL against the adapters-off model is logged (beta > 0)."""
    from peftlab.train.grpo_rollout import completion_logps
    from peftlab.train.step import train_step

    (tmp_path / "rw.py").write_text(REWARDS)
    cfg, model, tok, data, state = started(tmp_path, f"grpo.rewards=[{tmp_path / 'rw.py'}:chars]",
                                           "grpo.num_iterations=2", "grpo.beta=0.1", "train.lr=2e-2")
    positions = []
    draw = lambda: positions.append(1) or data.train[:2]  # noqa: E731
    micro = state.objective.batches(state, draw, 1)
    batch = micro[0]
    assert batch["advantages"].abs().sum() > 0 and "old_logps" in batch and "ref_logps" in batch
    first = train_step(state, micro)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the base: the reference
    texts = [s["completion"] for s in state.objective.samples]
    assert first["reward"] == pytest.approx(sum(len(t) for t in texts) / 10 / len(texts), abs=1e-5)
    again = state.objective.batches(state, draw, 1)
    assert again is micro and len(positions) == 1
    model.eval()
    with torch.no_grad():
        delta = ((completion_logps(model, batch, cfg.grpo.temperature) - batch["old_logps"])
                 * batch["completion_mask"]).sum(1)
    adv = batch["advantages"]
    assert float((delta * adv).sum()) > 0
    second = train_step(state, again)
    assert second["kl"] > 0 and 0 <= second["clip_ratio"] <= 1
    state.objective.batches(state, draw, 1)
    assert len(positions) == 2  # step 2 starts a new generation


def test_grpo_in_the_loop_logs_rewards_kl_and_completions(tmp_path):
    from peftlab.train.loop import train

    result = train(load_config(None, grpo_args(tmp_path, "grpo.rewards=[exact_match,length_penalty]",
                                               "grpo.reward_weights=[1,0.5]", "grpo.beta=0.05",
                                               "train.eval_every=2", "grpo.log_completions=2")))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "reward_std", "reward_exact_match", "reward_length_penalty_std", "kl", "clip_ratio",
                "completion_length", "completions_per_s"):
        assert key in rows[0], key
    r = rows[0]
    assert r["reward"] == pytest.approx(r["reward_exact_match"] + 0.5 * r["reward_length_penalty"], abs=1e-5)
    assert r["label_tokens"] == 2 * 3  # units: completions (loss_type grpo)
    last = rows[-1]
    assert {"eval_loss", "eval_reward", "eval_reward_exact_match"} <= set(last)
    assert len(last["completions"]) == 2 and {"prompt", "completion", "answer", "reward"} <= set(last["completions"][0])
    assert result.artifact is not None and (result.artifact / "adapter_model.safetensors").is_file()
    pytest.importorskip("matplotlib")
    from peftlab.lab.plots import curves_figure

    fig = curves_figure({"grpo": rows})  # the report's plot: reward and KL under the loss curves
    reward_ax, kl_ax = fig.axes[2], fig.axes[3]
    assert reward_ax.get_title().startswith("reward") and kl_ax.get_title().startswith("KL")
    assert list(reward_ax.get_lines()[0].get_ydata()) == [x["reward"] for x in rows]
    assert list(kl_ax.get_lines()[0].get_ydata()) == [x["kl"] for x in rows]


WALL_CLOCK = ("tokens_per_s", "rollout_s", "completions_per_s")


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(tmp_path):
    """As tests/test_resume.py proves for SFT: a GRPO run killed by SIGKILL after step 3 and resumed
    from its step-2 checkpoint ends with the uninterrupted run's adapter bit for bit and its metrics
    line for line (the sampling seeds, the reused generation and dropout's RNG all come back)."""
    import signal

    from safetensors.torch import load_file

    from peftlab.train import checkpoint as ckpt
    from peftlab.train.loop import train
    from test_resume import run_killed

    (tmp_path / "rw.py").write_text(REWARDS)
    extra = ["train.steps=6", "train.save_every=2", "grpo.num_iterations=2", "peft.dropout=0.1", "grpo.beta=0.05",
             "train.eval_every=3", f"grpo.rewards=[exact_match,{tmp_path / 'rw.py'}:chars]"]
    train(load_config(None, grpo_args(tmp_path, *extra, name="ref")))
    args = grpo_args(tmp_path, *extra, name="run")
    assert run_killed(tmp_path, args, "after_step", 3) == -signal.SIGKILL
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2]
    train(load_config(None, args), resume=True)

    def rows(run):
        out = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in out]

    assert rows("run") == rows("ref") and len(rows("ref")) == 6
    a, b = (load_file(str(tmp_path / r / "adapter" / "adapter_model.safetensors")) for r in ("run", "ref"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 1e-4 for k in a if "lora_B" in k), "the adapters must have trained"


@pytest.mark.slow
def test_two_processes_train_as_one_with_twice_the_accumulation(tmp_path):
    """torchrun (gloo, CPU): each rank samples its own prompts' groups with the seed of its
    micro-batch's global place, so 2 processes x grad_accum 1 equal 1 process x grad_accum 2:
    losses, rewards, KL, gradient norms and the adapter (to fp32 round-off of the cross-rank sum)."""
    from safetensors.torch import load_file

    from peftlab.train.loop import train
    from test_distributed import torchrun

    (tmp_path / "rw.py").write_text(REWARDS)
    extra = ["train.steps=3", "grpo.beta=0.05", "grpo.loss_type=bnpo", "train.eval_every=3",
             f"grpo.rewards=[exact_match,{tmp_path / 'rw.py'}:chars]", "grpo.log_completions=2"]
    train(load_config(None, grpo_args(tmp_path, *extra, "train.grad_accum=2", name="one")))
    proc = torchrun(grpo_args(tmp_path, *extra, "train.grad_accum=1", name="two"))
    assert "2 processes (ddp)" in proc.stderr

    def rows(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    one, two = rows("one"), rows("two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for x, y in zip(two, one):
        assert x["label_tokens"] == y["label_tokens"] and x.get("completions") == y.get("completions")
        for key in ("loss", "grad_norm", "reward", "reward_std", "kl", "clip_ratio", "completion_length",
                    "eval_loss", "eval_reward"):
            assert (key in x) == (key in y), key
            if key in x:
                assert abs(x[key] - y[key]) <= 5e-6 * abs(y[key]) + 1e-6, (x["step"], key, x[key], y[key])
    a, b = (load_file(str(tmp_path / r / "adapter" / "adapter_model.safetensors")) for r in ("two", "one"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    assert any(a[k].abs().max() > 1e-4 for k in a if "lora_B" in k), "the adapters must have trained"


def test_rollout_prompts_answers_and_masks_are_the_eval_harnesss(tmp_path):
    """What GRPO trains on is what the held-out eval scores (docs/results.md section 4 checked each
    link when GRPO lowered held-out exact match): the rollout's prompt is the prompt ``peftlab
    generate`` renders for the record, token for token (same template, same generation prompt); its
    answer is the record's last assistant turn; the exact-match reward is eval's exact match; a
    completion is cut after its first stop token, which is trained on, and the pads after it are
    masked out of the loss."""
    from peftlab.data.dataset import build_datasets
    from peftlab.data.prompts import prompts_from_examples
    from peftlab.eval.metrics import exact_match as eval_exact_match
    from peftlab.train.grpo_rollout import cut_at_stop, layout
    from peftlab.train.rewards import exact_match

    cfg, model, tok, data, state = started(tmp_path)
    ds = build_datasets(cfg.data, tok, cfg.train.seed)
    prompts = prompts_from_examples(ds.eval, tok)
    assert len(prompts) == len(ds.eval_records) == 4
    for p, rec in zip(prompts, ds.eval_records):
        assert p.input_ids == list(ds.encoder.prompt_ids(rec.messages[:-1]))
        assert p.answer == rec.messages[-1]["content"]
    for got, want in [("one two  three", "one two three"), (" 5\n", "5"), ("Red", "red"), ("5.", "5"), ("", "")]:
        assert exact_match(got, want) == eval_exact_match(got, want)
    eos, pad = 7, 0
    rows = [cut_at_stop([5, 6, eos, 9, 9], {eos}), cut_at_stop([5, 6, 8], {eos})]
    assert rows == [[5, 6, eos], [5, 6, 8]]
    batch = layout([[1, 2], [1, 2]], [[5, eos], [5, 6, 8]], pad)
    assert batch["completion_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 5, eos, -100], [-100, -100, 5, 6, 8]]


def test_beta_from_an_init_from_adapter_measures_the_kl_to_the_starting_model(tmp_path):
    """The bug: with peft.init_from (GRPO from an SFT LoRA) the reference was the model with its
    adapter switched off, i.e. the base before SFT, so beta > 0 pulled the policy toward the base
    (the first step's KL was far from 0). The reference is now a frozen copy of the starting model,
    taken after the adapter is loaded: at the first step the policy is the reference, KL 0."""
    from peftlab import registry
    from peftlab.export.adapter import save_adapter
    from peftlab.train.loop import train
    from peftlab.train.reference import resolve_kind

    cfg, model, tok, data, state = started(tmp_path)
    randomize(model, std=0.3)  # a trained-looking adapter: far from the base
    save_adapter(model, cfg.peft, tmp_path / "sft_adapter")
    args = grpo_args(tmp_path, f"peft.init_from={tmp_path / 'sft_adapter'}", "grpo.beta=0.1", "train.steps=1",
                     "train.lr=1e-9", name="grpo")
    run_cfg = load_config(None, args)
    assert resolve_kind("auto", registry.get("lora"), run_cfg.peft, model) == "frozen_copy"
    assert resolve_kind("adapter_off", registry.get("lora"), run_cfg.peft, model) == "adapter_off"  # asked by name
    train(run_cfg)
    row = json.loads((tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["kl"] == pytest.approx(0.0, abs=1e-6)


def test_per_reward_std_is_pooled_over_processes():
    """reward_<name>_std is the std of every process's completions together, not a mean of per-rank stds."""
    from types import SimpleNamespace

    from peftlab.train.preference import reduce_stats

    ranks = [torch.tensor([0.0, 1.0, 1.0]), torch.tensor([5.0, 6.0, 7.0])]
    stats = [{"reward_em": (float(x.sum()), 3), "reward_em__sq": (float((x ** 2).sum()), 3)} for x in ranks]
    names = sorted(stats[0])
    both = torch.tensor([v for k in names for v in (stats[0][k][0] + stats[1][k][0], 6)], dtype=torch.float64)
    dist = SimpleNamespace(world_size=2, all_reduce_sum=lambda flat: both)
    out = reduce_stats(stats[0], dist, "cpu")
    pooled = torch.cat(ranks)
    assert out == {"reward_em": round(float(pooled.mean()), 6), "reward_em_std": round(float(pooled.std()), 6)}
    alone = reduce_stats(stats[1], SimpleNamespace(world_size=1), "cpu")
    assert alone["reward_em_std"] == round(float(ranks[1].std()), 6)
