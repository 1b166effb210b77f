"""Formats, column mapping, the registry, masking per format, truncation budgets, and bad input:
every malformed record gets an error naming file, record and field, or is skipped and counted."""

from __future__ import annotations

import json

import pytest

from conftest import tokenizer_for
from peftlab.config import DataConfig
from peftlab.configure import load_config
from peftlab.data.catalog import load_registry
from peftlab.data.dataset import build_datasets
from peftlab.data.formats import BadRecords, Conversation, PreferencePair, parse_record, read_records
from peftlab.data.tokenize import IGNORE, Encoder
from peftlab.errors import ConfigError, DataError


def write(path, records, jsonl=True):
    if jsonl:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, ensure_ascii=False))
    return path


def roles(conv):
    return [m["role"] for m in conv.messages]


# ---------------------------------------------------------------------------- formats


def test_alpaca_with_system_and_history():
    rec = {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be exact.",
           "history": [["Hi", "Hello!"], ["Who are you?", "A calculator."]]}
    c = parse_record(rec, "f.json record 0")
    assert roles(c) == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert c.messages[-2]["content"] == "Add\n2 and 3" and c.messages[-1]["content"] == "5"


def test_sharegpt_roles_tools_and_weights():
    rec = {"conversations": [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": '{"name": "w", "arguments": "{\\"city\\": \\"Oslo\\"}"}'},
        {"from": "observation", "value": "cold"},
        {"from": "gpt", "value": "Cold.", "loss_weight": 0.5}],
        "tools": '[{"name": "w", "parameters": {}}]'}
    c = parse_record(rec, "x")
    assert roles(c) == ["system", "user", "tool_call", "tool", "assistant"]
    assert json.loads(c.messages[2]["content"]) == {"name": "w", "arguments": {"city": "Oslo"}}
    assert c.messages[-1]["weight"] == 0.5 and c.tools == [{"name": "w", "parameters": {}}]


def test_openai_messages_with_tool_calls_and_parts():
    rec = {"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Sys"}]},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "A", "weight": 0}]}
    c = parse_record(rec, "x")
    assert roles(c) == ["system", "user", "tool_call", "tool", "assistant"]
    assert c.messages[0]["content"] == "Sys" and c.messages[-1]["weight"] == 0.0


def test_text_and_preference_shapes():
    assert parse_record({"text": "doc"}, "x").is_text
    for rec in (
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"instruction": "Q", "chosen": "good", "rejected": "bad"},
        {"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "good"},
         "rejected": {"from": "gpt", "value": "bad"}},
        {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},
    ):
        p = parse_record(rec, "x")
        assert isinstance(p, PreferencePair)
        assert p.prompt[-1] == {"role": "user", "content": "Q"}
        assert p.chosen[0]["content"] == "good" and p.rejected[0]["content"] == "bad"


def test_preference_pair_encodes_with_identical_prompt_tokens():
    tok = tokenizer_for("llama")
    p = parse_record({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}, "x")
    c, r = Encoder(tok, "chatml").encode_pair(p)
    k = next(i for i, lab in enumerate(c.labels) if lab != IGNORE)
    assert c.input_ids[:k] == r.input_ids[:k] and c.labels[:k] == r.labels[:k]
    assert tok.decode([t for t in c.labels if t != IGNORE]) == "4<|im_end|>"
    assert tok.decode([t for t in r.labels if t != IGNORE]) == "5<|im_end|>"


def test_column_mapping(tmp_path):
    f = write(tmp_path / "qa.jsonl", [{"question": "Q1", "answer": "A1"}, {"question": "Q2", "answer": "A2"}])
    recs = list(read_records(f, "alpaca", {"instruction": "question", "output": "answer"}))
    assert [r.messages[0]["content"] for r in recs] == ["Q1", "Q2"]
    g = write(tmp_path / "chat.jsonl", [{"turns": [{"speaker": "user", "text": "hi"},
                                                   {"speaker": "bot", "text": "yo"}]}])
    cols = {"conversations": "turns", "from": "speaker", "value": "text", "human": "user", "gpt": "bot"}
    (c,) = read_records(g, "sharegpt", cols)
    assert c.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(DataError, match="missing field 'answer'"):
        list(read_records(write(tmp_path / "b.jsonl", [{"question": "Q"}]), "alpaca",
                          {"instruction": "question", "output": "answer"}))


