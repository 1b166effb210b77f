"""Every file in ../shared/data (beside the repository root, as CI has it; PEFTLAB_SHARED_DATA
overrides) loads, renders and masks: answers trained with their end-of-turn token, prompts not,
tool calls trained, pre-training blocks full, preference pairs sharing their prompt tokens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import tokenizer_for
from peftlab.config import DataConfig
from peftlab.data.dataset import build_datasets
from peftlab.data.formats import BadRecords, PreferencePair, read_records
from peftlab.data.inspect import padding_report
from peftlab.data.tokenize import IGNORE, Encoder

SHARED = Path(os.environ.get("PEFTLAB_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent (CI has ../shared beside the clone; "
                                                            "set PEFTLAB_SHARED_DATA to point elsewhere)")
EXPECTED_FILES = {"alpaca_en_demo.json", "alpaca_zh_demo.json", "identity.json", "glaive_toolcall_en_demo.json",
                  "c4_demo.jsonl", "wiki_demo.txt", "dpo_en_demo.json"}


def test_the_expected_files_are_there():
    assert EXPECTED_FILES <= {p.name for p in SHARED.iterdir()}


def answers_trained(ex, tok, end):
    """Every trained span ends with the end-of-turn text; the first token is a prompt token."""
    spans, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert ex.labels[0] == IGNORE and spans
    if not ex.truncated:
        assert all(tok.decode(s).endswith(end) for s in spans)
    return spans


@pytest.mark.parametrize("name,template,end", [
    ("alpaca_en_demo.json", "chatml", "<|im_end|>"),
    ("alpaca_zh_demo.json", "chat", "<|im_end|>\n"),
    ("identity.json", "llama3", "<|eot_id|>"),
    ("glaive_toolcall_en_demo.json", "qwen", "<|im_end|>"),
])
def test_conversation_files_load_render_and_mask(name, template, end):
    tok = tokenizer_for("llama")
    cfg = DataConfig(path=str(SHARED / name), template=template, max_length=1024, eval_split=0,
                     placeholders={"name": "peftlab", "author": "the peftlab authors"})
    d = build_datasets(cfg, tok, seed=0)
    s = d.stats
    assert s.bad.count == 0 and s.unfilled_placeholders == 0 and len(d.train) > 0.9 * s.records
    for ex in d.train:
        answers_trained(ex, tok, end)
    if name == "identity.json":
        assert all("{{" not in tok.decode(e.input_ids) for e in d.train)
        assert any("peftlab" in tok.decode(e.input_ids) for e in d.train)
    if name == "glaive_toolcall_en_demo.json":  # tool calls are trained, tool results are not
        trained = [tok.decode([t for t in e.labels if t != IGNORE]) for e in d.train]
        assert sum("<tool_call>" in t for t in trained) > 100
        assert not any("<tool_response>" in t for t in trained)
        assert all(tok.decode(e.input_ids).count("# Tools") <= 1 for e in d.train)


def test_identity_placeholders_are_reported_when_unfilled():
    d = build_datasets(DataConfig(path=str(SHARED / "identity.json"), template="chatml", eval_split=0),
                       tokenizer_for("llama"), seed=0)
    assert d.stats.unfilled_placeholders > 50 and "unfilled {{name}}" in d.stats.summary()


@pytest.mark.parametrize("name", ["c4_demo.jsonl", "wiki_demo.txt"])
def test_pretraining_corpora_become_full_blocks(name):
    tok = tokenizer_for("llama")
    d = build_datasets(DataConfig(path=str(SHARED / name), max_length=256, eval_split=0.02), tok, seed=0)
    assert d.stats.objective == "pretrain" and len(d.train) > 100
    assert all(len(e) == 256 and e.labels == e.input_ids for e in d.train + d.eval)
    assert sum(t == tok.eos_token_id for e in d.train for t in e.input_ids) > 10  # documents joined with EOS


def test_preference_pairs_parse_render_and_mask():
    tok = tokenizer_for("llama")
    bad = BadRecords()
    pairs = list(read_records(SHARED / "dpo_en_demo.json", bad=bad))
    assert len(pairs) == 300 and bad.count == 0 and all(isinstance(p, PreferencePair) for p in pairs)
    enc = Encoder(tok, "chatml", max_length=4096)
    for p in pairs[:60]:
        c, r = enc.encode_pair(p)
        prompt = enc.prompt_ids(p.prompt, tools=p.tools)
        k = len(prompt)
        assert c.input_ids[:k] == r.input_ids[:k] == prompt
        assert set(c.labels[:k]) == set(r.labels[:k]) == {IGNORE} and c.labels[k] != IGNORE
        assert tok.decode([t for t in c.labels if t != IGNORE]) == p.chosen[0]["content"] + "<|im_end|>"


def test_padding_waste_on_real_data_drops_with_packing():
    tok = tokenizer_for("llama")
    d = build_datasets(DataConfig(path=str(SHARED / "alpaca_en_demo.json"), template="chatml", max_length=512,
                                  eval_split=0), tok, seed=0)
    plain, grouped, packed = padding_report(d.train, 8, 512, seed=0)
    assert packed.fraction < 0.05 < plain.fraction
    assert grouped.fraction < plain.fraction / 4


def test_sample_registry_names_every_shared_file():
    from peftlab.data.catalog import load_registry

    reg = load_registry(Path(__file__).resolve().parents[1] / "configs" / "datasets.yaml")
    assert {Path(s.path).name for s in reg.values()} == EXPECTED_FILES
    tok = tokenizer_for("llama")
    for spec in reg.values():  # the registry's paths point at the files tested above
        target = SHARED / Path(spec.path).name
        first = next(iter(read_records(target, spec.format, spec.columns)))
        if spec.format == "preference":
            assert isinstance(first, PreferencePair)
        elif spec.format == "text":
            assert first.is_text
        else:
            Encoder(tok, "chatml").encode(first)
