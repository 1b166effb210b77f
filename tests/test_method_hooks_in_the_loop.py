"""The methods beyond LoRA inside the one training loop and the CLI.

- prefix tuning trains with ``train()``, its MLP is folded before saving, and ``peftlab generate
  --run`` (a subprocess: load config, model, adapter, template) answers exactly as the trained
  model does in process;
- LISA switches layers through ``on_step`` and a resumed run equals an uninterrupted one
  (same losses, same weights), checkpoints holding tied embeddings included;
- MoE-LoRA's load-balancing loss reaches the router and its statistics reach metrics.jsonl;
- ``peftlab params --json`` reports the closed-form counts for every method (LISA: also the
  parameters trainable at once and the total it cycles through).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftlab
from conftest import tiny_overrides
from peftlab import cli
from peftlab.configure import load_config
from peftlab.train.loop import train
from test_contract import CASES, base_overrides, expected, peft_settings

SRC = str(Path(peftlab.__file__).resolve().parents[1])
RECORDS = [
    {"messages": [{"role": "user", "content": f"Repeat the word {w}."}, {"role": "assistant", "content": w}]}
    for w in "apple river stone cloud green happy quiet orange window silver music garden".split()
]


def run_overrides(tmp_path: Path, method: list[str], steps: int, out: str) -> list[str]:
    data = tmp_path / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return [*tiny_overrides("llama"), "model.seed=0", f"data.path={data}", "data.eval_split=4",
            "data.max_length=64", "train.batch_size=4", "train.progress=false", "train.schedule=constant",
            "train.warmup=0", "train.overwrite=true", "train.eval_every=0", f"train.steps={steps}",
            f"train.output_dir={tmp_path / out}", *method]


def test_prefix_tuning_trains_folds_and_generates_from_the_cli(tmp_path):
    from safetensors import safe_open

    from peftlab.eval.generate import generate

    cfg = load_config(None, run_overrides(tmp_path, ["peft.method=prefix_tuning", "peft.num_virtual_tokens=4",
                                                     "train.lr=1e-2"], 3, "run"))
    result = train(cfg)
    assert result.model.prompt_encoder.projection is False  # the MLP was folded before saving
    with safe_open(str(result.artifact / "adapter_model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"]
    prompts = ["Repeat the word apple.", "Repeat the word stone."]
    expected = generate(result.model, result.tokenizer, result.encoder, prompts, max_new_tokens=6)
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "peftlab", "generate", "--run", str(result.run_dir),
                          "--max-new-tokens", "6", *sum((["--prompt", p] for p in prompts), [])],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    answers = [block.split("\n", 1)[1].strip() for block in out.stdout.split("### ")[1:]]
    assert answers == expected


def test_lisa_resume_equals_uninterrupted_run(tmp_path):
    method = ["peft.method=lisa", "peft.layers=1", "peft.interval=2", "train.lr=1e-3"]
    straight = train(load_config(None, run_overrides(tmp_path, method, 4, "a")))
    assert [m["lisa_layers"] for m in straight.metrics] and all("lisa_layers" in m for m in straight.metrics)
    first = run_overrides(tmp_path, [*method, "train.save_every=1"], 2, "b")
    train(load_config(None, first))
    resumed = train(load_config(None, run_overrides(tmp_path, [*method, "train.save_every=1"], 4, "b")), resume=True)
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in straight.metrics]
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert (straight.run_dir / "model" / "config.json").is_file()  # LISA saves a whole model


def test_moe_aux_loss_reaches_router_and_metrics(tmp_path):
    from conftest import batch_of
    from peftlab.train.loss import causal_lm_loss
    from test_contract import applied

    case = next(c for c in CASES if c.id == "moe_lora_top2")
    for coef, moves in ((0.0, False), (0.1, True)):
        model, method, cfg = applied(case, "llama")
        cfg.aux_loss_coef = coef
        router = model.model.layers[0].self_attn.q_proj.moe_router.weight
        before = router.detach().clone()
        batch = batch_of()
        loss, n = causal_lm_loss(model.train(), batch)
        aux = method.aux_loss(model, cfg, batch)
        ((loss + (aux * n if aux is not None else 0)) / n).backward()
        # B = 0 at init, so the LM loss gives the router no gradient: only L_aux can move it
        assert (router.grad is not None and bool(router.grad.abs().sum() > 0)) == moves
        assert torch.equal(router.detach(), before)
    result = train(load_config(None, run_overrides(tmp_path, ["peft.method=moe_lora", "peft.r=2",
                                                              "peft.num_experts=[2,4]", "peft.top_k=1"], 2, "moe")))
    rec = result.metrics[-1]
    assert {"moe_aux_loss", "moe_load_max", "moe_router_entropy"} <= set(rec)
    assert 0.5 - 1e-6 <= rec["moe_load_max"] <= 1.0  # 2-expert routers: the busier one has at least half


PARAMS_CASES = [pytest.param(c, a, id=f"{c.id}-{a}") for c in CASES if c.vocab for a in c.archs]  # beyond LoRA


def _value(v) -> str:
    return json.dumps(v) if isinstance(v, (list, bool)) else str(v)


@pytest.mark.parametrize("case,arch", PARAMS_CASES)
def test_params_json_matches_formula(case, arch, capsys):
    args = [*tiny_overrides(arch, **base_overrides(case, arch)),
            *[f"peft.{k}={_value(v)}" for k, v in peft_settings(case, arch).items()]]
    assert cli.main(["params", *args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    count = sum(expected(case, arch).values())
    assert report["trainable"] == count
    if case.method == "lisa":
        assert report["lisa_trainable_at_once"] == count
        assert report["lisa_cycled_total"] == report["total"]


def test_params_cli_subprocess_for_lisa_on_gpt2_small():
    """The real entry point, on the full-size GPT-2 config (meta device, no weights)."""
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "peftlab", "params", "model.name=config:gpt2", "peft.method=lisa",
                          "peft.layers=2", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    d, layer = 768, 7_087_872  # one GPT-2 small block: 12·d² + 13·d
    assert 12 * d * d + 13 * d == layer
    assert report["total"] == 124_439_808
    outside = 124_439_808 - 12 * layer
    assert report["lisa_trainable_at_once"] == outside + 2 * layer == report["trainable"]
    assert report["lisa_cycled_total"] == 124_439_808