# ---------------------------------------------------------------------------- masks per format


@pytest.mark.parametrize("template", ["alpaca", "chatml", "llama3"])
def test_masks_per_format_every_turn_trained(tmp_path, template):
    """The same two-turn exchange in alpaca (history), ShareGPT and messages gives identical tokens
    and labels, and both answers are trained."""
    tok = tokenizer_for("gpt2")
    alpaca = {"instruction": "Q2", "output": "A2", "history": [["Q1", "A1"]]}
    sharegpt = {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                                  {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}
    messages = {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                             {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}
    enc = Encoder(tok, template)
    exs = [enc.encode(parse_record(r, "x")) for r in (alpaca, sharegpt, messages)]
    assert exs[0].input_ids == exs[1].input_ids == exs[2].input_ids
    assert exs[0].labels == exs[1].labels == exs[2].labels
    trained = tok.decode([t for t in exs[0].labels if t != IGNORE])
    end = {"alpaca": tok.eos_token, "chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[template]
    assert trained == f"A1{end}A2{end}"


def test_loss_weight_zero_masks_a_turn_and_fractional_is_kept():
    tok = tokenizer_for("llama")
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "weight": 0},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "weight": 0.25}]
    ex = Encoder(tok, "chatml").encode(Conversation(msgs, "x"))
    assert tok.decode([t for t in ex.labels if t != IGNORE]) == "A2<|im_end|>"
    trained_w = {w for w, lab in zip(ex.weights, ex.labels) if lab != IGNORE}
    assert trained_w == {0.25}


# ---------------------------------------------------------------------------- budgets


def test_source_and_target_budgets_keep_the_template():
    tok = tokenizer_for("llama")
    long_q, long_a = " ".join(["question"] * 50), " ".join(["answer"] * 80)
    conv = Conversation([{"role": "user", "content": long_q}, {"role": "assistant", "content": long_a}], "x")
    ex = Encoder(tok, "chatml", source_length=10, target_length=20).encode(conv)
    assert ex.truncated
    user = tok.decode(ex.input_ids).split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    assert len(tok(user, add_special_tokens=False).input_ids) <= 10 and long_q.startswith(user)
    trained = [t for t in ex.labels if t != IGNORE]
    assert trained[-1] == tok.eos_token_id  # the end of turn survives the cut
    answer = tok.decode(trained[:-1])
    assert len(tok(answer, add_special_tokens=False).input_ids) <= 20 and long_a.startswith(answer)


def test_overlong_policies():
    tok = tokenizer_for("llama")
    turns = [{"role": "system", "content": "SYS"}]
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " * 10}, {"role": "assistant", "content": f"ans {i}"}]
    conv = Conversation(turns, "x")
    full = Encoder(tok, "chatml", max_length=4096).encode(conv)
    limit = len(full) // 2
    ex = Encoder(tok, "chatml", max_length=limit, overlong="drop_oldest").encode(conv)
    text = tok.decode(ex.input_ids)
    assert len(ex) <= limit and text.startswith("<|im_start|>system\nSYS") and "ans 5<|im_end|>" in text
    assert "question 0" not in text and ex.truncated
    assert Encoder(tok, "chatml", max_length=limit, overlong="drop").encode(conv).dropped
    cut = Encoder(tok, "chatml", max_length=limit).encode(conv)
    assert cut.input_ids == full.input_ids[:limit] and cut.truncated
    with pytest.raises(ConfigError, match="data.overlong"):
        Encoder(tok, "chatml", overlong="nope")


