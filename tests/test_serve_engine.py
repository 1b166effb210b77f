"""Continuous batching: every request's tokens equal the same request run alone (HF generate on a
model with just that adapter), while requests join and leave a mixed-adapter batch."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import tokenizer_for
from peftlab.errors import ConfigError
from peftlab.export.adapter import load_adapter
from peftlab.serve.engine import Engine, EngineBusy, SamplingParams, Sequence
from peftlab.serve.multi_lora import MultiLoRAModel
from peftlab.serve.store import AdapterStore, UnknownAdapter
from shipkit import load_base, make_adapter, save_tiny_base

PROMPTS = [  # (prompt, adapter, max_tokens)
    ("Hello there, how are", "a", 12),
    ("One", None, 9),
    ("The list of things I would like to buy at the store today is long:", "b", 14),
    ("What is two plus two", "c", 5),
    ("Tell me a story about a fox", "a", 10),
    ("Why", "b", 11),
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp("eng-" + arch)
    base = save_tiny_base(arch, root / "base")
    adapters = root / "adapters"
    targets = {"a": "all-linear", "b": ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"],
               "c": ["down_proj"] if arch == "llama" else ["c_fc"]}
    for i, (name, t) in enumerate(targets.items()):
        make_adapter(base, adapters / name, r=2 + 2 * i, targets=t, seed=30 + i)
    tok = tokenizer_for(arch)
    refs = {}
    for prompt, adapter, n in PROMPTS:
        model, _ = load_base(base)
        if adapter:
            load_adapter(model, adapters / adapter)
        ids = tok(prompt, add_special_tokens=False).input_ids
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        refs[prompt] = out[0, len(ids):].tolist()
    return base, adapters, tok, refs


def _engine(base, adapters, tok, max_batch=3, max_loaded=8, **kw):
    model, _ = load_base(base)
    mm = MultiLoRAModel(model)
    store = AdapterStore(mm, adapters, max_loaded=max_loaded)
    return Engine(mm, tok, store=store, max_batch=max_batch, **kw), store


def _seq(tok, prompt, adapter, n, **kw):
    return Sequence(tok(prompt, add_special_tokens=False).input_ids, adapter, SamplingParams(max_tokens=n, **kw))


def test_continuous_batching_equals_single_runs(setup):
    base, adapters, tok, refs = setup
    engine, store = _engine(base, adapters, tok, max_batch=3)
    events: dict[int, list] = {}
    seqs = []
    for prompt, adapter, n in PROMPTS[:3]:
        s = _seq(tok, prompt, adapter, n)
        s.on_event = lambda seq, kind, data: events.setdefault(seq.id, []).append((kind, data))
        seqs.append(engine.submit(s))
    for _ in range(3):  # a few steps, then more requests arrive while the first ones run
        engine.step()
    for prompt, adapter, n in PROMPTS[3:]:
        seqs.append(engine.submit(_seq(tok, prompt, adapter, n)))
    while not all(s.done for s in seqs):
        assert engine.step()
    assert engine.stats["max_rows"] == 3 and engine.stats["prefills"] >= 3
    for s, (prompt, adapter, _n) in zip(seqs, PROMPTS):
        assert s.generated == refs[prompt], (prompt, adapter)
        assert s.finish_reason == ("stop" if refs[prompt][-1] == tok.eos_token_id else "length")
    # streamed pieces add up to the final text, which is the decoded tokens
    first = seqs[0]
    texts = [d for k, d in events[first.id] if k == "text"]
    assert "".join(texts) == first.text == tok.decode(first.generated, skip_special_tokens=True)
    assert events[first.id][-1] == ("done", first.finish_reason)
    assert not engine.running and engine.cache is None
    assert store.resident() and all(not h for h in store._holders.values())


@pytest.mark.parametrize("setup", ["llama"], indirect=True)
def test_new_version_of_an_adapter_is_swapped_in_place(setup, tmp_path):
    """Saving a new version into a resident adapter's directory hot-swaps it at the next request: a
    sequence already running finishes on the old version, the next waits and then runs on the new one
    (tokens equal each version run alone); nothing is reloaded but the adapter's own factors."""
    import shutil

    base, adapters, tok, refs = setup
    root = tmp_path / "adapters"
    shutil.copytree(adapters, root)
    engine, store = _engine(base, root, tok, max_batch=3)
    prompt, _, n = PROMPTS[0]
    first = engine.submit(_seq(tok, prompt, "a", n))
    engine.step()  # "a" (version 1) resident and held by a running sequence
    base_tensors = {k: v.data_ptr() for k, v in engine.mm.model.named_parameters()}
    make_adapter(base, root / "a", r=3, targets=["q_proj", "o_proj"], seed=77)  # version 2, saved atomically
    second = engine.submit(_seq(tok, prompt, "a", n))
    engine.step()
    assert second in engine.waiting and store.swaps == 0  # waits for the version-1 sequence
    while not (first.done and second.done):
        engine.step()
    assert first.generated == refs[prompt] and store.swaps == 1 and store.loads == 1
    model, _ = load_base(base)
    load_adapter(model, root / "a")
    ids = tok(prompt, add_special_tokens=False).input_ids
    want = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    assert second.generated == want != refs[prompt]
    assert {k: v.data_ptr() for k, v in engine.mm.model.named_parameters()} == base_tensors
    shutil.rmtree(root / "a")  # gone from disk (or mid-rename): the resident version serves on
    third = engine.submit(_seq(tok, prompt, "a", n))
    while not third.done:
        engine.step()
    assert third.generated == want and third.error is None and store.swaps == 1


