"""LoRA-family behaviour beyond the shared contract: each variant does what its paper says.

Expected values are formulas (written out here), not numbers copied from earlier runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftlab
from conftest import randomize, tiny_model, tiny_model_config, tiny_overrides
from peftlab import api, registry
from peftlab.config import Config, TrainConfig, build_dataclass
from peftlab.configure import load_config
from peftlab.errors import ConfigError
from peftlab.export.adapter import load_adapter, merge_adapters_first, save_adapter
from peftlab.model.load import load_model
from peftlab.train.optim import build_optimizer
from peftlab.train.step import start_training, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def applied(arch: str, raw: dict, seed: int = 0, **model_fields):
    method = registry.get(raw["method"])
    cfg = build_dataclass(method.config_cls, raw, "peft")
    if model_fields:
        model, _ = load_model(dataclasses.replace(tiny_model_config(arch), **model_fields), seed=seed,
                              with_tokenizer=False)
    else:
        model, _ = tiny_model(arch, seed=seed)
    merge_adapters_first(model, getattr(cfg, "merge_first", None))  # as the loop applies a method
    method.apply(model, cfg)
    return model, method, cfg


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def trainer(model, cfg, total: int = 100):
    """The loop's own start (on_train_start, init_from, AdamW over the method's groups) at a
    constant lr of 1e-2, without clipping, in fp32."""
    train = TrainConfig(lr=1e-2, schedule="constant", warmup=0, max_grad_norm=None, mixed_precision="no")
    return start_training(model, Config(peft=cfg, train=train), total)


def step(state, ids, n=1):
    """n optimiser steps through the loop's own ``train_step`` (aux loss, on_step and its effects)."""
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    state.model.train()
    for _ in range(n):
        assert train_step(state, [batch]) is not None
    state.model.eval()


# ---------------------------------------------------------------------------- LoRA+, LoRA-FA


def test_loraplus_gives_b_ratio_times_the_lr_and_embeddings_their_own():
    model, method, cfg = applied("llama", {"method": "lora", "r": 4, "targets": ["q_proj", "embed_tokens"],
                                           "loraplus_lr_ratio": 16, "loraplus_lr_embedding": 1e-5})
    opt = build_optimizer(model, method, cfg, TrainConfig(lr=1e-3, weight_decay=0.1))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        want = 1e-5 if "lora_embedding" in name else 16e-3 if "lora_B" in name else 1e-3
        assert lr_of[id(p)] == pytest.approx(want), name
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())


def test_lora_fa_trains_b_only(ids):
    model, method, cfg = applied("gpt2", {"method": "lora", "r": 4, "freeze_a": True})
    a0 = {n: p.clone() for n, p in model.named_parameters() if "lora_A" in n}
    step(trainer(model, cfg), ids, n=2)
    for n, p in model.named_parameters():
        if "lora_A" in n:
            assert torch.equal(p, a0[n]) and not p.requires_grad
        if "lora_B" in n:
            assert p.abs().sum() > 0


# ---------------------------------------------------------------------------- fused slices, sparsity dropout


def test_fused_c_attn_adapts_q_and_v_slices_only(ids):
    model, _, _ = applied("gpt2", {"method": "lora", "r": 4, "targets": ["c_attn"],
                                   "enable_lora": {"c_attn": [True, False, True]}})
    randomize(model, names=("lora_B",))
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 64)
    delta = layer(x) - layer.base_layer(x)
    a, b = layer.lora_A.weight, layer.lora_B.weight  # [2r, in], [2 * 64, r]
    q = x @ a[:4].T @ b[:64].T * layer.scaling
    v = x @ a[4:].T @ b[64:].T * layer.scaling
    torch.testing.assert_close(delta[:, :64], q, atol=1e-5, rtol=0)
    assert torch.equal(delta[:, 64:128], torch.zeros(3, 64))  # k untouched
    torch.testing.assert_close(delta[:, 128:], v, atol=1e-5, rtol=0)
    dw = layer.delta_weight()  # Conv1D layout [in, out]
    torch.testing.assert_close(x @ dw, delta, atol=1e-5, rtol=0)


