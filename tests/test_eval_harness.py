"""`peftlab eval`: loss and perplexity by the formula, predictions.jsonl, clear errors."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_overrides
from peftlab import cli
from peftlab.configure import load_config
from peftlab.eval import metrics as M
from peftlab.eval.harness import EvalConfig, generate_answers, split_prompt
from peftlab.train.loop import train

pytest.importorskip("sacrebleu")


def write_data(path, n=40, seed=0):
    rng = random.Random(seed)
    recs = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        recs.append({"instruction": f"What is {a} + {b}?", "input": "", "output": str(a + b)})
    path.write_text(json.dumps(recs))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    data = write_data(tmp / "add.json")
    cfg = load_config(None, [*tiny_overrides("llama"), f"data.path={data}", "data.eval_split=10",
                             "data.max_length=64", "train.steps=4", "train.batch_size=4", "train.lr=1e-2",
                             "train.eval_every=0", "train.mixed_precision=fp32", "train.progress=false",
                             "train.threads=1", f"train.output_dir={tmp / 'run'}", "peft.r=4"])
    result = train(cfg)
    return result, tmp


def manual_loss(model, examples):
    """Sum of next-token cross-entropy over label tokens / number of label tokens, one example at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.input_ids])
            labels = torch.tensor(ex.labels[1:])
            logits = model(input_ids=ids).logits[0, :-1].float()
            keep = labels != -100
            total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count, count