@pytest.mark.parametrize("setup", ["llama"], indirect=True)  # the mechanics; both archs above
def test_lru_cache_waits_for_busy_adapters_and_stays_correct(setup):
    base, adapters, tok, refs = setup
    engine, store = _engine(base, adapters, tok, max_batch=3, max_loaded=2)
    seqs = [engine.submit(_seq(tok, p, a, n)) for p, a, n in PROMPTS]
    while not all(s.done for s in seqs):
        engine.step()
        assert len(store.resident()) <= 2
    for s, (prompt, _, _) in zip(seqs, PROMPTS):
        assert s.generated == refs[prompt]
    assert store.evictions >= 1 and store.loads >= 3


def test_evicted_adapters_come_back_from_host_memory_unless_their_files_changed(setup):
    """S-LoRA's two tiers: one resident slot, every adapter read from disk once; answers stay right."""
    base, adapters, tok, refs = setup
    engine, store = _engine(base, adapters, tok, max_batch=1, max_loaded=1)
    named = [(p, a, n) for p, a, n in PROMPTS if a]
    for _ in range(2):  # twice round: the second pass loads every adapter again, from host memory
        for prompt, adapter, n in named:
            assert engine.generate([_seq(tok, prompt, adapter, n)])[0].generated == refs[prompt]
    distinct = len({a for _, a, _ in named})
    assert store.loads == 2 * len(named) and store.disk_reads == distinct and store.evictions >= 2 * len(named) - 1
    # without a host tier every load reads the files again
    engine, store = _engine(base, adapters, tok, max_batch=1, max_loaded=1)
    store.host_max = 0
    for prompt, adapter, n in named:
        engine.generate([_seq(tok, prompt, adapter, n)])
    assert store.disk_reads == store.loads == len(named)


