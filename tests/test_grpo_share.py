"""GRPO's shared-prompt forward (grpo.share_prompt, train/grpo_share.py) against the plain
[prompt ; completion] forward: the same completion log-probabilities and LoRA gradients, with
prompts of different lengths in one batch (their padding must stay invisible) and completions of
different lengths down to one token; where it runs and where it is refused; a run with it equals
a run without."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import randomize, tiny_model, with_method
from peftlab.configure import load_config
from peftlab.errors import ConfigError
from peftlab.train.grpo_rollout import completion_logps, layout
from peftlab.train.grpo_share import resolve, share_layout
from test_grpo import REWARDS, grpo_args

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT_LENGTHS = (4, 9, 6)  # one batch, three widths: the shorter prompts are padded
COMPLETION_LENGTHS = (1, 5, 3, 2, 1, 6, 4, 4, 1)  # G = 3 per prompt, some of one token


def grouped_batch(pad_id: int = 0, seed: int = 3, g: int = 3) -> dict:
    """layout's rows plus share_layout's fields for prompts of PROMPT_LENGTHS, G completions each."""
    gen = torch.Generator().manual_seed(seed)
    unique = [torch.randint(5, 900, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    completions = [torch.randint(5, 900, (n,), generator=gen).tolist() for n in COMPLETION_LENGTHS]
    batch = layout([p for p in unique for _ in range(g)], completions, 0)
    batch.update(share_layout(unique, completions, pad_id))
    return batch


def lora_model(targets: str = "all-linear"):
    model, _ = tiny_model("llama")
    model, _, _ = with_method(model, "lora", r=4, targets=targets)
    randomize(model)
    return model


def logps_and_grads(model, batch: dict, shared: bool, temperature: float = 0.7):
    params = [p for p in model.parameters() if p.requires_grad]
    logps = completion_logps(model, batch, temperature, shared)
    weights = torch.linspace(-1.0, 2.0, logps.numel()).view_as(logps)  # a loss that weighs every token differently
    grads = torch.autograd.grad((logps * weights).sum(), params)
    return logps.detach(), grads


def assert_close_grads(got: list, want: list, rel: float = 1e-5) -> None:
    """Each parameter's gradient within ``rel`` of the plain forward's, in norm (fp32 rounding of
    gradients of size ~50 here measures ~5e-6; a missing path, such as a prompt K/V cut off from
    the graph, differs by order 1)."""
    for a, b in zip(got, want):
        assert float(b.norm()) > 0
        assert float((a - b).norm()) <= rel * float(b.norm()), float((a - b).norm() / b.norm())


def test_shared_forward_equals_the_plain_forward_logps_and_lora_gradients():
    """LoRA on every linear layer (k_proj and v_proj included: the shared prompt K/V carry gradient
    from all G completions back into the prompt's layers)."""
    model = lora_model()
    batch = grouped_batch()
    assert batch["prompt_ids"].shape == (3, 9) and batch["completion_ids"].shape == (9, 6)
    want, want_grads = logps_and_grads(model, batch, shared=False)
    got, got_grads = logps_and_grads(model, batch, shared=True)
    mask = batch["completion_mask"].bool()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-6)  # ~-30 per token here: one fp32 ulp is 4e-6
    assert (got[~mask] == 0).all() and (want[mask] != 0).all()
    assert_close_grads(got_grads, want_grads)


def test_prompt_padding_is_invisible_to_the_completions():
    """The shorter prompts' padding sits inside the shared cache: whatever tokens fill it, the
    completions' log-probabilities do not move (a mask that let them in would see these differ)."""
    model = lora_model()
    with torch.no_grad():
        a = completion_logps(model, grouped_batch(pad_id=0), 1.0, shared=True)
        b = completion_logps(model, grouped_batch(pad_id=777), 1.0, shared=True)
        lp = max(PROMPT_LENGTHS)
        # the control: the same tokens where a real prompt token stands do move them
        c_batch = grouped_batch(pad_id=0)
        c_batch["prompt_ids"][0, PROMPT_LENGTHS[0]:] = 777
        c_batch["prompt_lengths"][0] = lp
        c = completion_logps(model, c_batch, 1.0, shared=True)
    assert torch.equal(a, b)
    assert not torch.allclose(a[:3], c[:3], atol=1e-3)


