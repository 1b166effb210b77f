"""Prompt-lookup speculative decoding (model/lookup.py) emits plain greedy decoding's tokens: equal to
the lean decoder and to HF ``generate``, whether drafts are accepted whole, in part (the cache
rolled back past the rejected ones) or not at all; it stops at an eos inside an accepted draft and
at max_new_tokens inside a draft; adapters live or merged. The draft rule is HF's."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize, tiny_model
from peftlab.eval import decode
from peftlab.methods import lora as lora_mod
from peftlab.methods.lora import LoRAConfig
from peftlab.methods.lowrank import lora_layers
from peftlab.model import lookup

NEVER = [10_000]  # an eos id the tiny model does not emit: every requested token is compared


def _hf(model, ids, n, eos):
    model.config.use_cache = True
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=eos, temperature=None, top_p=None, top_k=None)


def _prompt(seed: int, repeat: bool) -> torch.Tensor:
    """[1, T]: random ids, or a phrase said twice and begun a third time (its n-grams recur)."""
    g = torch.Generator().manual_seed(seed)
    if not repeat:
        return torch.randint(3, 900, (1, 11), generator=g)
    phrase = torch.randint(3, 900, (5,), generator=g)
    return torch.cat([phrase, phrase, phrase[:2]])[None]


def _oracle(ref: torch.Tensor, wrong_every: int):
    """A ``draft`` that proposes the true greedy continuation ``ref`` [1, T + n] with every
    ``wrong_every``-th position corrupted (0: never), so acceptance is whole, partial or nil on cue."""
    truth = ref[0]

    def draft(seq, k, max_ngram=2):
        out = truth[len(seq):len(seq) + k].clone()
        pos = torch.arange(len(seq), len(seq) + len(out))
        if wrong_every:
            out[pos % wrong_every == 0] += 1
        return out
    return draft


def test_draft_follows_hf_prompt_lookup_rule():
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        seq = torch.randint(0, 4, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g)  # small alphabet
        k, n = 1 + trial % 6, 1 + trial % 3
        hf = PromptLookupCandidateGenerator(num_output_tokens=k, max_matching_ngram_size=n, max_length=1000)
        cand, _ = hf.get_candidates(seq[None])
        assert torch.equal(lookup.draft(seq, k, n), cand[0, len(seq):]), (seq, k, n)


@pytest.mark.parametrize("repeat", [False, True])
def test_lookup_equals_lean_greedy_and_hf_generate(repeat):
    model, _ = tiny_model("llama")
    ids = _prompt(1, repeat)
    ref = _hf(model, ids, 24, NEVER)
    assert torch.equal(decode.lean_greedy(model, ids, torch.ones_like(ids), 24, NEVER, 0), ref)
    for k in (1, 3, 10):
        stats = {}
        got = lookup.lookup_greedy(model, ids, torch.ones_like(ids), 24, NEVER, lookup=k, stats=stats)
        assert torch.equal(got, ref), (k, got, ref)
        assert stats["new"] == 24 and stats["forwards"] <= 24


@pytest.mark.parametrize("wrong_every", [0, 3, 1])
def test_accepted_partial_and_rejected_drafts_keep_greedy_tokens(monkeypatch, wrong_every):
    """0: every draft accepted (many tokens per forward); 3: a rejection inside most drafts, so the
    cache is rolled back and the next forward overwrites the rejected positions; 1: all rejected."""
    model, _ = tiny_model("llama")
    ids = _prompt(2, False)
    ref = _hf(model, ids, 20, NEVER)
    monkeypatch.setattr(lookup, "draft", _oracle(ref, wrong_every))
    stats = {}
    got = lookup.lookup_greedy(model, ids, torch.ones_like(ids), 20, NEVER, lookup=4, stats=stats)
    assert torch.equal(got, ref)
    assert stats["drafted"] > 0
    if wrong_every == 0:
        assert stats["accepted"] == stats["drafted"] and stats["forwards"] < 20 / 4 + 2
    elif wrong_every == 1:
        assert stats["accepted"] == 0 and stats["forwards"] == 20
    else:
        assert 0 < stats["accepted"] < stats["drafted"]


@pytest.mark.parametrize("max_new", [0, 1, 2, 7, 9])
def test_max_new_tokens_inside_a_draft(monkeypatch, max_new):
    model, _ = tiny_model("llama")
    ids = _prompt(3, True)
    full = _hf(model, ids, 12, NEVER)
    monkeypatch.setattr(lookup, "draft", _oracle(full, 0))
    got = lookup.lookup_greedy(model, ids, torch.ones_like(ids), max_new, NEVER, lookup=5)
    assert torch.equal(got, full[:, :ids.shape[1] + max_new])


def test_stops_at_eos_inside_an_accepted_draft(monkeypatch):
    model, _ = tiny_model("llama")
    ids = _prompt(4, False)
    free = _hf(model, ids, 16, NEVER)
    t = ids.shape[1]
    eos = int(free[0, t + 4])  # the 5th new token is "eos": it arrives in the middle of a drafted run
    assert eos not in free[0, t:t + 4].tolist()
    monkeypatch.setattr(lookup, "draft", _oracle(free, 0))  # drafts run past the eos
    stats = {}
    got = lookup.lookup_greedy(model, ids, torch.ones_like(ids), 16, [eos], lookup=8, stats=stats)
    assert torch.equal(got, _hf(model, ids, 16, [eos]))
    assert got.shape[1] == t + 5 and stats["forwards"] == 2  # prefill, then one forward accepting through the eos


def test_lookup_with_lora_unmerged_and_merged(monkeypatch):
    model, _ = tiny_model("llama")
    lora_mod.apply(model, LoRAConfig(r=4))
    randomize(model, std=0.3)
    model.eval()
    ids = _prompt(5, True)
    ref = _hf(model, ids, 16, NEVER)
    assert torch.equal(lookup.lookup_greedy(model, ids, torch.ones_like(ids), 16, NEVER, lookup=4), ref)
    monkeypatch.setattr(lookup, "draft", _oracle(ref, 3))
    assert torch.equal(lookup.lookup_greedy(model, ids, torch.ones_like(ids), 16, NEVER, lookup=4), ref)
    for layer in lora_layers(model).values():
        layer.merge()
    assert torch.equal(lookup.lookup_greedy(model, ids, torch.ones_like(ids), 16, NEVER, lookup=4), ref)
    plain = tiny_model("llama")[0]
    assert not torch.equal(decode.lean_greedy(plain, ids, torch.ones_like(ids), 16, NEVER, 0), ref)


def test_left_padding_is_dropped_and_batches_are_refused():
    model, _ = tiny_model("llama")
    ids = _prompt(6, True)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    got = lookup.lookup_greedy(model, padded, mask, 10, NEVER, lookup=3)
    assert torch.equal(got[:, 3:], _hf(model, ids, 10, NEVER)) and torch.equal(got[:, :3], padded[:, :3])
    with pytest.raises(ValueError, match="one prompt at a time"):
        lookup.lookup_greedy(model, ids.repeat(2, 1), torch.ones(2, ids.shape[1]), 4, NEVER)


def test_generate_with_lookup_gives_the_same_answers():
    from peftlab.data.tokenize import Encoder
    from peftlab.errors import ConfigError
    from peftlab.eval import generate as gen

    model, tok = tiny_model("llama")
    enc = Encoder(tok, "chat", 128)
    prompts = ["Repeat: one two three, one two three.", "Hi"]
    plain = gen.generate(model, tok, enc, prompts, max_new_tokens=10, batch_size=2)
    assert gen.generate(model, tok, enc, prompts, max_new_tokens=10, lookup=4) == plain
    with pytest.raises(ConfigError, match="greedy only"):
        gen.generate(model, tok, enc, prompts, max_new_tokens=4, temperature=0.7, lookup=4)


def test_every_lookup_setting_is_checked_by_one_rule_naming_the_flag():
    from peftlab.errors import ConfigError
    from peftlab.model.lookup import check_setting

    check_setting(0, 0.9)  # off: any temperature
    check_setting(4)
    with pytest.raises(ConfigError, match=r"^--lookup is the number of tokens drafted per forward .* got -1$"):
        check_setting(-1, flag="--lookup")
    with pytest.raises(ConfigError, match=r"\(eval.lookup 3\) is greedy only; got eval.temperature 0.5\. "
                                          r"Set eval.temperature to 0 or eval.lookup to 0"):
        check_setting(3, 0.5, "eval.lookup", "eval.temperature")
