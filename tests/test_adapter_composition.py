"""Method-specific behaviour of the adapter compositions: AdapterDrop, UniPELT, AdapterFusion, LoRA-drop.

The shared contract (identity, counts, save/load, merge refusal, learning, generation) is in
tests/test_contract.py; this file proves what each method adds, against a formula or a
hand-built reference.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import batch_logits as logits
from conftest import batch_of, perturb, small_model, with_method
from peftlab.errors import ConfigError
from peftlab.methods.adapter import BottleneckAdapter, decoder_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def three_layers(arch: str) -> dict:
    return {"n_layer": 3} if arch == "gpt2" else {"layers": 3}


# ---------------------------------------------------------------------------- AdapterDrop


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapter_drop_backward_stops_at_the_lowest_adapted_layer(arch):
    """With n = 1 nothing in layer 0 (or the embeddings) requires a gradient: autograd records no
    graph there, so the backward pass does no input-gradient work in the frozen layers below."""
    model, _, _ = with_method(small_model(arch, **three_layers(arch)), "adapter", bottleneck=4, drop_layers=1)
    needs_grad = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: needs_grad.__setitem__(
        i, (out[0] if isinstance(out, tuple) else out).requires_grad)) for i, (_, layer) in enumerate(decoder_layers(model))]
    model.train()
    batch = batch_of(0)
    model(**batch).loss.backward()
    for h in hooks:
        h.remove()
    assert needs_grad == {0: False, 1: True, 2: True}
    layer0 = decoder_layers(model)[0][1]
    assert not any(isinstance(m, BottleneckAdapter) for m in layer0.modules())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapter_drop_at_inference_skips_exactly_the_lower_adapters(arch):
    """drop_layers_inference = m: in eval mode the adapters below m are skipped — the output equals a
    model built with drop_layers = m carrying the same upper adapters; in train mode all of them run."""
    base = small_model(arch, **three_layers(arch))
    model, _, _ = with_method(copy.deepcopy(base), "adapter", bottleneck=4, drop_layers_inference=2)
    perturb(model)
    ref, _, _ = with_method(copy.deepcopy(base), "adapter", bottleneck=4, drop_layers=2)
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.requires_grad:
                p.copy_(own[name])
    batch = batch_of(1)
    assert torch.equal(logits(model.eval(), batch), logits(ref.eval(), batch))
    model.train()
    with torch.no_grad():
        train_out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(train_out, logits(ref, batch))
    # all layers skipped at inference: the base model's output exactly
    everything, _, _ = with_method(copy.deepcopy(base), "adapter", bottleneck=4, drop_layers_inference=3)
    perturb(everything)
    assert torch.equal(logits(everything.eval(), batch), logits(base, batch))


def test_adapter_drop_refuses_dropping_every_layer():
    with pytest.raises(ConfigError, match="drop_layers=2.*2 decoder layers"):
        with_method(small_model("llama"), "adapter", drop_layers=2)
    with pytest.raises(ConfigError, match="drop_layers_inference=0 is below peft.drop_layers=1"):
        with_method(small_model("llama"), "adapter", drop_layers=1, drop_layers_inference=0)


# ---------------------------------------------------------------------------- UniPELT


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_unipelt_prefix_gate_scales_the_prefix_values_per_query(impl):
    """The registered attention equals the formula o_i = Σ_real a_ij v_j + g_i Σ_prefix a_ij v_j with a
    the softmax over [P_k; K] (GQA: 4 query heads over 2 key/value heads), for either kernel."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: F401  (registered names)

    from peftlab.methods.unipelt import _gated_attention

    model, _, _ = with_method(small_model("llama"), "unipelt", r=2, num_virtual_tokens=3, encoder_hidden_size=8,
                              bottleneck=4)
    attn = decoder_layers(model)[0][1].self_attn.base
    g = torch.Generator().manual_seed(0)
    b, t, n, hd = 2, 5, 3, 16
    q = torch.randn(b, 4, t, hd, generator=g)
    k, v = torch.randn(b, 2, n + t, hd, generator=g), torch.randn(b, 2, n + t, hd, generator=g)
    causal = torch.ones(t, n + t, dtype=torch.bool).tril(diagonal=n)
    mask = torch.zeros(t, n + t).masked_fill(~causal, float("-inf"))[None, None].expand(b, 1, t, n + t)
    gate = torch.rand(b, t, 1, generator=g)
    attn._peftlab_prefix_gate = gate
    out, _ = _gated_attention(impl)(attn, q, k, v, mask if impl == "eager" else causal[None, None].expand(b, 1, t, n + t),
                                    scaling=hd ** -0.5, dropout=0.0)
    attn._peftlab_prefix_gate = None
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    a = torch.softmax(q @ kk.transpose(2, 3) * hd ** -0.5 + mask, dim=-1)  # [b, 4, t, n + t]
    a = torch.cat([a[..., :n] * gate[:, None], a[..., n:]], dim=-1)
    want = (a @ vv).transpose(1, 2)  # [b, t, 4, hd]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_unipelt_gates_are_used():
    """A fully open prefix gate (sigmoid(1e6) = 1) is plain prefix tuning (the gate switched off);
    a closed one changes the output; closing the LoRA and adapter gates removes their updates."""
    from peftlab.methods.unipelt import GatedAdapter, GatedLoRA, GatedPrefixAttention

    model, _, _ = with_method(small_model("llama"), "unipelt", r=2, num_virtual_tokens=3, encoder_hidden_size=8,
                              bottleneck=4)
    perturb(model, std=0.3)
    batch = batch_of(2)

    def set_bias(kind, value):
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, kind):
                    getattr(m, {GatedLoRA: "gate_lora", GatedAdapter: "gate_adapter",
                                GatedPrefixAttention: "gate_prefix"}[kind]).bias.fill_(value)

    set_bias(GatedPrefixAttention, 1e6)
    opened = logits(model, batch)
    for m in model.modules():
        if isinstance(m, GatedPrefixAttention):
            m.gate_prefix.register_forward_hook(lambda mod, i, o: o.fill_(float("inf")))  # sigmoid(inf) = 1
    assert torch.equal(logits(model, batch), opened)
    set_bias(GatedLoRA, -1e6)
    set_bias(GatedAdapter, -1e6)
    no_updates = logits(model, batch)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GatedLoRA):
                m.base.lora_B.weight.zero_()
            if isinstance(m, GatedAdapter):
                m.base.adapter_up.weight.zero_()
                m.base.adapter_up.bias.zero_()
    torch.testing.assert_close(logits(model, batch), no_updates, atol=1e-5, rtol=0)
    assert not torch.allclose(no_updates, opened, atol=1e-3)


