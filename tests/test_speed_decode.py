"""The lean greedy decoder emits Hugging Face ``generate``'s tokens, token for token: batch 1 and
left-padded batches, GQA, with LoRA adapters merged and unmerged; ``generate`` uses it only when
it is safe and falls back otherwise."""

from __future__ import annotations

import torch

from conftest import at_threads, randomize, tiny_model
from peftlab.eval import decode
from peftlab.methods import lora as lora_mod
from peftlab.methods.lora import LoRAConfig
from peftlab.methods.lowrank import lora_layers


def _prompts(b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = [9, 4, 7, 2, 9, 5][:b]
    width = max(lens)
    ids = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, width - n:] = torch.randint(3, 900, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def _hf(model, ids, mask, n, eos):
    model.config.use_cache = True
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=eos, temperature=None, top_p=None, top_k=None)


def test_lean_greedy_equals_hf_generate_batch1_and_padded_batch():
    model, _ = tiny_model("llama")
    assert decode.supports(model)
    for b in (1, 4):
        ids, mask = _prompts(b, seed=b)
        ref = _hf(model, ids, mask, 24, [10_000])  # an eos id that never comes: all 24 tokens compared
        got = decode.lean_greedy(model, ids, mask, 24, [10_000], 0)
        assert torch.equal(got, ref), (got, ref)


def test_lean_greedy_stops_and_pads_like_hf():
    model, _ = tiny_model("llama")
    ids, mask = _prompts(3, seed=5)
    free = decode.lean_greedy(model, ids, mask, 12, [10_000], 0)
    eos = int(free[0, ids.shape[1] + 3])  # row 0's 4th new token becomes "eos"
    ref = _hf(model, ids, mask, 12, [eos])
    got = decode.lean_greedy(model, ids, mask, 12, [eos], 0)
    assert torch.equal(got, ref)


def test_lean_greedy_with_lora_unmerged_and_merged_equals_hf():
    model, _ = tiny_model("llama")
    lora_mod.apply(model, LoRAConfig(r=4))
    randomize(model, std=0.3)
    model.eval()
    assert decode.supports(model)
    ids, mask = _prompts(2, seed=7)
    ref = _hf(model, ids, mask, 16, [10_000])
    assert torch.equal(decode.lean_greedy(model, ids, mask, 16, [10_000], 0), ref)
    for layer in lora_layers(model).values():
        layer.merge()  # the cached fused weights are rebuilt (the base weights changed)
    assert torch.equal(decode.lean_greedy(model, ids, mask, 16, [10_000], 0), ref)
    plain = tiny_model("llama")[0]
    assert not torch.equal(decode.lean_greedy(plain, ids, mask, 16, [10_000], 0), ref)  # the adapter matters


def test_supports_declines_other_architectures_and_wrappers():
    gpt2, _ = tiny_model("gpt2")
    assert not decode.supports(gpt2)
    model, _ = tiny_model("llama")
    model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert not decode.supports(model)
    for hooked in (lambda m: m, lambda m: m.model, lambda m: m.model.embed_tokens, lambda m: m.lm_head):
        model, _ = tiny_model("llama")
        hooked(model).register_forward_pre_hook(lambda *a: None)  # what the decoder would not run
        assert not decode.supports(model)


def test_mlp_biases_on_some_layers_decode_like_hf():
    """gate/up biases (Llama's mlp_bias, BitFit's added biases, on some layers only) enter the fused GEMM."""
    model, _ = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    for layer in model.model.layers[:1]:
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.self_attn.k_proj):
            lin.bias = torch.nn.Parameter(torch.randn(lin.out_features, generator=g) * 0.5)
    assert decode.supports(model)
    ids, mask = _prompts(3, seed=11)
    assert torch.equal(decode.lean_greedy(model, ids, mask, 12, [10_000], 0), _hf(model, ids, mask, 12, [10_000]))


