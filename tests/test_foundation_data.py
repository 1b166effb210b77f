"""Templates, label masks and data errors, checked against hand-written renderings."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tokenizer_for
from peftlab.config import DataConfig
from peftlab.data.collate import collate
from peftlab.data.dataset import build_datasets
from peftlab.data.formats import Conversation, load_conversations
from peftlab.data.tokenize import IGNORE, Encoder
from peftlab.errors import DataError

ALPACA_SYS = ("Below is an instruction that describes a task. "
              "Write a response that appropriately completes the request.")


def conv(*turns):
    roles = ["user", "assistant"] * len(turns)
    return Conversation([{"role": r, "content": c} for r, c in zip(roles, turns)], "test record 0")


def trained_text(tok, ex):
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def prompt_text(tok, ex):
    first = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)
    return tok.decode(ex.input_ids[:first])


def test_alpaca_template_masks_exactly_the_answer():
    tok = tokenizer_for("gpt2")
    enc = Encoder(tok, "alpaca", 512)
    ex = enc.encode(conv("Name a color.", "Blue."))
    eos = tok.eos_token
    assert tok.decode(ex.input_ids) == f"{ALPACA_SYS}\n\n### Instruction:\nName a color.\n\n### Response:\nBlue.{eos}"
    assert trained_text(tok, ex) == f"Blue.{eos}"
    assert ex.labels[-1] == tok.eos_token_id  # EOS is learned although pad == eos
    assert tok.pad_token_id == tok.eos_token_id


def test_vicuna_template_is_the_seeds_format():
    tok = tokenizer_for("gpt2")
    enc = Encoder(tok, "vicuna", 512)
    ex = enc.encode(conv("Hi?", "Hello!", "Bye?", "Bye!"))
    eos = tok.eos_token
    assert tok.decode(ex.input_ids) == (
        f"BEGINNING OF CONVERSATION: USER: Hi? ASSISTANT: Hello!{eos} USER: Bye? ASSISTANT: Bye!{eos}"
    )
    assert trained_text(tok, ex) == f" Hello!{eos} Bye!{eos}"  # every assistant turn is learned
    assert prompt_text(tok, ex) == "BEGINNING OF CONVERSATION: USER: Hi? ASSISTANT:"


def test_tokenizer_chat_template_multi_turn():
    tok = tokenizer_for("llama")  # SmolLM2: ChatML with a default system prompt, pad == eos
    enc = Encoder(tok, "chat", 512)
    c = conv("What is 2+2?", "4", "And 3+3?", "6")
    ex = enc.encode(c)
    full = tok.apply_chat_template(c.messages, tokenize=False)
    assert tok.decode(ex.input_ids) == full
    assert trained_text(tok, ex) == "4<|im_end|>\n6<|im_end|>\n"
    assert tok.eos_token_id in [lab for lab in ex.labels if lab != IGNORE]


@pytest.mark.parametrize("template,arch", [("alpaca", "gpt2"), ("vicuna", "gpt2"), ("chat", "llama"),
                                           ("alpaca", "llama")])
def test_generation_prompt_is_the_training_prefix(template, arch):
    tok = tokenizer_for(arch)
    enc = Encoder(tok, template, 512)
    for c in (conv("Add 2 and 3.", "5"), conv("a", "b", "Now c?", "d")):
        ex = enc.encode(c)
        prompt_ids = enc.prompt_ids(c.messages[:-1])
        # token for token and byte for byte
        assert ex.input_ids[: len(prompt_ids)] == prompt_ids
        if len(c.messages) == 2:
            assert all(lab == IGNORE for lab in ex.labels[: len(prompt_ids)])
        assert ex.labels[len(prompt_ids) - 1] == IGNORE and ex.labels[len(prompt_ids)] != IGNORE
        text = enc.renderer.generation_prompt(c.messages[:-1])
        assert tok.decode(ex.input_ids).startswith(text)
        assert tok.decode(prompt_ids) == text


def test_train_on_prompt_and_truncation():
    tok = tokenizer_for("gpt2")
    ex = Encoder(tok, "alpaca", 512, train_on_prompt=True).encode(conv("Q", "A"))
    assert ex.labels == ex.input_ids
    short = Encoder(tok, "alpaca", 10).encode(conv("Q", "A"))
    assert len(short) == 10 and short.truncated and short.n_labels == 0


def test_collate_pads_labels_with_ignore():
    tok = tokenizer_for("llama")
    enc = Encoder(tok, "chat", 512)
    a, b = enc.encode(conv("x", "y")), enc.encode(conv("a longer question here", "and a longer answer"))
    batch = collate([a, b], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, max(len(a), len(b)))
    n = len(a)
    assert torch.all(batch["labels"][0, n:] == IGNORE) and torch.all(batch["attention_mask"][0, n:] == 0)
    assert batch["labels"][0, :n].tolist() == a.labels  # the eos label survives although pad == eos


def test_bad_records_name_file_record_and_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(DataError, match=r"d.jsonl line 2: missing field 'output'"):
        load_conversations(p)
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": 3}\n')
    with pytest.raises(DataError, match=r"line 2: field 'output' must be a string, got int"):
        load_conversations(p)
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(DataError, match=r"d.jsonl line 2: not valid JSON"):
        load_conversations(p)
    j = tmp_path / "d.json"
    j.write_text('[\n{"messages": [{"role": "user", "content": "x"}]}\n]')
    with pytest.raises(DataError, match=r"d.json record 0: messages has no assistant turn"):
        load_conversations(j)
    j.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}]')
    with pytest.raises(DataError, match=r"d.json line 2 column"):
        load_conversations(j)
    b = tmp_path / "bin.jsonl"
    b.write_bytes(b'{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_conversations(b)


def test_skip_bad_records_counts_them(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)] + [{"instruction": "no output"}, [1]]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = tokenizer_for("gpt2")
    with pytest.raises(DataError):
        build_datasets(DataConfig(path=str(p), template="alpaca"), tok, 0)
    data = build_datasets(DataConfig(path=str(p), template="alpaca", skip_bad_records=True, eval_split=2), tok, 0)
    assert data.stats.bad.count == 2
    assert len(data.train) == 8 and len(data.eval) == 2


def test_split_is_deterministic_and_disjoint():
    tok = tokenizer_for("gpt2")
    cfg = DataConfig(path="builtin:tasks", template="alpaca", eval_split=50)
    a, b = build_datasets(cfg, tok, 7), build_datasets(cfg, tok, 7)
    assert [e.input_ids for e in a.eval] == [e.input_ids for e in b.eval]
    train_set = {tuple(e.input_ids) for e in a.train}
    assert not any(tuple(e.input_ids) in train_set for e in a.eval)
    assert len(a.eval) == 50 and len(a.train) == 3000 - 50