# ---------------------------------------------------------------------------- AdapterFusion


def saved_adapter(tmp_path, name: str, arch: str = "llama", method: str = "adapter", seed: int = 1, **options) -> str:
    from peftlab.export.adapter import save_adapter

    model, _, cfg = with_method(small_model(arch), method, **options)
    perturb(model, std=0.2, seed=seed)
    return str(save_adapter(model, cfg, tmp_path / name))


def test_fusion_of_one_adapter_at_init_is_that_adapter(tmp_path):
    """N = 1: the softmax is 1 and V = I, so the fused model equals the adapter's own model."""
    from peftlab.export.adapter import load_adapter

    path = saved_adapter(tmp_path, "a", bottleneck=4)
    alone = small_model("llama")
    load_adapter(alone, path)
    fused, _, _ = with_method(small_model("llama"), "adapter_fusion", adapters=[path])
    batch = batch_of(3)
    torch.testing.assert_close(logits(fused, batch), logits(alone, batch), atol=1e-5, rtol=0)


def test_fusion_attention_formula():
    """out = y + Σ_n softmax_n((Q y)·(K a_n)) V a_n with a_n the serial / parallel adapter updates."""
    from peftlab.methods.adapter_fusion import FusedAdapters

    torch.manual_seed(0)
    d = 8
    base = torch.nn.Linear(d, d)
    serial = BottleneckAdapter(torch.nn.Identity(), d, 3, "relu", "serial")
    parallel = BottleneckAdapter(torch.nn.Identity(), d, 2, "tanh", "parallel", scaling=2.0)
    fused = FusedAdapters(base, [serial, parallel], d)
    perturb(fused, std=0.3)
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        y = base(x)
        a = torch.stack([serial.adapt(y), 2.0 * parallel.adapt(x)], dim=2)  # [B, T, 2, d]
        q = y @ fused.fusion_query.weight.T
        k = a @ fused.fusion_key.weight.T
        v = a @ fused.fusion_value.weight.T
        s = torch.softmax((q[:, :, None, :] * k).sum(-1), dim=-1)
        want = y + (s[..., None] * v).sum(2)
        torch.testing.assert_close(fused(x), want, atol=1e-6, rtol=1e-6)


