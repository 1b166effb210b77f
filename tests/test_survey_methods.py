"""What issue 18's survey methods (part A) promise beyond the contract (tests/test_contract.py proves
identity, counts, save/load, merge or its refusal, learning, generation for each):

- KronA: the merged weight difference is s · A ⊗ B, and PEFT's LoKr with whole factors computes the same logits;
- Compacter: every projection is Σ_i A_i ⊗ s_i t_iᵀ with one shared set of rules;
- MoV: one expert is (IA)3 (whose parity with PEFT the contract proves); the scale is the router's mix;
- LoRAMoE: the localized balancing loss equals its formula, reaches the router through the loop, and
  reads the batch's sample types;
- Chain of LoRA / PeriodicLoRA: a restart leaves the logits unchanged, moves W by exactly the unloaded
  share of s B A, drops the optimiser state, follows each paper's schedule, and a run resumed across a
  restart equals one that never stopped; a quantised base is refused up front.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import (
    batch_logits,
    batch_of,
    perturb,
    randomize,
    small_model,
    tiny_overrides,
    train_config,
    with_method,
)
from peftlab.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- KronA


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_krona_merged_difference_is_s_times_a_kron_b(arch):
    from peftlab.methods.lycoris import LycorisLinear

    model, method, cfg = with_method(small_model(arch), "krona", factor=4, scale=1.5)
    perturb(model, std=0.1)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LycorisLinear)}
    want = {}
    for name, layer in layers.items():
        a, b = layer.lokr_w1.detach(), layer.lokr_w2.detach()
        assert a.shape == (4, 4)
        delta = 1.5 * torch.kron(a, b)  # [out, in]
        want[name] = (layer.base_layer.weight.detach().clone(), delta.T if layer.fan_in_fan_out else delta)
    method.merge(model)
    for name, (w0, delta) in want.items():
        torch.testing.assert_close(model.get_submodule(name).weight.detach() - w0, delta, atol=1e-6, rtol=0)


def test_krona_equals_peft_lokr_with_whole_factors():
    from peft import LoKrConfig, get_peft_model

    model, _, _ = with_method(small_model("llama"), "krona", scale=2.0)
    perturb(model, std=0.1)
    # PEFT keeps W2 whole when r >= max(b, d) / 2; its scale is alpha / r
    theirs = get_peft_model(small_model("llama"), LoKrConfig(r=64, alpha=128, target_modules="all-linear"))
    ours = {k: v for k, v in model.state_dict().items() if "lokr_" in k}
    mine = {k.replace("base_model.model.", "").replace(".default", ""): k for k in theirs.state_dict() if "lokr_" in k}
    assert set(mine) == set(ours)
    theirs.load_state_dict({mine[k]: v for k, v in ours.items()}, strict=False)
    batch = batch_of()
    torch.testing.assert_close(batch_logits(model, batch), batch_logits(theirs.eval(), batch), atol=1e-5, rtol=0)


def test_krona_refuses_a_bad_factor():
    with pytest.raises(ConfigError, match="peft.factor"):
        with_method(small_model("llama"), "krona", factor=0)


# ---------------------------------------------------------------------------- Compacter


def test_compacter_projections_are_sums_of_kronecker_products_with_shared_rules():
    from peftlab.methods.compacter import PHMLinear

    model, _, _ = with_method(small_model("llama"), "compacter", bottleneck=8, phm_dim=4, phm_rank=2)
    perturb(model, std=0.1)
    rules = model.peftlab_compacter.phm_rule
    phms = [m for m in model.modules() if isinstance(m, PHMLinear)]
    assert len(phms) == 2 * 2 * 2  # down and up, attn and ffn, 2 layers
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    for layer in phms:
        assert layer.rules.phm_rule is rules  # the slow weights: one tensor for every projection
        w = sum(torch.kron(rules[i], layer.phm_s[i] @ layer.phm_t[i].T) for i in range(4))
        assert w.shape == (layer.out_features, layer.in_features)
        xi = x[:, :layer.in_features] if layer.in_features < 64 else x
        torch.testing.assert_close(layer(xi), xi @ w.T + layer.bias, atol=1e-5, rtol=0)


def test_compacter_refuses_a_phm_dim_that_does_not_divide():
    with pytest.raises(ConfigError, match="phm_dim=3 must divide peft.bottleneck"):
        with_method(small_model("llama"), "compacter", bottleneck=8, phm_dim=3)
    with pytest.raises(ConfigError, match="phm_dim=16 must divide the model's hidden size 72"):
        with_method(small_model("llama", hidden=72, heads=4, kv_heads=2), "compacter", bottleneck=16, phm_dim=16)


# ---------------------------------------------------------------------------- MoV


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_mov_with_one_expert_is_ia3(arch):
    """softmax over one expert is 1: MoV(N = 1) scales by l_1 exactly as (IA)3 does with l = l_1."""
    mov, _, _ = with_method(small_model(arch), "mov", num_experts=1)
    ia3, _, _ = with_method(small_model(arch), "ia3")
    perturb(mov, std=0.2)
    with torch.no_grad():
        for name, layer in mov.named_modules():
            if hasattr(layer, "mov_experts"):
                ia3.get_submodule(name).ia3_l.copy_(layer.mov_experts.view_as(ia3.get_submodule(name).ia3_l))
    batch = batch_of()
    assert torch.equal(batch_logits(mov, batch), batch_logits(ia3, batch))


def test_mov_scale_is_the_routers_mix():
    from peftlab.methods.mov import MoVLinear

    layer = MoVLinear(torch.nn.Linear(16, 8), feedforward=False, num_experts=3)
    with torch.no_grad():
        layer.mov_experts.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    g = torch.softmax(x @ layer.mov_router.weight.T, -1)
    want = sum(g[..., i:i + 1] * layer.mov_experts[i] for i in range(3)) * layer.base_layer(x)
    torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- LoRAMoE


def test_loramoe_localized_balance_equals_the_formula():
    from peftlab.methods.loramoe import coefficients, localized_balance

    probs = torch.softmax(torch.randn(7, 4, generator=torch.Generator().manual_seed(0)), -1)
    types = torch.tensor([0, 1, 1, 0, 1, 1, 1])
    groups, delta = [1, 3], 0.25
    z = torch.zeros(4, 2)
    for n in range(4):
        for m in range(2):
            q = sum(float(probs[t, n]) for t in range(7) if types[t] == m) / 7
            own = (n < 1) == (m == 0)
            z[n, m] = (1 + delta if own else 1 - delta) * q
    want = z.var(unbiased=False) / z.mean()
    assert coefficients(groups, delta).tolist() == [[1.25, 0.75], [0.75, 1.25], [0.75, 1.25], [0.75, 1.25]]
    torch.testing.assert_close(localized_balance(probs, types, coefficients(groups, delta)), want, atol=1e-6, rtol=0)


def test_loramoe_aux_reaches_the_router_through_the_loop_and_reads_sample_types():
    from peftlab.train.step import start_training, train_step

    model, method, cfg = with_method(small_model("llama"), "loramoe", r=2, num_experts=4, expert_groups=[2, 2],
                                     aux_loss_coef=1.0)
    batch = batch_of()
    model.train()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    as_type0 = method.aux_loss(model, cfg, batch)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    as_types = method.aux_loss(model, cfg, {**batch, "sample_type": torch.tensor([1, 0])})
    assert as_type0 is not None and as_types is not None and not torch.equal(as_type0, as_types)
    # only the FFN is adapted; B = 0 at init, so the LM loss gives the router no gradient: the step that
    # moves it is the aux loss, added by the loop's own train_step
    assert all(".mlp." in n for n, p in model.named_parameters() if p.requires_grad)
    router = model.model.layers[0].mlp.down_proj.moe_router.weight
    before = router.detach().clone()
    state = start_training(model, train_config(cfg, 1e-2), 2)
    record = train_step(state, [batch])
    assert record["aux_loss"] > 0 and "moe_aux_loss" in record and "moe_router_entropy" in record
    assert not torch.equal(router.detach(), before)


def test_loramoe_refuses_groups_that_do_not_add_up():
    with pytest.raises(ConfigError, match="must equal the sum of peft.expert_groups"):
        with_method(small_model("llama"), "loramoe", num_experts=5, expert_groups=[3, 3])
    with pytest.raises(ConfigError, match="routes densely"):
        with_method(small_model("llama"), "loramoe", top_k=2)


# ---------------------------------------------------------------------------- Chain of LoRA, PeriodicLoRA


@pytest.mark.parametrize("method,keep", [("chain_lora", 0.0), ("periodic_lora", 0.5), ("relora", 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_restart_keeps_the_logits_and_moves_w_by_the_unloaded_share(method, keep, dtype):
    from peftlab.methods import relora
    from peftlab.methods.lowrank import lora_layers

    model, _, cfg = with_method(small_model("gpt2", initializer_range=0.02).to(dtype), method, r=4)
    randomize(model, names=("lora_B",))
    layers = lora_layers(model)
    before = {n: (m.base_layer.weight.detach().clone(), m.delta_weight().to(dtype), m.lora_A.weight.detach().clone(),
                  m.lora_B.weight.detach().clone()) for n, m in layers.items()}
    batch = batch_of()
    ref = batch_logits(model, batch)
    relora.restart(model, cfg, keep=keep)
    torch.testing.assert_close(batch_logits(model, batch), ref, atol=1e-5 if dtype == torch.float32 else 1e-10, rtol=0)
    for n, m in layers.items():
        w0, delta, a, b = before[n]
        torch.testing.assert_close(m.base_layer.weight.detach(), w0 + (1 - keep) * delta, atol=1e-6, rtol=0)
        if keep:  # momentum: A stays, B keeps its share
            assert torch.equal(m.lora_A.weight, a) and torch.equal(m.lora_B.weight, keep * b)
        else:  # a fresh link: new A, B = 0
            assert not torch.equal(m.lora_A.weight, a) and not m.lora_B.weight.any()


def test_chain_lora_links_follow_the_run_and_each_starts_a_fresh_optimiser():
    from peftlab.train.step import start_training, train_step

    model, _, cfg = with_method(small_model("llama"), "chain_lora", r=2, chain_links=3)
    state = start_training(model, train_config(cfg, 1e-2), 6)  # links of 2 steps: restarts after 2 and 4, not 6
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    records = [train_step(state, [batch_of()]) for _ in range(6)]
    assert [r.get("chain_link") for r in records] == [None, 2, None, 3, None, None]
    steps = {int(state.optimizer.state[p]["step"]) for p in lora}
    assert steps == {2}  # Adam's own count restarted with the last link (steps 5 and 6)


def test_periodic_lora_unloads_every_k_steps_and_resets_the_optimiser():
    from peftlab.train.step import start_training, train_step

    model, _, cfg = with_method(small_model("llama"), "periodic_lora", r=2, unload_every=2, unload_momentum=0.25)
    state = start_training(model, train_config(cfg, 1e-2), 3)
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    w = model.model.layers[0].self_attn.q_proj.base_layer.weight
    w0 = w.detach().clone()
    train_step(state, [batch_of()])
    assert torch.equal(w, w0) and all(p in state.optimizer.state for p in lora)
    train_step(state, [batch_of()])  # step 2: unload
    assert not torch.equal(w, w0) and not any(p in state.optimizer.state for p in lora)
    train_step(state, [batch_of()])
    assert {int(state.optimizer.state[p]["step"]) for p in lora} == {1}


@pytest.mark.parametrize("method,options,stop", [
    ("chain_lora", ["peft.chain_links=3"], 3),  # restarts after 2 and 4: resumed from 3, it crosses 4
    ("periodic_lora", ["peft.unload_every=2", "peft.unload_momentum=0.5"], 2),  # resumed from the restart itself
])
def test_resume_across_a_restart_equals_an_uninterrupted_run(tmp_path, method, options, stop):
    from peftlab.configure import load_config
    from peftlab.train.loop import train

    records = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
               for w in "apple river stone cloud green happy quiet orange".split()]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    def args(out: str) -> list[str]:
        return [*tiny_overrides("llama"), "model.seed=0", f"data.path={data}", "data.eval_split=2",
                "data.max_length=64", "train.batch_size=2", "train.progress=false", "train.schedule=constant",
                "train.warmup=0", "train.eval_every=0", "train.steps=6", "train.lr=1e-2", "train.save_every=1",
                "train.threads=1", "train.mixed_precision=no", f"train.output_dir={tmp_path / out}",
                f"peft.method={method}", "peft.r=2", "peft.dropout=0.1", *options]

    class Stop(Exception):
        pass

    def stop_at(rec: dict) -> None:
        if rec["step"] == stop:
            raise Stop

    straight = train(load_config(None, args("a")))
    with pytest.raises(Stop):
        train(load_config(None, args("b")), callbacks=[stop_at])
    resumed = train(load_config(None, args("b")), resume=True)
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in straight.metrics]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("method", ["chain_lora", "periodic_lora"])
def test_chains_refuse_a_quantised_base_up_front(method):
    import dataclasses

    from conftest import tiny_model_config
    from peftlab.model.load import load_model

    model, _ = load_model(dataclasses.replace(tiny_model_config("llama", vocab=1024), quantize="nf4"),
                          with_tokenizer=False)
    with pytest.raises(ConfigError, match="requantised.*model.quantize=none"):
        with_method(model, method)