def test_overlong_counts_in_stats(tmp_path):
    f = write(tmp_path / "d.jsonl", [{"instruction": "q " * 300, "output": "a"}, {"instruction": "q", "output": "a"},
                                     {"instruction": "r", "output": "b"}])
    cfg = DataConfig(path=str(f), template="chatml", max_length=64, overlong="drop", eval_split=0)
    d = build_datasets(cfg, tokenizer_for("llama"), 0)
    assert d.stats.dropped_overlong == 1 and len(d.train) == 2


# ---------------------------------------------------------------------------- datasets


def test_registry_mix_dedup_placeholders_and_split(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)]
              + [{"instruction": "q0", "output": "a0"}])  # one exact duplicate
    b = write(tmp_path / "b.json", [{"instruction": f"who {i}", "output": "I am {{name}} by {{author}}."}
                                    for i in range(5)], jsonl=False)
    reg = tmp_path / "reg.yaml"
    reg.write_text(f"alpha: {{path: {a.name}, format: alpaca}}\n"
                   f"ident: {{path: {b.name}, placeholders: {{name: Bot}}}}\n")
    cfg = load_config(None, [f"data.registry={reg}", "data.train=[alpha, ident]", "data.eval_split=5",
                             "data.mix={alpha: 0.5, ident: 0.5}", "data.mix_size=20",
                             "data.placeholders={author: Ann}", "data.template=chatml"])
    tok = tokenizer_for("llama")
    d = build_datasets(cfg.data, tok, seed=3)
    s = d.stats
    assert s.duplicates == 1 and s.records == 45 and s.eval == 5 and len(d.train) == 20
    answers = [tok.decode([t for t in e.labels if t != IGNORE]) for e in d.train]
    ident = [x for x in answers if x.startswith("I am")]
    assert len(ident) == 10 and set(ident) == {"I am Bot by Ann.<|im_end|>"}
    ident_in_eval = sum(r.messages[0]["content"].startswith("who") for r in d.eval_records)
    assert s.repeated == 10 - (5 - ident_in_eval)  # the identity share is drawn from what the split left
    again = build_datasets(cfg.data, tok, seed=3)  # deterministic
    assert [e.input_ids for e in again.train] == [e.input_ids for e in d.train]
    assert [r.source for r in again.eval_records] == [r.source for r in d.eval_records]


def test_llamafactory_dataset_info_reads(tmp_path):
    write(tmp_path / "tools.json", [{"conversations": [{"from": "human", "value": "hi"},
                                                           {"from": "gpt", "value": "yo"}], "tools": ""}], False)
    write(tmp_path / "c4.jsonl", [{"text": "a document"}])
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({
        "tools": {"file_name": "tools.json", "formatting": "sharegpt",
                  "columns": {"messages": "conversations", "tools": "tools"}},
        "c4": {"file_name": "c4.jsonl", "columns": {"prompt": "text"}},
        "remote": {"hf_hub_url": "x/y"}}))
    with pytest.raises(DataError, match="remote"):
        load_registry(info)
    info.write_text(json.dumps({k: v for k, v in json.loads(info.read_text()).items() if k != "remote"}))
    reg = load_registry(info)
    assert reg["tools"].format == "sharegpt" and reg["c4"].format == "text"
    (c,) = read_records(reg["tools"].path, reg["tools"].format, reg["tools"].columns)
    assert roles(c) == ["user", "assistant"]
    (doc,) = read_records(reg["c4"].path, reg["c4"].format, reg["c4"].columns)
    assert doc.is_text and doc.text == "a document"


def test_unknown_dataset_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="neither an existing file"):
        build_datasets(DataConfig(train=["nope"]), tokenizer_for("llama"), 0)
    with pytest.raises(ConfigError, match="not both"):
        build_datasets(DataConfig(train=["a"], path="b"), tokenizer_for("llama"), 0)