def test_all_completions_of_one_token_need_no_second_forward():
    model = lora_model()
    gen = torch.Generator().manual_seed(5)
    unique = [torch.randint(5, 900, (n,), generator=gen).tolist() for n in (7, 3)]
    completions = [[int(t)] for t in torch.randint(5, 900, (4,), generator=gen)]
    batch = layout([p for p in unique for _ in range(2)], completions, 0)
    batch.update(share_layout(unique, completions, 0))
    want, want_grads = logps_and_grads(model, batch, shared=False)
    got, got_grads = logps_and_grads(model, batch, shared=True)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-6)
    assert_close_grads(got_grads, want_grads)


def test_auto_shares_per_token_methods_and_true_refuses_the_others():
    model, _ = tiny_model("llama")
    assert resolve("auto", model, "lora") and resolve("true", model, "lora")
    assert not resolve("false", model, "lora")
    for method in ("prefix_tuning", "prompt_tuning"):  # virtual tokens / their own past_key_values
        assert not resolve("auto", model, method)
        with pytest.raises(ConfigError, match=f"method '{method}' is not a per-token method.*grpo.share_prompt=auto"):
            resolve("true", model, method)
    assert not resolve("auto", model, "lora", gradient_checkpointing=True)
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        resolve("true", model, "lora", gradient_checkpointing=True)
    gpt2, _ = tiny_model("gpt2")
    assert not resolve("auto", gpt2, "lora")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigError, match="attention 'flex_attention' .verified here: sdpa, eager"):
        resolve("true", model, "lora")


@pytest.mark.parametrize("spelled,meant", [("on", "true"), ("Yes", "true"), ("off", "false"), ("0", "false"),
                                           ("True", "true"), ("AUTO", "auto")])
def test_share_prompt_takes_the_usual_spellings_on_the_command_line(spelled, meant):
    from peftlab.configure import load_config

    assert load_config(None, [f"grpo.share_prompt={spelled}"]).grpo.share_prompt == meant
    with pytest.raises(ConfigError, match="grpo.share_prompt 'maybe' is not one of auto, true, false"):
        load_config(None, ["grpo.share_prompt=maybe"])


def grpo_objective(tmp_path, *extra: str, method: tuple[str, ...] = ()):
    """The GRPO objective a run builds (``method``: the peft.* overrides instead of LoRA r=4)."""
    from peftlab.train import setup
    from peftlab.train.pref_setup import build_objective, prepare_data

    args = [a for a in grpo_args(tmp_path, *extra) if not (method and a == "peft.r=4")]
    cfg = load_config(None, [*args, *method])
    model, tok = setup.prepared_model(cfg, None, None)
    data = setup.load_data(cfg, tok, cfg.train.seed)
    prepare_data(cfg, data)
    return build_objective(cfg, model, {}, data)


def test_a_prompt_method_run_falls_back_under_auto_and_is_refused_under_true(tmp_path):
    prefix = ("peft.method=prefix_tuning", "peft.num_virtual_tokens=2")
    assert grpo_objective(tmp_path, method=prefix).share is False
    with pytest.raises(ConfigError, match="grpo.share_prompt=true: method 'prefix_tuning'"):
        grpo_objective(tmp_path, "grpo.share_prompt=true", method=prefix)
    assert grpo_objective(tmp_path).share is True  # auto, LoRA on Llama
    assert grpo_objective(tmp_path, "model.gradient_checkpointing=true").share is False


def test_a_run_with_shared_prompts_equals_one_without(tmp_path):
    """The loop end to end (old log-probs with num_iterations=2, the KL reference with beta > 0):
    every step's loss, gradient norm, reward and KL agree with and without sharing."""
    from peftlab.train.loop import train

    (tmp_path / "rw.py").write_text(REWARDS)  # rewards the tiny model earns (exact match: never)
    rows = {}
    for share in ("true", "false"):
        train(load_config(None, grpo_args(tmp_path, f"grpo.share_prompt={share}", "grpo.beta=0.1",
                                          f"grpo.rewards=[{tmp_path / 'rw.py'}:chars]", "train.lr=2e-2",
                                          "grpo.num_iterations=2", "train.steps=3", name=share)))
        rows[share] = [json.loads(line) for line in (tmp_path / share / "metrics.jsonl").read_text().splitlines()]
    assert len(rows["true"]) == len(rows["false"]) == 3
    for a, b in zip(rows["true"], rows["false"]):
        for key in ("loss", "grad_norm", "reward", "kl", "clip_ratio", "completion_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert rows["true"][0]["grad_norm"] > 0 and rows["true"][-1]["kl"] > 0