@pytest.mark.parametrize("setup", ["llama"], indirect=True)  # the mechanics; both archs above
def test_stop_strings_cancel_limits_and_seeds(setup):
    base, adapters, tok, refs = setup
    engine, _ = _engine(base, adapters, tok, max_batch=2, max_queue=3)
    prompt, adapter, n = PROMPTS[2]
    full = tok.decode(refs[prompt], skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    pieces = []
    s = _seq(tok, prompt, adapter, n, stop=(stop,))
    s.on_event = lambda seq, kind, data: pieces.append(data) if kind == "text" else None
    other = _seq(tok, *PROMPTS[0])
    engine.generate([s, other])
    assert s.finish_reason == "stop" and s.text == full[: full.find(stop)]
    assert "".join(pieces) == s.text and not any(stop in p for p in pieces)
    assert other.generated == refs[PROMPTS[0][0]]
    # cancel one row mid-flight: it stops, the other keeps going and stays exact
    a, b = _seq(tok, *PROMPTS[4]), _seq(tok, *PROMPTS[5])
    engine.submit(a), engine.submit(b)
    engine.step()
    a.cancel()
    while not b.done:
        engine.step()
    assert a.finish_reason == "cancelled" and b.generated == refs[PROMPTS[5][0]]
    # a bounded queue and a bounded context
    for _ in range(3):
        engine.submit(_seq(tok, "hi", None, 2))
    with pytest.raises(EngineBusy, match="busy"):
        engine.submit(_seq(tok, "hi", None, 2))
    with pytest.raises(ConfigError, match="context limit"):
        engine.submit(_seq(tok, "word " * 300, None, 2))
    while engine.step():
        pass
    # sampling: the same seed gives the same tokens, another seed others, each the draws of the rule
    runs = [engine.generate([_seq(tok, "Once upon", "a", 8, temperature=1.0, top_p=0.9, seed=seed)])[0].generated
            for seed in (1, 1, 2)]
    assert runs[0] == runs[1] and len(runs[0]) >= 1
    assert runs[2] != runs[0]
    ids = tok("Once upon", add_special_tokens=False).input_ids
    for seed, run in ((1, runs[0]), (2, runs[2])):
        assert run == _sample_alone(base, adapters / "a", ids, 8, tok.eos_token_id, seed, 1.0, 0.9), seed


@torch.no_grad()
def _sample_alone(base, adapter_dir, ids, n, eos, seed, temperature, top_p) -> list[int]:
    """The sampling rule by hand on a model with just that adapter (a full forward per token, no
    cache): softmax(logits / T), keep the smallest set of top tokens whose mass reaches top_p, one
    draw per token from torch.Generator().manual_seed(seed)."""
    model, _ = load_base(base)
    load_adapter(model, adapter_dir)
    generator = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < n:
        probs = torch.softmax(model(input_ids=torch.tensor([ids + out])).logits[0, -1].float() / temperature, -1)
        sorted_p, order = probs.sort(descending=True)
        sorted_p = sorted_p * (sorted_p.cumsum(-1) - sorted_p < top_p)
        out.append(int(torch.multinomial(torch.zeros_like(probs).scatter(0, order, sorted_p), 1, generator=generator)))
        if out[-1] == eos:
            break
    return out


@pytest.mark.parametrize("setup", ["llama"], indirect=True)  # the mechanics; both archs above
def test_damaged_adapter_fails_only_its_request(setup, tmp_path):
    base, adapters, tok, refs = setup
    import shutil

    root = tmp_path / "adapters"
    shutil.copytree(adapters / "a", root / "a")
    shutil.copytree(adapters / "a", root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    model, _ = load_base(base)
    mm = MultiLoRAModel(model)
    engine = Engine(mm, tok, store=AdapterStore(mm, root), max_batch=2)
    bad, good = _seq(tok, "hi", "broken", 3), _seq(tok, *PROMPTS[0])
    engine.generate([bad, good])
    assert bad.finish_reason == "error" and "cannot be read as safetensors" in bad.error
    assert good.generated == refs[PROMPTS[0][0]]
    # an interrupted answer can be aborted wherever it is
    s = engine.submit(_seq(tok, *PROMPTS[1]))
    engine.step()
    engine.abort(s)
    assert s.finish_reason == "cancelled" and not engine.running and engine.cache is None
    assert engine.store._holders.get("a") == 0


@pytest.mark.parametrize("setup", ["llama"], indirect=True)  # the mechanics; both archs above
def test_adapter_names_cannot_escape(setup, tmp_path):
    base, adapters, tok, _ = setup
    outside = tmp_path / "outside"
    make_adapter(base, outside, r=2, targets="all-linear")
    link = adapters / "sneaky"
    if not link.exists():
        os.symlink(outside, link)
    _, store = _engine(base, adapters, tok)
    for name in ("../outside", "a/../b", "/etc", "..", "a/", "sneaky", "nope", "", "a\x00"):
        with pytest.raises(UnknownAdapter):
            store.resolve(name)
    assert store.names() == ["a", "b", "c"]
    assert store.resolve("a") == (adapters / "a").resolve()


def test_references_are_not_trivial(setup):
    _, _, tok, refs = setup
    lengths = [len(refs[p]) for p, _, _ in PROMPTS]
    assert sum(lengths) >= 40, lengths
    assert len({tuple(refs[p]) for p, _, _ in PROMPTS}) == len(PROMPTS)


def _oracle(truths: dict[tuple, list[int]], wrong_every: int):
    """A ``draft`` for the engine that proposes the true greedy continuation of whichever prompt the
    text starts with (``truths``: prompt ids -> prompt + answer ids), every ``wrong_every``-th
    position corrupted: drafts are accepted whole or in part on cue, and always made."""
    def draft(seq, k, max_ngram=2):
        text = seq.tolist()
        truth = next(t for p, t in truths.items() if text[:len(p)] == list(p))
        assert text == truth[:len(text)], "the engine emitted a token that is not the greedy one"
        out = torch.tensor(truth[len(text):len(text) + k], dtype=torch.long)
        if wrong_every:
            pos = torch.arange(len(text), len(text) + len(out))
            out[pos % wrong_every == 0] += 1
        return out
    return draft


def test_lookup_for_a_lone_greedy_row_gives_the_same_tokens(setup, monkeypatch):
    """--lookup on a lone greedy row: the tokens are still each request's greedy tokens alone (HF
    generate), with drafts from the text itself (the tiny models repeat themselves: some accepted,
    some rejected) and with drafts that are the true continuation but wrong every 3rd token (most
    forwards accept part of a draft, so the cache is cut back past the rejected ones)."""
    from peftlab.model import lookup

    base, adapters, tok, refs = setup
    engine, _ = _engine(base, adapters, tok, max_batch=1, lookup=4)
    seqs = engine.generate([_seq(tok, p, a, n) for p, a, n in PROMPTS])
    assert [s.generated for s in seqs] == [refs[p] for p, _, _ in PROMPTS]
    stats = engine.stats
    assert 0 < stats["lookup_accepted"] < stats["lookup_drafted"], stats
    truths = {}
    for p, _, _ in PROMPTS:
        ids = tok(p, add_special_tokens=False).input_ids
        truths[tuple(ids)] = ids + refs[p]
    monkeypatch.setattr(lookup, "draft", _oracle(truths, 3))
    engine, _ = _engine(base, adapters, tok, max_batch=1, lookup=4)
    seqs = engine.generate([_seq(tok, p, a, n) for p, a, n in PROMPTS])
    assert [s.generated for s in seqs] == [refs[p] for p, _, _ in PROMPTS]
    stats = engine.stats
    assert 0 < stats["lookup_accepted"] < stats["lookup_drafted"], stats
    assert stats["steps"] < stats["tokens"] - len(PROMPTS)  # without lookup: a step per token after the first


@pytest.mark.parametrize("setup", ["llama"], indirect=True)  # the mechanics; both archs above
def test_lookup_applies_only_to_a_lone_greedy_row_and_ends_inside_a_run(setup, monkeypatch):
    """Rows decoded together, and sampling rows, decode one token a step as without lookup (the same
    tokens, seeded samples included); an eos, a stop string or max_tokens inside an accepted run ends
    the row there, exactly as without lookup; drafts never run past max_tokens."""
    from peftlab.model import lookup

    base, adapters, tok, refs = setup
    truths = {}
    for p, _, _ in PROMPTS:
        ids = tok(p, add_special_tokens=False).input_ids
        truths[tuple(ids)] = ids + refs[p]
    oracle = _oracle(truths, 0)  # every draft right: runs of 4 accepted tokens
    asked = []
    monkeypatch.setattr(lookup, "draft", lambda seq, k, n=2: asked.append(k) or oracle(seq, k, n))

    def both(make, **kw):
        """The sequences ``make()`` gives, run on an engine without lookup and on one with it."""
        plain, _ = _engine(base, adapters, tok, **kw)
        fast, _ = _engine(base, adapters, tok, lookup=4, **kw)
        return plain.generate(make()), fast.generate(make()), fast

    # two greedy rows and a sampling one share steps; lookup only once a greedy row is left alone
    def mixed():
        return [_seq(tok, *PROMPTS[0]), _seq(tok, "Once upon", "a", 8, temperature=1.0, top_p=0.9, seed=3),
                _seq(tok, *PROMPTS[2])]
    plain, fast, engine = both(mixed, max_batch=3)
    assert [s.generated for s in fast] == [s.generated for s in plain]
    assert fast[0].generated == refs[PROMPTS[0][0]] and fast[2].generated == refs[PROMPTS[2][0]]
    assert engine.stats["max_rows"] == 3 and engine.stats["lookup_forwards"] > 0
    # inside an accepted run (the first decode step accepts tokens 2-5): an eos (the id of the 5th
    # answer token), a stop string (from the text of tokens 3-5), max_tokens
    prompt, adapter, n = max(PROMPTS, key=lambda p: len(set(refs[p[0]][:5])))  # the tiny models repeat a lot
    answer = refs[prompt]
    assert answer[4] not in answer[:4], answer
    full = tok.decode(answer, skip_special_tokens=True)
    head, run = tok.decode(answer[:2], skip_special_tokens=True), tok.decode(answer[:5], skip_special_tokens=True)
    stop = next(run[i:i + 2] for i in range(len(head), len(run) - 1) if full.find(run[i:i + 2]) >= len(head))
    for kw, make, reason in (({"eos_ids": {answer[4]}}, lambda: [_seq(tok, prompt, adapter, n)], "stop"),
                             ({}, lambda: [_seq(tok, prompt, adapter, n, stop=(stop,))], "stop"),
                             ({}, lambda: [_seq(tok, prompt, adapter, 7)], "length")):
        asked.clear()
        (p,), (f,), engine = both(make, max_batch=1, **kw)
        assert (f.generated, f.text, f.finish_reason) == (p.generated, p.text, p.finish_reason)
        assert p.finish_reason == reason and len(p.generated) < len(answer)
        assert engine.stats["lookup_accepted"] > 0 and engine.stats["tokens"] == len(p.generated)
    # max_tokens 7: the prefill's token, a draft of 4 accepted with the model's 6th, then no room to draft
    assert f.generated == answer[:7] and asked == [4, 0]