def test_fusion_validates_the_adapter_dirs_up_front(tmp_path):
    good = saved_adapter(tmp_path, "good", bottleneck=4)
    lora = saved_adapter(tmp_path, "lora", method="lora", r=2)
    from peftlab.export.adapter import save_adapter

    other, _, cfg = with_method(small_model("llama", hidden=96, heads=4), "adapter", bottleneck=4)
    wide = str(save_adapter(other, cfg, tmp_path / "wide2"))
    ffn_only = saved_adapter(tmp_path, "ffn", bottleneck=4, sites=["ffn"])
    cases = [
        ([str(tmp_path / "missing")], "missing.* does not exist"),
        ([str(tmp_path)], "is not an adapter"),
        ([good, lora], "lora.* is a LORA adapter"),
        ([good, wide], "wide2 was trained for another base model.*hidden_size: adapter 96 vs model 64"),
        ([good, ffn_only], "ffn has sites=\\['ffn'\\] but .*good has"),
    ]
    for adapters, message in cases:
        with pytest.raises(ConfigError, match=message):
            with_method(small_model("llama"), "adapter_fusion", adapters=adapters)
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    for f in (tmp_path / "good").iterdir():
        (run_dir / "adapter" / f.name).write_bytes(f.read_bytes())
    with_method(small_model("llama"), "adapter_fusion", adapters=[str(run_dir), good])  # a run dir works too


# ---------------------------------------------------------------------------- LoRA-drop


def test_lora_drop_keeps_the_layers_the_importance_formula_picks():
    """After step W the kept layers are the fewest, most important first, whose share of
    g_l = Σ_modules Σ_tokens ||s B A x||² (on step W's batch, with the weights step W saw) reaches the
    threshold; the others share one pair per kind and the optimiser trains exactly the new set."""
    from conftest import train_config
    from peftlab.methods.lora_drop import HOLDER, SharedLoRALinear, choose
    from peftlab.methods.lowrank import LoRALinear
    from peftlab.train.step import start_training, train_step

    model, _, cfg = with_method(small_model("llama", **three_layers("llama")), "lora_drop", r=2, alpha=4,
                                warmup_steps=3, threshold=0.6)
    batch = batch_of(4)
    state = start_training(model, train_config(cfg, 1e-2), 6)
    model.train()
    for _ in range(2):
        train_step(state, [batch])
    snapshot = copy.deepcopy(model)
    inputs = {}
    for name, m in snapshot.named_modules():
        if isinstance(m, LoRALinear):
            m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
    with torch.no_grad():
        snapshot(**batch)
        g = {}
        for name, m in snapshot.named_modules():
            if isinstance(m, LoRALinear):
                out = m.scaling * inputs[name] @ m.lora_A.weight.T @ m.lora_B.weight.T
                layer = int(name.split(".layers.")[1].split(".")[0])
                g[layer] = g.get(layer, 0.0) + float(out.pow(2).sum())
    total = sum(g.values())
    shares = sorted(g, key=lambda i: -g[i])
    want, acc = [], 0.0
    for i in shares:
        want.append(i)
        acc += g[i] / total
        if acc >= 0.6:
            break
    train_step(state, [batch])  # step W = 3: measured and pruned
    assert cfg.keep_layers == sorted(want) == choose(g, 0.6)
    torch.testing.assert_close(torch.tensor(cfg.importance), torch.tensor([g[i] / total for i in sorted(g)]),
                               atol=1e-5, rtol=1e-4)
    shared = [m for m in model.modules() if isinstance(m, SharedLoRALinear)]
    assert len(shared) == 7 * (3 - len(want)) and len(getattr(model, HOLDER)) == 7
    trained = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad}
    train_step(state, [batch])  # and it keeps training