def test_sparsity_dropout_drops_rows_of_b_and_columns_of_a():
    base = nn.Linear(32, 48)
    from peftlab.methods.lowrank import LoRALinear

    layer = LoRALinear(base, r=4, alpha=8, sparsity_dropout=0.25)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 32)
    layer.eval()
    exact = layer.lora_forward(x)
    layer.train()
    torch.manual_seed(0)
    draws = torch.stack([layer.lora_forward(x) for _ in range(4000)])
    dropped_out = (draws == 0).all(dim=1)  # [draws, out]: an output row of B dropped for the whole batch
    assert abs(dropped_out.float().mean().item() - 0.25) < 0.02
    torch.testing.assert_close(draws.mean(0), exact, atol=0.15 * exact.abs().mean().item(), rtol=0)  # unbiased
    # the input mask: with a one-hot input, dropping its column of A zeroes the whole output
    onehot = torch.zeros(1, 32)
    onehot[0, 3] = 1.0
    zero = torch.stack([(layer.lora_forward(onehot) == 0).all() for _ in range(4000)]).float().mean()
    assert abs(zero.item() - (0.25 + 0.75 * 0.25**48)) < 0.02  # its column of A, or every row of B


# ---------------------------------------------------------------------------- PiSSA, OLoRA, DoRA


def test_pissa_factors_are_the_principal_singular_triplets():
    model, _, cfg = applied("llama", {"method": "lora", "r": 4, "alpha": 8, "init": "pissa", "targets": ["q_proj"]})
    ref, _ = tiny_model("llama")
    layer = model.model.layers[0].self_attn.q_proj
    w = ref.model.layers[0].self_attn.q_proj.weight.detach()
    u, s, vh = torch.linalg.svd(w)
    top = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(layer.scaling * layer.lora_B.weight @ layer.lora_A.weight, top, atol=1e-4, rtol=0)
    torch.testing.assert_close(layer.base_layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight,
                               w, atol=1e-5, rtol=0)
    fast, _, _ = applied("llama", {"method": "lora", "r": 4, "alpha": 8, "init": "pissa", "pissa_niter": 6,
                                   "targets": ["q_proj"]})
    f = fast.model.layers[0].self_attn.q_proj
    approx = (f.scaling * f.lora_B.weight @ f.lora_A.weight).detach()
    # randomised SVD: a rank-4 approximation within 2% of the optimal error (Eckart-Young), here on a
    # matrix with a flat spectrum where the exact top subspace itself is ill-determined
    assert float((w - approx).norm()) < 1.02 * float((w - top).norm())
    torch.testing.assert_close(f.base_layer.weight + approx, w, atol=1e-5, rtol=0)


def test_olora_b_is_orthonormal_and_residual_restores_w():
    model, _, _ = applied("gpt2", {"method": "lora", "r": 4, "alpha": 8, "init": "olora", "targets": ["c_fc"]})
    ref, _ = tiny_model("gpt2")
    layer = model.transformer.h[1].mlp.c_fc
    b = layer.lora_B.weight
    torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)
    w = ref.transformer.h[1].mlp.c_fc.weight.detach().T  # Conv1D: [in, out] -> [out, in]
    torch.testing.assert_close(layer.base_layer.weight.T + layer.scaling * b @ layer.lora_A.weight, w,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("exact", [False, True])
def test_dora_is_magnitude_times_direction(exact):
    from peftlab.methods.dora import DoRAConfig, DoRALinear

    torch.manual_seed(0)
    base = nn.Linear(16, 12).double()
    layer = DoRALinear(base, DoRAConfig(r=3, alpha=6, exact_norm=exact))
    with torch.no_grad():
        torch.testing.assert_close(layer.lora_magnitude_vector, base.weight.norm(dim=1))  # m0 = ||W||_c
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(1.3)
    x = torch.randn(5, 16, dtype=torch.float64)
    y = layer(x)
    v = base.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    norm = v.norm(dim=1, keepdim=True)
    w_prime = layer.lora_magnitude_vector[:, None] * v / (norm if exact else norm.detach())
    torch.testing.assert_close(y, x @ w_prime.T + base.bias, atol=1e-10, rtol=0)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, layer.lora_A.weight, g)[0]
    want = torch.autograd.grad(x @ w_prime.T, layer.lora_A.weight, g)[0]
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)  # detached norm: the paper's gradient


# ---------------------------------------------------------------------------- VeRA


