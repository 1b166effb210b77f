"""Packing: best-fit-decreasing equals a brute-force reference; packed loss equals unpacked
loss for every attention implementation on both tiny architectures (4-D mask and varlen
paths); position ids alone leak (so the equality test can fail); loss weights, length
grouping and pre-training blocks follow their formulas."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model, tokenizer_for
from peftlab.data.collate import collate
from peftlab.data.formats import Conversation
from peftlab.data.packing import (
    best_fit_decreasing,
    chunk_blocks,
    grouped_batches,
    pack_examples,
    padding_waste,
)
from peftlab.data.sampler import EpochSampler
from peftlab.data.tokenize import IGNORE, Encoder
from peftlab.train.loss import backbone_hidden, causal_lm_loss, count_input_tokens, count_label_tokens


def reference_bfd(lengths, capacity):
    """Textbook best-fit-decreasing, O(n^2): the open row with the least room that fits (ties:
    the row that came to that room last)."""
    rows, room, stamp = [], [], []
    for t, i in enumerate(sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda r: (room[r], -stamp[r]))
            rows[best].append(i)
            room[best] -= lengths[i]
            stamp[best] = t
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
            stamp.append(t)
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_matches_reference(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(400)]
    rows = best_fit_decreasing(lengths, 512)
    assert sorted(i for r in rows for i in r) == list(range(400))
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows)
    ref = reference_bfd(lengths, 512)
    assert rows == ref


def conversations(n=7, seed=0):
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud green quiet orange window".split()
    out = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 12)))},
                      {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 15)))}]
        out.append(Conversation(turns, f"conv {i}"))
    return out


def mean_loss(model, batches, varlen=None):
    total, n = 0.0, 0
    for b in batches:
        if varlen is None:
            s, k = causal_lm_loss(model, b)
        else:
            hidden = backbone_hidden(model, b, varlen=varlen)
            targets = b["labels"][:, 1:]
            keep = targets != IGNORE
            logits = model.get_output_embeddings()(hidden[:, :-1][keep])
            s, k = F.cross_entropy(logits.float(), targets[keep], reduction="sum"), int(keep.sum())
        total += float(s)
        n += k
    return total / n, n


def packed_and_plain(arch, template="chatml", train_on_prompt=False):
    tok = tokenizer_for(arch)
    enc = Encoder(tok, template, max_length=200, train_on_prompt=train_on_prompt)
    examples = [enc.encode(c) for c in conversations()]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    plain = [collate([e], pad) for e in examples]
    rows = pack_examples(examples, 256)
    assert len(rows) < len(examples) and sum(len(r.seq_lens) for r in rows) == len(examples)
    packed = collate(rows, pad)
    return plain, packed, examples


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_unpacked(arch, attn):
    model, _ = tiny_model(arch, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    # train_on_prompt: every token is a label, so a leak into any sequence start would show
    plain, packed, examples = packed_and_plain(arch, train_on_prompt=True)
    with torch.no_grad():
        ref, n_ref = mean_loss(model, plain)
        got, n = mean_loss(model, [packed])  # 4-D block-diagonal mask
        var, n_var = mean_loss(model, [packed], varlen=True)  # flattened, position ids only
    assert n == n_ref == n_var == count_label_tokens(packed["labels"])
    assert abs(got - ref) < 1e-5 and abs(var - ref) < 1e-5
    assert count_input_tokens(packed) == sum(len(e) for e in examples)


def test_position_ids_alone_leak(arch):
    """The naive packed batch (a 2-D mask of ones + restarting position ids) lets sequences see
    each other: the loss moves by far more than the tolerance the equality test uses."""
    model, _ = tiny_model(arch, attn_implementation="sdpa")
    plain, packed, _ = packed_and_plain(arch)
    leaky = dict(packed, attention_mask=torch.ones_like(packed["input_ids"]))
    with torch.no_grad():
        ref, _ = mean_loss(model, plain)
        got, _ = mean_loss(model, [leaky])
    assert abs(got - ref) > 1e-2


def test_collate_packed_layout():
    tok = tokenizer_for("llama")
    enc = Encoder(tok, "chatml", train_on_prompt=True)
    a, b = (enc.encode(c) for c in conversations(2))
    (row,) = pack_examples([a, b], len(a) + len(b) + 3)
    batch = collate([row], 0)
    la, lb = row.seq_lens
    assert batch["position_ids"][0].tolist() == list(range(la)) + list(range(lb))
    mask = batch["attention_mask"][0, 0] == 0
    assert mask[la + 2, la] and not mask[la + 2, la - 1] and not mask[la, la + 1]  # own sequence, causal
    assert batch["labels"][0, la] == IGNORE  # a sequence's first token is nobody's target


def test_loss_weights_scale_token_losses():
    model, tok = tiny_model("llama")
    msgs = [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three four", "weight": 0.25},
            {"role": "user", "content": "five"}, {"role": "assistant", "content": "six seven"}]
    ex = Encoder(tok, "chatml").encode(Conversation(msgs, "w"))
    batch = collate([ex], tok.pad_token_id)
    with torch.no_grad():
        got, n = causal_lm_loss(model, batch)
        logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
        per_token = F.cross_entropy(logits, batch["input_ids"][0, 1:], reduction="none")
        labels = torch.tensor(ex.labels[1:])
        w = torch.tensor(ex.weights[1:])
        ref = (per_token * w)[labels != IGNORE].sum()
    assert n == int((labels != IGNORE).sum()) and abs(float(got) - float(ref)) < 1e-4


def test_pretrain_blocks_formula():
    docs = [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 10, 0], [11, 0]]
    blocks = list(chunk_blocks(iter(docs), 4))
    stream = [t for d in docs for t in d]
    assert [b.input_ids for b in blocks] == [stream[i:i + 4] for i in range(0, len(stream) - 3, 4)]
    assert all(b.labels == b.input_ids for b in blocks)


def test_length_grouped_sampler_resumes_and_cuts_padding():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(1000)]
    s = EpochSampler(lambda e: grouped_batches(lengths, 8, 1, e))
    seen = [s.next() for _ in range(60)]
    state = s.state_dict()
    after = [s.next() for _ in range(80)]  # crosses into epoch 1
    t = EpochSampler(lambda e: grouped_batches(lengths, 8, 1, e))
    t.load_state_dict(state)
    assert [t.next() for _ in range(80)] == after
    epoch0 = grouped_batches(lengths, 8, 1, 0)
    assert sorted(i for b in epoch0 for i in b) == sorted(set(i for b in epoch0 for i in b))  # no repeats
    assert len(epoch0) == 125 and seen == epoch0[:60]
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    random_batches = [order[i:i + 8] for i in range(0, 1000, 8)]
    pad_g, tot_g = padding_waste(lengths, epoch0)
    pad_r, tot_r = padding_waste(lengths, random_batches)
    assert pad_g / tot_g < 0.25 * pad_r / tot_r


def test_packed_mask_follows_the_compute_dtype():
    """Under autocast (and for half-precision weights) the mask is re-expressed in the dtype
    attention runs in: float16's minimum, never -inf (which would turn padding rows into NaN)."""
    from peftlab.train.loss import additive_mask_in, compute_dtype

    plain, packed, _ = packed_and_plain("llama")
    half = additive_mask_in(packed["attention_mask"], torch.float16)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert torch.equal(half == 0, packed["attention_mask"] == 0)
    model, _ = tiny_model("llama", attn_implementation="sdpa")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(model, torch.device("cpu")) == torch.bfloat16
        ref, _ = mean_loss(model, plain)
        got, _ = mean_loss(model, [packed])
    assert abs(got - ref) < 2e-3 * abs(ref)