def test_eval_run_writes_metrics_and_predictions(tiny_run, capsys):
    result, tmp = tiny_run
    out = tmp / "eval-out"
    code = cli.main(["eval", "--run", str(result.run_dir), "--limit", "6", "--max-new-tokens", "5",
                     "--output", str(out), "--long-answer-chars", "2"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())

    # loss: token-weighted mean over the held-out answers, recomputed by hand with the trained model
    loss, count = manual_loss(result.model, result.data.eval)
    assert metrics["loss_tokens"] == count
    assert metrics["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)

    # predictions: the same greedy answers the in-memory model gives, scored per example
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 == metrics["n"]
    records = result.data.eval_records[:6]
    prompts = [split_prompt(r)[0] for r in records]
    expected = generate_answers(result.model, result.tokenizer, result.encoder, prompts,
                                EvalConfig(max_new_tokens=5))
    for rec, conv, answer in zip(preds, records, expected):
        assert rec["prompt"] == conv.messages[0]["content"]
        assert rec["reference"] == conv.messages[-1]["content"]
        assert rec["prediction"] == answer
        want = M.score_example(answer, rec["reference"])
        assert rec["scores"] == {k: round(v, 6) for k, v in want.items()}
        assert rec["long"] == (len(rec["reference"]) > 2)
    assert metrics["exact_match"] == M.exact_match_rate([p["prediction"] for p in preds],
                                                        [p["reference"] for p in preds])
    assert metrics["bleu4"] == pytest.approx(M.corpus_bleu([p["prediction"] for p in preds],
                                                           [p["reference"] for p in preds]))
    assert metrics["long_answer_n"] == sum(p["long"] for p in preds)


def test_eval_with_lookup_gives_the_same_predictions(tiny_run, capsys, monkeypatch):
    """--lookup 4: the same predictions and scores as batched greedy decoding, each prompt decoded
    alone by prompt lookup. The tiny base's answers never repeat a token (nothing would be drafted),
    so the drafts come from an oracle: the batched run's own tokens, every 3rd one wrong, so most
    forwards accept part of a draft. Refused with a temperature, as eval.lookup is."""
    from peftlab.config import build_dataclass
    from peftlab.errors import ConfigError
    from peftlab.eval import generate as gen
    from peftlab.model import lookup as lookup_mod

    _, tmp = tiny_run
    truths, calls = {}, []
    lean, real = gen.decode.lean_greedy, gen.lookup_greedy

    def recorded(model, ids, mask, n, eos, pad):  # the batched greedy tokens of every prompt
        out = lean(model, ids, mask, n, eos, pad)
        for row, m, full in zip(ids, mask, out):
            prompt = row[m.bool()].tolist()
            truths[tuple(prompt)] = prompt + full[ids.shape[1]:].tolist()
        return out

    def oracle(seq, k, max_ngram=2):
        text = seq.tolist()
        truth = next(t for p, t in truths.items() if text[:len(p)] == list(p))
        assert text == truth[:len(text)]
        out = torch.tensor(truth[len(text):len(text) + k], dtype=seq.dtype)
        out[torch.arange(len(text), len(text) + len(out)) % 3 == 0] += 1
        return out

    def counted(*args, **kwargs):
        calls.append({})
        return real(*args, stats=calls[-1], **kwargs)

    monkeypatch.setattr(gen.decode, "lean_greedy", recorded)
    monkeypatch.setattr(gen, "lookup_greedy", counted)
    monkeypatch.setattr(lookup_mod, "draft", oracle)
    runs = {}
    for lookup in ("0", "4"):
        out = tmp / f"eval-lookup-{lookup}"
        code = cli.main(["eval", *tiny_overrides("llama"), f"data.path={tmp / 'add.json'}", "data.eval_split=6",
                         "train.mixed_precision=fp32", "--max-new-tokens", "16", "--no-loss", "--output", str(out),
                         "--lookup", lookup])
        assert code == 0, capsys.readouterr().err
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics.pop("eval")["lookup"] == int(lookup)
        metrics.pop("generation_s")
        runs[lookup] = metrics, (out / "predictions.jsonl").read_text()
    assert runs["4"] == runs["0"] and runs["0"][0]["n"] == 6 and len(truths) >= 5
    assert len(calls) == 6 and 0 < sum(c["accepted"] for c in calls) < sum(c["drafted"] for c in calls), calls
    code = cli.main(["eval", "--run", str(tiny_run[0].run_dir), "--lookup", "4", "--temperature", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "--lookup 4" in err and "greedy only" in err
    with pytest.raises(ConfigError, match="greedy only"):  # a sweep's eval: section
        build_dataclass(EvalConfig, {"lookup": 4, "temperature": 0.5}, "eval")
    with pytest.raises(ConfigError, match="eval.lookup"):
        build_dataclass(EvalConfig, {"lookup": -1}, "eval")


def test_eval_without_held_out_data_is_a_clear_error(tiny_run, capsys):
    result, tmp = tiny_run
    code = cli.main(["eval", "--run", str(result.run_dir), "data.eval_split=0", "--output", str(tmp / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "no held-out data" in err and "data.eval_split" in err


def test_eval_base_model_loss_only(tiny_run, capsys):
    _, tmp = tiny_run
    data = tmp / "add.json"
    code = cli.main(["eval", *tiny_overrides("gpt2"), f"data.path={data}", "data.eval_split=5",
                     "train.mixed_precision=fp32", "--no-generate", "--output", str(tmp / "base"), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["eval_loss"] > 0 and "bleu4" not in printed
    assert (tmp / "base" / "predictions.jsonl").read_text() == ""


def test_split_prompt_needs_a_final_answer():
    from peftlab.data.formats import Conversation
    from peftlab.errors import ConfigError

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert split_prompt(Conversation(msgs, "x")) == (msgs[:1], "hello")
    with pytest.raises(ConfigError, match="x: the last message is not an assistant turn"):
        split_prompt(Conversation(msgs[:1], "x"))


def test_report_generates_samples_for_a_plain_run(tiny_run, capsys):
    """A `peftlab train` run has no stored samples: the report makes them with the run's model."""
    pytest.importorskip("matplotlib")
    result, tmp = tiny_run
    out = tmp / "report"
    assert cli.main(["report", str(result.run_dir), "--output", str(out), "--prompt", "What is 10 + 11?",
                     "--max-new-tokens", "4"]) == 0
    expected = generate_answers(result.model, result.tokenizer, result.encoder, ["What is 10 + 11?"],
                                EvalConfig(batch_size=1), max_new_tokens=4)[0]
    stored = json.loads((result.run_dir / "samples.json").read_text())
    assert stored["samples"] == [{"prompt": "What is 10 + 11?", "answer": expected}]
    md = (out / "report.md").read_text()
    assert "### What is 10 + 11?" in md and f"| run | {expected or chr(8211)} |" in md