def test_vera_shares_one_seeded_projection_pair_and_never_saves_it(tmp_path):
    from peftlab.methods.vera import HOLDER, VeRALinear

    model, _, cfg = applied("llama", {"method": "vera", "r": 8, "projection_prng_key": 7})
    layers = [m for m in model.modules() if isinstance(m, VeRALinear)]
    assert len({id(m.projections) for m in layers}) == 1
    shared = getattr(model, HOLDER)
    assert shared.vera_A.shape == (8, 128) and shared.vera_B.shape == (128, 8)  # in_max = out_max = 128 (mlp)
    g = torch.Generator().manual_seed(7)
    bound_a = math.sqrt(6 / 128)
    torch.testing.assert_close(shared.vera_A, torch.empty(8, 128).uniform_(-bound_a, bound_a, generator=g))
    save_adapter(model, cfg, tmp_path / "v")
    from safetensors.torch import load_file

    names = load_file(str(tmp_path / "v" / "adapter_model.safetensors"))
    assert all("vera_lambda" in n for n in names) and len(names) == 2 * len(layers)


# ---------------------------------------------------------------------------- AdaLoRA


def test_adalora_budget_schedule_masks_and_reports_allocation(ids, capsys):
    from peftlab.methods import adalora

    model, method, cfg = applied("llama", {"method": "adalora", "init_r": 6, "target_r": 2, "tinit": 2,
                                           "tfinal": 2, "delta_t": 2})
    total, n = 12, len(adalora.layers(model))
    run = trainer(model, cfg, total)  # calls on_train_start
    state = adalora.allocator(model)
    assert (state.init_bgt, state.target_bgt) == (6 * n, 2 * n)
    for t in range(0, total + 1):  # the cubic schedule, written out
        if t <= 2:
            want = 6 * n
        elif t > total - 2:
            want = 2 * n
        else:
            want = int((6 * n - 2 * n) * (1 - (t - 2) / (total - 4)) ** 3 + 2 * n)
        assert state.budget(t, cfg)[0] == want
    step(run, ids, n=total)
    ranks = adalora.rank_allocation(model)
    assert sum(ranks.values()) <= 2 * n and set(ranks) == set(adalora.layers(model))
    kept = {p: int((m.lora_E != 0).sum()) for p, m in adalora.layers(model).items()}
    assert kept == ranks
    report = capsys.readouterr().err
    assert "final rank allocation" in report and all(p in report for p in ranks)


def test_adalora_orthogonality_penalty_formula():
    from peftlab.methods import adalora

    model, method, cfg = applied("gpt2", {"method": "adalora", "init_r": 3, "target_r": 2, "orth_reg_weight": 0.3})
    terms = []
    for m in adalora.layers(model).values():
        terms.append(torch.linalg.norm(m.lora_A @ m.lora_A.T - torch.eye(3)))
        terms.append(torch.linalg.norm(m.lora_B.T @ m.lora_B - torch.eye(3)))
    torch.testing.assert_close(method.aux_loss(model, cfg, None), 0.3 * torch.stack(terms).mean())


# ---------------------------------------------------------------------------- ReLoRA, Delta-LoRA