def test_lora_drop_refuses_to_resume_past_its_pruning_step_without_the_recorded_layers():
    """A checkpoint from before ``run_fields`` recorded the kept layers cannot rebuild the pruned form."""
    from peftlab.methods.lora_drop import on_step

    model, _, cfg = with_method(small_model("llama"), "lora_drop", r=2, warmup_steps=3)
    on_step(model, cfg, 2)  # before the pruning step: nothing to restore
    with pytest.raises(ConfigError, match="cannot resume from step 5.*peft.keep_layers"):
        on_step(model, cfg, 5)


# ---------------------------------------------------------------------------- in the loop: stages, resume, QLoRA


def test_adapter_fusion_two_stages_from_run_dirs_and_reload(tmp_path):
    """Stage one: two adapter runs; stage two: the fusion over their run dirs trains through the loop,
    and its saved adapter reloads into a fresh base with the trained model's logits."""
    from peftlab.configure import load_config
    from peftlab.export.adapter import load_adapter
    from peftlab.model.load import load_model
    from peftlab.train.loop import train
    from test_method_hooks_in_the_loop import run_overrides

    runs = []
    for i, bottleneck in enumerate((4, 6)):
        method = ["peft.method=adapter", f"peft.bottleneck={bottleneck}", "train.lr=1e-2", f"train.seed={i}"]
        runs.append(str(train(load_config(None, run_overrides(tmp_path, method, 2, f"task{i}"))).run_dir))
    cfg = load_config(None, run_overrides(tmp_path, ["peft.method=adapter_fusion", f"peft.adapters=[{runs[0]},{runs[1]}]",
                                                     "train.lr=1e-2"], 3, "fusion"))
    result = train(cfg)
    assert all(m["loss"] == m["loss"] for m in result.metrics)
    fresh, _ = load_model(cfg.model, seed=0, with_tokenizer=False)
    load_adapter(fresh, result.artifact)
    batch = batch_of(0, high=500)
    assert torch.equal(logits(fresh, batch), logits(result.model, batch))


def test_lora_drop_resume_is_exact_before_pruning(tmp_path):
    """Resumed before step W it measures step W itself; after W see tests/test_lora_drop_resume.py."""
    from peftlab.configure import load_config
    from peftlab.train.loop import train
    from test_method_hooks_in_the_loop import run_overrides

    method = ["peft.method=lora_drop", "peft.r=2", "peft.warmup_steps=3", "peft.threshold=0.5", "train.lr=1e-2"]
    straight = train(load_config(None, run_overrides(tmp_path, method, 5, "a")))
    train(load_config(None, run_overrides(tmp_path, [*method, "train.save_every=1"], 2, "b")))
    resumed = train(load_config(None, run_overrides(tmp_path, [*method, "train.save_every=1"], 5, "b")), resume=True)
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in straight.metrics]
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method,options", [
    ("unipelt", {"r": 2, "num_virtual_tokens": 2, "encoder_hidden_size": 8, "bottleneck": 4}),
    ("adapter", {"bottleneck": 4, "drop_layers": 1}),
    ("adapter_fusion", {"adapters": "TASKS"}),
])
def test_on_a_4bit_base_trains_and_round_trips(method, options, tmp_path):
    """QLoRA bases: the methods call the quantised layers, train, and reload bit-identically."""
    from conftest import train_steps
    from peftlab.export.adapter import load_adapter, save_adapter

    if options.get("adapters") == "TASKS":
        from test_contract import task_adapters

        options = {"adapters": task_adapters("llama")}
    model, m, cfg = with_method(_nf4(), method, **options)
    losses = train_steps(model, cfg, batch_of(0), steps=8, lr=3e-2)
    assert losses[-1] < losses[0]
    if m.finalize is not None:
        m.finalize(model, cfg)
    save_adapter(model, cfg, tmp_path / "a")
    fresh = _nf4()
    load_adapter(fresh, tmp_path / "a")
    batch = batch_of(1)
    assert torch.equal(logits(fresh, batch), logits(model, batch))


def _nf4():
    """The 1,024-vocabulary tiny Llama with NF4-quantised linear layers."""
    import dataclasses

    from conftest import SMALL_VOCAB, tiny_model_config
    from peftlab.model.load import load_model

    cfg = dataclasses.replace(tiny_model_config("llama", vocab=SMALL_VOCAB), quantize="nf4")
    return load_model(cfg, seed=0, with_tokenizer=False)[0]
