"""Preference training: the data path, the reference policy, the objectives in the real loop.

TRL equality of every loss lives in test_preference_trl.py. Here:
- pairs are encoded with the prompt rendered once (the generation prompt, token for token) and
  batched as [chosen rows; rejected rows]; truncation keeps the prompt's end and the answers' start;
- bad input is a named error with file and record;
- ``adapter_off`` reference log-probs equal a separate frozen base copy bit for bit (fp32), for
  every registered method that leaves its base untouched; methods that change it get a frozen copy;
- DPO runs in ``peftlab.train`` (metrics per step, precomputed == live reference, accumulation).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import small_model, tiny_overrides, tokenizer_for
from peftlab import registry
from peftlab.config import DataConfig
from peftlab.configure import load_config
from peftlab.data.dataset import build_datasets, make_encoder
from peftlab.data.formats import LabeledAnswer, parse_record
from peftlab.data.preference import collate_pairs, encode_pair, unpair, with_kl_rows
from peftlab.data.tokenize import IGNORE
from peftlab.errors import ConfigError, DataError
from peftlab.train.reference import Reference, resolve_kind
from peftlab.train.seq_logps import row_logps

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"conversations": [{"from": "human", "value": "Name a colour."}],
     "chosen": {"from": "gpt", "value": "Blue."}, "rejected": {"from": "gpt", "value": "A car."}},
    {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": "Hi there!", "rejected": "No."},
    {"instruction": "Translate to French", "input": "cat", "chosen": "chat", "rejected": "chien"},
    {"prompt": "Capital of Italy?", "chosen": "Rome.", "rejected": "Paris."},
    {"prompt": "Opposite of hot?", "chosen": "Cold.", "rejected": "Warm."},
]


def write(tmp_path, records, name="pairs.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def data_cfg(path, **kw) -> DataConfig:
    return DataConfig(path=path, eval_split=0, template="chatml", max_length=kw.pop("max_length", 64), **kw)


# ---------------------------------------------------------------------------- data


def test_pair_shares_the_generation_prompt_and_batches_chosen_then_rejected(tmp_path):
    tok = tokenizer_for("llama")
    data = build_datasets(data_cfg(write(tmp_path, PAIRS), dedup=False), tok, 0)
    assert data.stats.objective == "preference" and len(data.train) == len(PAIRS)
    enc = make_encoder(data_cfg(None), tok)
    for ex in data.train:
        rec = parse_record(PAIRS[int(ex.source.rsplit(" ", 1)[1])], ex.source)  # "file record N" (0-based)
        assert ex.prompt == enc.prompt_ids(rec.prompt)  # rendered once: the generation prompt, token for token
        assert tok.decode(ex.chosen).startswith(rec.chosen[-1]["content"])
        assert tok.decode(ex.chosen).endswith("<|im_end|>")  # the end-of-turn token is scored
    batch = data.collate(data.train[:3])
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape[0] == 6
    for i, ex in enumerate(data.train[:3]):
        for row, answer in ((i, ex.chosen), (3 + i, ex.rejected)):
            n = len(ex.prompt)
            assert ids[row, :n].tolist() == ex.prompt
            assert ids[row, n:n + len(answer)].tolist() == answer
            assert (labels[row, :n] == IGNORE).all() and labels[row, n:n + len(answer)].tolist() == answer
            assert (labels[row, n + len(answer):] == IGNORE).all()


def test_sharegpt_demo_file_and_catalog_ranking_entry(tmp_path):
    tok = tokenizer_for("llama")
    demo = "../shared/data/dpo_en_demo.json"
    records = json.load(open(demo))[:4]
    path = write(tmp_path, records, "demo.json")
    registry_file = tmp_path / "datasets.yaml"
    registry_file.write_text(f"demo_pairs:\n  file_name: {path}\n  ranking: true\n  formatting: sharegpt\n"
                             "  columns: {messages: conversations, chosen: chosen, rejected: rejected}\n")
    cfg = DataConfig(train=["demo_pairs"], registry=str(registry_file), eval_split=0, max_length=512,
                     max_prompt_length=256)
    data = build_datasets(cfg, tok, 0)
    assert len(data.train) == 4 and all(len(e.prompt) <= 256 for e in data.train)
    prompts = [tok.decode(e.prompt) for e in data.train]
    assert any("Angela" in p for p in prompts)  # record 1's ShareGPT prompt, rendered with the chat template
    assert all(p.endswith("<|im_start|>assistant\n") for p in prompts)


def test_truncation_keeps_prompt_end_and_answer_start(tmp_path):
    tok = tokenizer_for("llama")
    long_prompt = " ".join(f"w{i}" for i in range(200)) + " FINAL QUESTION?"
    rec = {"prompt": long_prompt, "chosen": "alpha " * 40, "rejected": "beta " * 40}
    cfg = data_cfg(write(tmp_path, [rec]), max_length=60, max_prompt_length=20)
    ex = build_datasets(cfg, tok, 0).train[0]
    full = encode_pair(parse_record(rec, "r"), make_encoder(cfg, tok), DataConfig(max_length=10**6))
    assert ex.truncated and len(ex.prompt) == 20 and ex.prompt == full.prompt[-20:]  # the end of the prompt
    assert "assistant" in tok.decode(ex.prompt[-4:])  # ... with the answer header
    assert ex.chosen == full.chosen[:40] and ex.rejected == full.rejected[:40]  # answers keep their start
    assert len(ex) == 60


def test_prompt_leaving_no_answer_token_is_a_named_error(tmp_path):
    tok = tokenizer_for("llama")
    rec = {"prompt": "word " * 100, "chosen": "yes", "rejected": "no"}
    path = write(tmp_path, [PAIRS[0], rec])
    with pytest.raises(DataError, match=r"pairs\.json record 1: the prompt is \d+ tokens, so within "
                                        r"data\.max_length=64 no answer token survives"):
        build_datasets(data_cfg(path), tok, 0)
    data = build_datasets(data_cfg(path, overlong="drop"), tok, 0)
    assert len(data.train) == 1 and data.stats.dropped_overlong == 1


@pytest.mark.parametrize("rec, fmt, message", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "auto", r"record 1: fields 'chosen' and 'rejected' are "
                                                                   "identical"),
    ({"prompt": "q", "chosen": "a"}, "auto", r"record 1: missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "auto", r"record 1: a preference record needs a prompt"),
    ({"prompt": "q", "completion": "a"}, "auto", r"record 1: missing field 'label': a KTO record"),
    ({"prompt": "q", "completion": "a", "label": "maybe"}, "kto", r"record 1: field 'label' must be true or false"),
])
def test_bad_preference_records_name_file_and_record(tmp_path, rec, fmt, message):
    path = write(tmp_path, [PAIRS[0] if fmt == "auto" else {"prompt": "p", "completion": "c", "label": True}, rec])
    with pytest.raises(DataError, match=r"pairs\.json " + message):
        build_datasets(data_cfg(path, format=fmt), tokenizer_for("llama"), 0)


def test_kto_records_and_pairs_become_labelled_examples_with_kl_rows(tmp_path):
    tok = tokenizer_for("llama")
    recs = [{"prompt": "q1", "completion": "good", "label": True}, {"prompt": "q2", "completion": "bad", "label": False},
            {"prompt": "q3", "completion": "ok", "label": "true"}]
    data = build_datasets(data_cfg(write(tmp_path, recs)), tok, 0)
    assert [e.label for e in data.train] == [True, False, True]
    assert isinstance(parse_record(recs[0], "x"), LabeledAnswer)
    pairs = build_datasets(data_cfg(write(tmp_path, PAIRS, "p.json")), tok, 0).train
    kto = with_kl_rows(unpair(pairs), 64)
    assert [e.label for e in kto[:4]] == [True, False, True, False]
    assert kto[1].kl_completion == kto[0].completion and kto[0].kl_completion == kto[-1].completion
    batch = data.collate(kto[:4])
    assert batch["kto_label"].tolist() == [True, False, True, False] and batch["kl_input_ids"].shape[0] == 4


# ---------------------------------------------------------------------------- reference policy


def pair_batch(vocab: int = 1000, seed: int = 0) -> dict:
    """Two pairs of random tokens: prompt 6 tokens, answers of 5 and 3 tokens (right padded)."""
    g = torch.Generator().manual_seed(seed)
    from peftlab.data.preference import PairExample

    def toks(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    exs = []
    for _ in range(2):
        c, r = toks(5), toks(3)
        exs.append(PairExample(toks(6), c, c, r, r))
    return collate_pairs(exs, 0)


ADAPTER_METHODS = [n for n in registry.names()
                   if registry.get(n).edits_base is None or not registry.get(n).edits_base(
                       registry.get(n).config_cls())]
METHOD_OPTIONS = {"prompt_tuning": {"num_virtual_tokens": 4}, "p_tuning": {"num_virtual_tokens": 4},
                  "prefix_tuning": {"num_virtual_tokens": 4}, "p_tuning_v2": {"num_virtual_tokens": 4},
                  "mam": {"num_virtual_tokens": 4}, "lora": {"r": 4}, "dora": {"r": 4},
                  "trainable_tokens": {"token_indices": sorted(set(pair_batch()["input_ids"].flatten().tolist()))},
                  "vblora": {"r": 4, "num_vectors": 16, "vector_length": 16}}


def test_every_base_keeping_method_is_covered():
    assert {"lora", "dora", "vera", "adalora", "ia3", "adapter", "mam", "moe_lora", "prompt_tuning", "p_tuning",
            "prefix_tuning", "p_tuning_v2"} <= set(ADAPTER_METHODS)
    assert not {"full", "bitfit", "lisa", "relora", "delta_lora", "chain_lora", "periodic_lora"} & set(ADAPTER_METHODS)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_adapter_off_reference_equals_a_frozen_base_copy_bit_for_bit(method):
    from conftest import perturb, with_method

    base = small_model("llama")
    frozen = copy.deepcopy(base)
    options = METHOD_OPTIONS.get(method, {})
    if method == "adapter_fusion":  # fuses saved adapters: two made on this base
        from test_contract import task_adapters

        options = {"adapters": task_adapters("llama")}
    model, m, cfg = with_method(base, method, **options)
    perturb(model, std=0.2)
    batch = pair_batch()
    assert resolve_kind("auto", m, cfg, model) == "adapter_off"
    with torch.no_grad():
        adapted = row_logps(model, batch, fused=False)[0]
        want = row_logps(frozen, batch, fused=False)[0]
    got = Reference("adapter_off").compute(model, batch)
    assert torch.equal(got, want), (got - want).abs().max()
    assert not torch.equal(adapted, want)  # the adapters do change the model (so the test can fail)
    with torch.no_grad():
        assert torch.equal(row_logps(model, batch, fused=False)[0], adapted)  # every wrapper is back


@pytest.mark.parametrize("method", ["full", "bitfit", "lisa", "relora", "delta_lora", "chain_lora", "periodic_lora"])
def test_methods_that_change_the_base_get_a_frozen_copy(method):
    from conftest import with_method

    model, m, cfg = with_method(small_model("llama"), method, **({"add_biases": True} if method == "bitfit" else {}))
    assert resolve_kind("auto", m, cfg, model) == "frozen_copy"
    with pytest.raises(ConfigError, match="pref.reference=adapter_off: peft.method=.* use pref.reference=frozen_copy"):
        resolve_kind("adapter_off", m, cfg, model)


def test_frozen_copy_stays_at_the_start_while_the_policy_trains():
    model = small_model("llama")
    batch = pair_batch()
    ref = Reference("frozen_copy", model)
    start = ref.compute(model, batch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    assert torch.equal(ref.compute(model, batch), start)
    assert not torch.equal(row_logps(model, batch, fused=False)[0].detach(), start)


def test_fused_and_plain_log_probs_agree():
    model = small_model("llama")
    batch = pair_batch()
    fused = row_logps(model, batch, fused=True)[0]
    with torch.no_grad():
        plain, counts = row_logps(model, batch, fused=False)
    assert counts.tolist() == [5, 5, 3, 3]  # every answer token (each follows the prompt)
    torch.testing.assert_close(fused.detach(), plain, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------- the loop


def run_args(tmp_path, objective: str, *extra: str, method: str = "lora", name: str = "run") -> list[str]:
    data = write(tmp_path, PAIRS * 2, "train.json")  # 12 pairs, dedup off: 10 train, 2 held out
    return [*tiny_overrides("llama"), f"data.path={data}", "data.template=chatml", "data.max_length=48",
            "data.eval_split=2", "data.dedup=false", f"peft.method={method}", f"train.objective={objective}",
            "train.steps=3", "train.batch_size=2", "train.lr=5e-3", "train.progress=false", "train.threads=1",
            "train.mixed_precision=no", "train.warmup=0", "train.eval_every=0", f"train.output_dir={tmp_path / name}",
            *extra]


def run_config(tmp_path, objective: str, *extra: str, method: str = "lora", name: str = "run"):
    return load_config(None, run_args(tmp_path, objective, *extra, method=method, name=name))


METRICS = {"rewards_chosen", "rewards_rejected", "margin", "accuracy", "logps_chosen", "logps_rejected"}


def test_dpo_in_the_loop_starts_at_log_2_and_logs_preference_metrics(tmp_path):
    from peftlab.train.loop import train

    result = train(run_config(tmp_path, "dpo", "peft.r=4"))
    first, last = result.metrics[0], result.metrics[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts as the base: every log-ratio is 0
    assert first["margin"] == pytest.approx(0.0, abs=1e-6) and first["label_tokens"] == 2  # units: pairs
    assert METRICS <= set(first) and {f"eval_{k}" for k in METRICS} <= set(last)
    assert last["loss"] < first["loss"]  # it learns the preferences
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["eval_accuracy"] == last["eval_accuracy"]
    # peftlab eval on the run: the same held-out pairs, the same numbers (the adapter switched off is the reference)
    from peftlab.cli import main

    assert main(["eval", "--run", str(tmp_path / "run"), "--max-new-tokens", "3", "--limit", "1"]) == 0
    scored = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert scored["pref_pairs"] == 2 and scored["pref_reference"] == "adapter_off"
    for key in ("accuracy", "margin", "rewards_chosen", "rewards_rejected"):
        assert scored[f"pref_{key}"] == pytest.approx(last[f"eval_{key}"], abs=1e-5), key
    assert scored["pref_loss"] == pytest.approx(last["eval_loss"], abs=1e-5) and scored["n"] == 1


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_precomputed_reference_gives_the_live_references_steps(tmp_path, objective):
    from peftlab.train.loop import train

    live = train(run_config(tmp_path, objective, "pref.reference=adapter_off", name="live")).metrics
    pre = train(run_config(tmp_path, objective, "pref.reference=precomputed", name="pre")).metrics
    for a, b in zip(live, pre):
        for key in ("loss", "rewards_chosen", "rewards_rejected", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=2e-6), key


def test_full_fine_tuning_uses_a_frozen_copy_and_kto_starts_at_half(tmp_path):
    from peftlab.train.loop import train

    full = train(run_config(tmp_path, "dpo", "train.lr=1e-4", method="full", name="full")).metrics
    assert full[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    kto = train(run_config(tmp_path, "kto", "peft.r=4", name="kto")).metrics
    assert kto[0]["loss"] == pytest.approx(0.5, abs=1e-5)  # policy == reference: 1 - σ(0) for every example
    assert kto[0]["label_tokens"] == 2 and {"kl", "desirable", "rewards_chosen"} <= set(kto[0])


@pytest.mark.parametrize("objective", ["simpo", "orpo", "reward"])
def test_reference_free_objectives_run_in_the_loop(tmp_path, objective):
    from peftlab.train.loop import train

    result = train(run_config(tmp_path, objective, "peft.r=4"))
    metrics = result.metrics
    assert all(math.isfinite(m["loss"]) for m in metrics) and len(metrics) == 3
    assert {"rewards_chosen", "accuracy", "eval_accuracy"} <= set(metrics[-1])
    if objective == "reward":  # the trained head is saved beside the adapter
        from safetensors.torch import load_file

        saved = load_file(str(tmp_path / "run" / "reward_head.safetensors"))["weight"]
        assert torch.equal(saved, result.model.reward_head.weight.detach())


@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo", "kto", "reward"])
def test_each_objective_learns_one_batch_through_train_step(tmp_path, objective):
    """The real optimiser step (train_step) on one fixed batch: the objective's loss goes down."""
    from peftlab.train.pref_setup import build_objective, prepare_data
    from peftlab.train.setup import load_data, prepared_model
    from peftlab.train.step import start_training, train_step

    cfg = run_config(tmp_path, objective, "peft.r=8", "train.lr=2e-2")
    model, tok = prepared_model(cfg, None, None)
    data = load_data(cfg, tok, 0)
    prepare_data(cfg, data)
    objective_ = build_objective(cfg, model, {})
    state = start_training(model, cfg, 8, objective=objective_)
    batch = data.collate(data.train[:4])
    losses = [train_step(state, [batch])["loss"] for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_objective_and_data_must_match(tmp_path):
    from peftlab.train.loop import train

    with pytest.raises(ConfigError, match="holds preference records .* but train.objective=lm; set train.objective=dpo"):
        train(run_config(tmp_path, "lm", name="a"))
    sft = write(tmp_path, [{"instruction": "q", "output": "a"}] * 6, "sft.json")
    with pytest.raises(ConfigError, match="train.objective=dpo needs preference data"):
        train(run_config(tmp_path, "dpo", f"data.path={sft}", name="b"))
    with pytest.raises(ConfigError, match="pref.loss 'hinge' is not one of sigmoid, ipo, robust"):
        run_config(tmp_path, "dpo", "pref.loss=hinge")
    with pytest.raises(ConfigError, match="train.objective 'ppo' is not one of"):
        run_config(tmp_path, "ppo")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_dpo_under_torchrun_two_processes_match_one(tmp_path, mode):
    """torchrun, 2 processes (Gloo, CPU), micro-batches of 2 x grad_accum 2 each == one process with
    grad_accum 4: the same pairs per step, so the same DPO loss, rewards and accuracy per step
    (FSDP: the adapter-off reference swaps modules inside the sharded blocks)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import peftlab
    from peftlab.train.loop import train

    data = write(tmp_path, PAIRS * 4, "train.json")
    common = [*tiny_overrides("llama"), f"data.path={data}", "data.template=chatml", "data.max_length=48",
              "data.eval_split=4", "data.dedup=false", "peft.r=4", "train.objective=dpo", "train.steps=3",
              "train.batch_size=2", "train.lr=5e-3", "train.progress=false", "train.threads=1",
              "train.mixed_precision=no", "train.warmup=0", "train.eval_every=0"]
    one = train(load_config(None, [*common, "train.grad_accum=4", f"train.output_dir={tmp_path / 'one'}"])).metrics
    src = str(Path(peftlab.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "peftlab", "train", *common,
                           "train.grad_accum=2", f"train.distributed={mode}", f"train.output_dir={tmp_path / 'two'}"],
                          env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(two) == len(one) == 3
    for a, b in zip(one, two):
        assert b["label_tokens"] == a["label_tokens"] == 8  # pairs per step, over both processes
        for key in ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy", "eval_loss", "eval_accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=5e-5, abs=2e-6), key


@pytest.mark.parametrize("method, reference", [("full", "auto"), ("lora", "precomputed")])
def test_dpo_killed_with_sigkill_resumes_exactly(tmp_path, method, reference):
    """A DPO run killed right after step 2 and resumed equals the uninterrupted run: the frozen copy
    is of the starting model (not of the resumed weights); precomputed log-probs are recomputed."""
    import signal

    from safetensors.torch import load_file

    from peftlab.train.loop import train
    from test_resume import run_killed

    def args(name):
        return run_args(tmp_path, "dpo", f"pref.reference={reference}", "train.steps=4", "train.save_every=1",
                        "train.lr=1e-3", method=method, name=name)

    ref = train(load_config(None, args("ref")))
    assert run_killed(tmp_path, args("killed"), "after_step", 2) == -signal.SIGKILL
    resumed = train(load_config(None, args("killed")), resume=True)
    strip = [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in ref.metrics]
    logged = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in logged] == strip
    a, b = load_file(str(next(ref.artifact.glob("*.safetensors")))), load_file(
        str(next(resumed.artifact.glob("*.safetensors"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_composes_with_qlora(tmp_path):
    """An NF4 base with LoRA: the reference is the quantised base (adapters off), no copy."""
    from peftlab.model.load import load_model
    from peftlab.train.loop import train

    cfg = run_config(tmp_path, "dpo", "model.quantize=nf4", "peft.r=4")
    result = train(cfg)
    assert result.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    base, _ = load_model(cfg.model, seed=cfg.train.seed, with_tokenizer=False)  # the same NF4 base, no adapter
    batch = result.data.collate(result.data.train[:2])
    with torch.no_grad():
        live = row_logps(result.model, batch, fused=False)[0]
        want = row_logps(base.eval(), batch, fused=False)[0]
    got = Reference("adapter_off").compute(result.model, batch)
    assert torch.equal(got, want) and not torch.equal(got, live)


def test_data_inspect_shows_both_rows_of_a_pair(tmp_path):
    from peftlab.data.inspect import report

    tok = tokenizer_for("llama")
    data = build_datasets(data_cfg(write(tmp_path, PAIRS[:2])), tok, 0)
    text = report(data, tok, 2, 64, 0)
    assert "objective: preference" in text and "chosen row" in text and "rejected row" in text
    assert "⟦4<|im_end|>" in text and "⟦5<|im_end|>" in text  # each answer marked as scored, after one prompt


def test_reference_none_is_reference_free_and_copies_nothing(tmp_path):
    from peftlab.train.pref_setup import build_objective

    cfg = run_config(tmp_path, "dpo", "pref.reference=none", method="full")
    model = small_model("llama")
    objective = build_objective(cfg, model, {})
    assert objective.reference.kind == "none" and objective.reference.copy is None
    batch = pair_batch()
    assert torch.equal(objective.reference.logps(model, batch), torch.zeros(4))
    copy_ref = build_objective(run_config(tmp_path, "dpo", method="full"), model, {}).reference
    assert copy_ref.kind == "frozen_copy" and copy_ref.copy is not None