def test_relora_restart_merges_resets_and_rewarms(ids):
    from peftlab.methods import relora
    from peftlab.methods.lowrank import lora_layers

    model, method, cfg = applied("gpt2", {"method": "relora", "r": 4, "reset_every": 3, "restart_warmup": 2,
                                          "reset_prune": 0.9})
    run = trainer(model, cfg)
    opt = run.optimizer
    step(run, ids, n=2)
    before = logits(model, ids)
    layer = next(iter(lora_layers(model).values()))
    w0 = layer.base_layer.weight.clone()
    delta = layer.delta_weight()
    assert opt.param_groups[0]["lr"] == 1e-2
    step(run, ids, n=1)  # step 3: a restart after the update
    assert torch.equal(layer.lora_B.weight, torch.zeros_like(layer.lora_B.weight))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 1 / 2)  # re-warmup: step 4 runs at lr / 2
    assert not torch.equal(layer.base_layer.weight, w0 + delta)  # W absorbed step 3's (newer) delta
    m = opt.state[layer.lora_B.weight]["exp_avg"]
    assert (m == 0).sum() >= int(0.9 * m.numel())
    assert torch.equal((m == 0), (opt.state[layer.lora_B.weight]["exp_avg_sq"] == 0) | (m == 0))
    # the restart itself does not change the function
    model2, _, cfg2 = applied("gpt2", {"method": "relora", "r": 4})
    randomize(model2)
    ref = logits(model2, ids)
    relora.restart(model2, cfg2)
    torch.testing.assert_close(logits(model2, ids), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    assert before.shape == ref.shape


def test_delta_lora_moves_w_by_lambda_times_the_change_of_ba(ids):
    from peftlab.methods.lowrank import lora_layers

    model, method, cfg = applied("llama", {"method": "delta_lora", "r": 4, "delta_lambda": 0.5})
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    run = trainer(model, cfg)
    step(run, ids, n=1)
    w1, ba1 = layer.base_layer.weight.clone(), (layer.lora_B.weight @ layer.lora_A.weight).detach()
    step(run, ids, n=1)
    ba2 = (layer.lora_B.weight @ layer.lora_A.weight).detach()
    torch.testing.assert_close(layer.base_layer.weight, w1 + 0.5 * layer.scaling * (ba2 - ba1), atol=1e-6, rtol=0)


def test_delta_lora_refuses_a_quantised_base():
    with pytest.raises(ConfigError, match="quantise|4/8-bit"):
        applied("llama", {"method": "delta_lora"}, quantize="nf4")


# ---------------------------------------------------------------------------- extra modules, added tokens


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_extra_trained_head_on_tied_model_merges_to_a_loadable_hf_model(arch, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model, method, cfg = applied(arch, {"method": "lora", "r": 4, "additional_targets": ["lm_head"]})
    randomize(model, names=("lora_B", "modules_to_save"))
    want = logits(model, ids)
    method.merge(model)
    assert model.get_input_embeddings().weight is not model.get_output_embeddings().weight
    assert model.config.tie_word_embeddings is False
    model.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(again, ids), want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_added_tokens_save_and_reload(tmp_path):
    base, _ = tiny_model("llama")
    base.resize_token_embeddings(49152 + 8, mean_resizing=False)
    method = registry.get("lora")
    cfg = build_dataclass(method.config_cls, {"method": "lora", "r": 4, "targets": ["q_proj", "v_proj"],
                                              "additional_targets": ["embed_tokens", "lm_head"]}, "peft")
    method.apply(base, cfg)
    randomize(base, names=("lora_B", "modules_to_save"))
    new_ids = torch.tensor([[5, 49152, 49159, 17, 49155]])  # includes the added tokens
    want = logits(base, new_ids)
    save_adapter(base, cfg, tmp_path / "a")
    fresh, _ = tiny_model("llama")  # the original vocabulary
    load_adapter(fresh, tmp_path / "a")
    assert fresh.get_input_embeddings().weight.shape[0] == 49160
    assert torch.equal(logits(fresh, new_ids), want)


def test_additional_target_must_be_a_layer():
    with pytest.raises(ConfigError, match="container"):
        applied("llama", {"method": "lora", "additional_targets": ["mlp"]})


# ---------------------------------------------------------------------------- continuing from an adapter


def test_init_from_continues_an_adapter_and_checks_its_shape(ids, tmp_path):
    model, method, cfg = applied("gpt2", {"method": "lora", "r": 4})
    randomize(model)
    want = logits(model, ids)
    save_adapter(model, cfg, tmp_path / "first")
    cont, method, cfg2 = applied("gpt2", {"method": "lora", "r": 4, "init_from": str(tmp_path / "first")})
    trainer(cont, cfg2)  # the loop continues from peft.init_from when it starts training
    assert torch.equal(logits(cont, ids), want)
    bad, method, cfg3 = applied("gpt2", {"method": "lora", "r": 8, "init_from": str(tmp_path / "first")})
    with pytest.raises(ConfigError, match=r"peft\.r"):
        trainer(bad, cfg3)


def test_merge_first_stacks_a_fresh_adapter_on_the_merged_base(ids, tmp_path):
    first, method, cfg = applied("llama", {"method": "lora", "r": 4})
    randomize(first)
    save_adapter(first, cfg, tmp_path / "first")
    stacked, method, cfg2 = applied("llama", {"method": "dora", "r": 2, "targets": ["q_proj"],
                                              "merge_first": [str(tmp_path / "first")]})
    ref = logits(first, ids)  # the fresh adapter starts as a no-op on the merged base
    torch.testing.assert_close(logits(stacked, ids), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    randomize(stacked)
    want = logits(stacked, ids)
    save_adapter(stacked, cfg2, tmp_path / "second")
    fresh, _ = tiny_model("llama")
    load_adapter(fresh, tmp_path / "second")  # re-merges the first adapter, then loads the second
    assert torch.equal(logits(fresh, ids), want)


# ---------------------------------------------------------------------------- QLoRA merge precision


def test_qlora_merge_goes_into_the_dequantised_base(ids):
    """Merged (dequantised NF4 + delta) == unmerged in fp32; exporting in bf16 costs bf16 rounding;
    merging into the original float base instead (a common mistake) is far worse."""
    model, method, cfg = applied("llama", {"method": "lora", "r": 4}, quantize="nf4")
    randomize(model, std=0.02)
    want = logits(model, ids)
    scale = want.abs().max().item()
    state = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    method.merge(model)
    err_fp32 = (logits(model, ids) - want).abs().max().item() / scale
    err_bf16 = (logits(model.to(torch.bfloat16), ids).float() - want).abs().max().item() / scale
    wrong, _, _ = applied("llama", {"method": "lora", "r": 4})  # the original float base, same adapter
    with torch.no_grad():
        for n, p in wrong.named_parameters():
            if n in state:
                p.copy_(state[n])
    method.merge(wrong)
    err_wrong_base = (logits(wrong, ids) - want).abs().max().item() / scale
    assert err_fp32 < 1e-5
    assert err_bf16 < 0.1 * err_wrong_base
    assert err_wrong_base > 1e-2


# ---------------------------------------------------------------------------- the training loop and the CLI


def test_loop_runs_adalora_on_an_nf4_base(tmp_path):
    overrides = tiny_overrides("llama") + [
        "model.quantize=nf4", "peft.method=adalora", "peft.init_r=4", "peft.target_r=2", "data.path=builtin:tasks",
        "data.eval_split=8", "data.max_length=64", "train.steps=4", "train.batch_size=2", "train.grad_accum=2",
        "train.eval_every=0", "train.eval_batches=1", "train.progress=false", "train.threads=1",
        "train.mixed_precision='no'", f"train.output_dir={tmp_path / 'run'}",
    ]
    result = api.train(None, overrides)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all("aux_loss" in r and r["aux_loss"] > 0 for r in records)
    fresh, _ = load_model(dataclasses.replace(tiny_model_config("llama"), quantize="nf4"), seed=42,  # train.seed
                          with_tokenizer=False)
    load_adapter(fresh, result.artifact)
    batch = torch.randint(0, 500, (1, 9))
    assert torch.equal(logits(fresh, batch), logits(result.model, batch))


def test_params_cli_json_for_a_quantised_dora(tmp_path):
    src = str(Path(peftlab.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "peftlab", "params", *tiny_overrides("llama"), "peft.method=dora", "peft.r=2",
            "peft.targets=[q_proj,v_proj]", "model.quantize=nf4", "--json"]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    # per layer r (in + out) + out: q 64 -> 64, v 64 -> 32, 2 layers
    assert report["trainable"] == 2 * ((2 * (64 + 64) + 64) + (2 * (64 + 32) + 32))


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="peft.init"):
        load_config(None, ["peft.init=svd"])
    with pytest.raises(ConfigError, match="enable_lora"):
        load_config(None, ["peft.enable_lora={c_attn: [false, false]}"])
    with pytest.raises(ConfigError, match="enable_lora"):
        applied("llama", {"method": "lora", "enable_lora": {"c_attn": [True, True]}})
    with pytest.raises(ConfigError, match="unknown config key peft.exact_norm"):
        load_config(None, ["peft.exact_norm=true"])
    assert isinstance(load_config(None, ["peft.method=dora", "peft.exact_norm=true"]).peft.exact_norm, bool)


@pytest.mark.parametrize("arch, conv1d", [("gpt2", True), ("llama", False)])
def test_fan_in_fan_out_follows_the_base_layer_type(arch, conv1d, tmp_path):
    """GPT-2's Conv1D stores its weight [in, out]: each wrapper says so, and the adapter file records it
    (PEFT and vLLM read ``fan_in_fan_out`` to know the layout)."""
    model, _, cfg = applied(arch, {"method": "lora", "r": 2, "targets": "all-linear"})
    layers = [m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    assert layers
    for m in layers:
        assert isinstance(m.base_layer, Conv1D) is conv1d and m.fan_in_fan_out is conv1d
    save_adapter(model, cfg, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is conv1d