def test_preference_data_refused_for_sft(tmp_path):
    """Pairs are preference data (data.objective=auto); forced into SFT they are refused by name."""
    f = write(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}] * 1)
    assert build_datasets(DataConfig(path=str(f), eval_split=0), tokenizer_for("llama"), 0).stats.objective == \
        "preference"
    with pytest.raises(DataError, match="preference record .* cannot be used for supervised fine-tuning; train it "
                                        "with train.objective=dpo"):
        build_datasets(DataConfig(path=str(f), eval_split=0, objective="sft"), tokenizer_for("llama"), 0)


# ---------------------------------------------------------------------------- bad input

BAD = [
    ({"instruction": 3, "output": "a"}, "field 'instruction' must be a string, got int"),
    ({"instruction": "q"}, "missing field 'output'"),
    ({"instruction": "q", "output": "  "}, "field 'output' is empty"),
    ({"conversations": [{"value": "hi"}, {"from": "gpt", "value": "yo"}]}, r"conversations\[0\] has no 'from'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]},
     r"field 'conversations\[1\].value' is empty"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "no assistant turn"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                        {"from": "human", "value": "c"}]}, "the assistant's answer to it is missing"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
     "turn 0 has role 'assistant' but user must come first"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "bard", "value": "b"}]},
     r"from is 'bard'; expected one of"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
     r"messages\[1\].role is 'robot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ["x"]}]},
     r"messages\[1\].content\[0\] is not a text part"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "not json"}]},
     "is not a JSON tool call"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "are identical"),
    ({"foo": 1}, "cannot tell the data format from fields"),
    (["not", "a", "record"], "expected a JSON object"),
]


@pytest.mark.parametrize("rec,message", BAD)
def test_bad_record_named_or_skipped(tmp_path, rec, message):
    good = {"instruction": "q", "output": "a"}
    f = write(tmp_path / "data.jsonl", [good, rec])
    with pytest.raises(DataError, match=message) as err:
        list(read_records(f))
    assert f"{f} line 2" in str(err.value) and "--skip-bad-records" in str(err.value)
    bad = BadRecords()
    recs = list(read_records(f, bad=bad))
    assert len(recs) == 1 and bad.count == 1 and f"{f} line 2" in bad.examples[0]


def test_non_utf8_bytes_named_by_record_and_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"instruction": "ok", "output": "fine"}\n{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match=r"line 2: field 'instruction' holds bytes that are not UTF-8"):
        list(read_records(f))
    g = tmp_path / "d.json"
    g.write_bytes(b'[{"text": "ok"}, {"text": "bad \xff here"}]')
    with pytest.raises(DataError, match=r"d.json record 1: field 'text' holds bytes that are not UTF-8"):
        list(read_records(g))
    bad = BadRecords()
    assert len(list(read_records(g, bad=bad))) == 1 and bad.count == 1


def test_bad_json_line_and_template_that_cannot_render(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        list(read_records(f))
    g = write(tmp_path / "t.jsonl", [{"conversations": [
        {"from": "human", "value": "a"}, {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
        {"from": "observation", "value": "r"}, {"from": "gpt", "value": "b"}]}])
    with pytest.raises(DataError, match=r"t.jsonl line 1: template 'alpaca' cannot render tool calls"):
        build_datasets(DataConfig(path=str(g), template="alpaca", eval_split=0), tokenizer_for("gpt2"), 0)


def test_skip_bad_records_counts_in_build(tmp_path):
    f = write(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q2"},
                                     {"instruction": "q3", "output": "a3"}])
    with pytest.raises(DataError, match="missing field 'output'"):
        build_datasets(DataConfig(path=str(f), eval_split=0), tokenizer_for("llama"), 0)
    d = build_datasets(DataConfig(path=str(f), eval_split=0, skip_bad_records=True), tokenizer_for("llama"), 0)
    assert d.stats.bad.count == 1 and len(d.train) == 2 and "1 bad records skipped" in d.stats.summary()