def test_generate_uses_lean_path_and_matches_hf(monkeypatch):
    """peftlab.eval.generate.generate: same answers with the lean path on and forced off."""
    from peftlab.data.tokenize import Encoder
    from peftlab.eval import generate as gen

    model, tok = tiny_model("llama")
    enc = Encoder(tok, "chat", 128)
    prompts = ["Add 2 and 3.", "Name a colour.", "Hi"]
    calls = []
    real = decode.lean_greedy
    monkeypatch.setattr(decode, "lean_greedy", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = gen.generate(model, tok, enc, prompts, max_new_tokens=10, batch_size=2)
    assert calls, "the lean decoder was not used"
    monkeypatch.setattr(decode, "supports", lambda m: False)
    slow = gen.generate(model, tok, enc, prompts, max_new_tokens=10, batch_size=2)
    assert fast == slow


def test_cached_weights_follow_a_fused_adamw_step():
    """torch's fused AdamW updates parameters in place without bumping their version counter; the
    decoder's cache must still see the new weights (GRPO samples after every step)."""
    from conftest import with_method

    model, _ = tiny_model("llama")
    model, _, _ = with_method(model, "lora", r=4, targets="all-linear")
    ids, mask = torch.randint(5, 900, (2, 6), generator=torch.Generator().manual_seed(0)), torch.ones(2, 6)
    decode.lean_greedy(model, ids, mask, 4, [10_000], 0)  # caches the weights as they start (B = 0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.5, fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    versions = [p._version for p in params]
    opt.step()
    assert [p._version for p in params] == versions  # the trap: no version bump
    fresh = decode.LeanWeights(model)
    cached = decode.lean_weights(model)
    assert torch.equal(cached.layers[0][2], fresh.layers[0][2])  # the fused q|k|v weight with the new LoRA


def test_repeated_rows_share_one_prefill_and_still_equal_hf():
    """GRPO's groups (each prompt repeated, adjacent) prefill each prompt once: greedy output is
    still HF's, and sampled rows of one group differ from each other."""
    model, _ = tiny_model("llama")
    ids, mask = _prompts(2, seed=3)
    ids, mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    assert torch.equal(decode.lean_greedy(model, ids, mask, 12, [10_000], 0), _hf(model, ids, mask, 12, [10_000]))
    sampled = decode.lean_decode(model, ids, mask, 12, [10_000], 0, temperature=1.0,
                                 generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled[0], sampled[1]) and torch.equal(sampled[:, :ids.shape[1]], ids)


def test_split_gemv_equals_f_linear_bit_for_bit(monkeypatch):
    """decode.linear cuts a one-row fp32 product into one block of rows per thread (a bmm) and must
    give F.linear's exact bits: the decoder's shapes (SmolLM2, Qwen2-0.5B; a head-like 8192 rows), with and without bias;
    shapes it cannot cut evenly, several rows, and non-fp32 inputs take F.linear itself."""
    from peftlab.model.decode import linear

    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(a[1].shape) or real_bmm(*a))
    g = torch.Generator().manual_seed(0)
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536), (8192, 576), (1152, 896), (896, 4864), (97, 64)]
    for threads in (2, 3, 4):
        with at_threads(threads):
            for out_f, in_f in shapes:
                w, b = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g)
                for x in (torch.randn(1, in_f, generator=g), torch.randn(1, 1, in_f, generator=g)):
                    for bias in (None, b):
                        calls.clear()
                        got = linear(x, w, bias)
                        assert got.shape == (*x.shape[:-1], out_f)
                        assert torch.equal(got, torch.nn.functional.linear(x, w, bias)), (threads, out_f, in_f)
                        assert len(calls) == (out_f % threads == 0), (threads, out_f, calls)
    with at_threads(2):
        w = torch.randn(64, 32, generator=g)
        for x in (torch.randn(3, 32, generator=g), torch.randn(1, 32, generator=g).bfloat16()):
            calls.clear()
            assert torch.equal(linear(x, w.to(x.dtype)), torch.nn.functional.linear(x, w.to(x.dtype)))
            assert not calls  # several rows / half precision: F.linear itself


def test_lean_greedy_at_two_threads_takes_the_split_products_and_equals_hf(monkeypatch):
    model, _ = tiny_model("llama")
    lora_mod.apply(model, LoRAConfig(r=4))
    randomize(model, std=0.3)
    model.eval()
    ids, mask = _prompts(1, seed=11)
    with at_threads(2):
        ref = _hf(model, ids, mask, 16, [10_000])
        calls = []
        real_bmm = torch.bmm
        monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or real_bmm(*a))
        got = decode.lean_greedy(model, ids, mask, 16, [10_000], 0)
    assert calls, "batch-1 decoding at 2 threads should run its products through the split GEMV"
    assert torch.equal(got, ref)


def test_split_products_of_several_rows_take_bmm_up_to_max_rows(monkeypatch):
    """Prompt lookup's verify forwards (2-16 rows) split too: F.linear's values, rows in order, within
    fp32 rounding (a small GEMM per block may round differently from one over the whole); more rows than max_rows, or max_rows 1 (plain decoding), take F.linear."""
    from peftlab.model.decode import linear

    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(960, 576, generator=g), torch.randn(960, generator=g)
    with at_threads(2):
        for rows in (2, 5, 11, 16):
            x = torch.randn(1, rows, 576, generator=g)
            got = linear(x, w, b, max_rows=16)
            torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4)  # outputs ~ 24
        calls = []
        real_bmm = torch.bmm
        monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or real_bmm(*a))
        linear(torch.randn(17, 576, generator=g), w, b, max_rows=16)
        linear(torch.randn(3, 576, generator=g), w, b)
        assert not calls
        linear(torch.randn(3, 576, generator=g), w, b, max_rows=16)
        assert calls
