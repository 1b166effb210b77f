"""LoRAMoE's sample types come from the data: ``peft.type_field`` names the records' column.

- every example carries its record's type (by ``peft.type_labels`` or as the index itself), the
  collated batch carries ``sample_type`` [B] (packed rows: [B, T], each token its sequence's type);
- a missing or unknown label is a ``TypeLabelError`` naming the record, the column and the labels;
- the localized balancing constraint on a pipeline batch with mixed labels equals its formula,
  computed here by hand from the records' labels (not from the batch), and differs from the value
  without labels (every sample of type ``peft.sample_type``, today's behaviour, kept);
- a run with a type field trains through the loop.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_overrides
from peftlab.configure import load_config
from peftlab.data.sample_types import TypeLabelError
from peftlab.errors import ConfigError
from peftlab.model.load import load_model
from peftlab.train.setup import load_data, prepared_model

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = "apple river stone cloud green happy quiet orange window silver music garden".split()
LABELS = ["world", "task"]


def records(label=lambda i: LABELS[i % 3 == 0]) -> list[dict]:
    """Record i says word i; its type is ``label(i)`` (None: no column)."""
    out = []
    for i, w in enumerate(WORDS):
        rec = {"messages": [{"role": "user", "content": f"Say {w}" + "!" * (i % 4) + "."},
                            {"role": "assistant", "content": w * (1 + i % 3)}]}
        if label(i) is not None:
            rec["type"] = label(i)
        out.append(rec)
    return out


def config(tmp_path, recs: list[dict], *extra: str):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return load_config(None, [*tiny_overrides("llama"), "model.seed=0", f"data.path={data}", "data.eval_split=0",
                              "data.max_length=64", "data.shuffle=false", "train.batch_size=4",
                              "train.progress=false", f"train.output_dir={tmp_path / 'run'}",
                              "peft.method=loramoe", "peft.r=2", "peft.num_experts=4", "peft.expert_groups=[2,2]",
                              "peft.aux_loss_coef=1.0", "peft.lbc_delta=0.25", *extra])


def typed(tmp_path, *extra: str):
    cfg = config(tmp_path, records(), "peft.type_field=type", "peft.type_labels=[world,task]", *extra)
    _, tok = load_model(cfg.model, seed=0)
    return cfg, tok, load_data(cfg, tok, cfg.train.seed)


def line_of(source: str) -> int:
    return int(source.rsplit("line ", 1)[1]) - 1  # "data.jsonl line 3" -> record 2


def test_examples_and_batches_carry_the_records_types(tmp_path):
    cfg, _, data = typed(tmp_path)
    want = {i: LABELS.index(r["type"]) for i, r in enumerate(records())}
    assert sorted(line_of(e.source) for e in data.train) == list(range(len(WORDS)))
    for e in data.train:
        assert e.types == (want[line_of(e.source)],)
    rows = data.train[:4]
    batch = data.collate(rows)
    assert batch["sample_type"].tolist() == [want[line_of(e.source)] for e in rows]
    assert len(set(batch["sample_type"].tolist())) == 2  # mixed labels in one batch

    _, _, packed = typed(tmp_path, "data.packing=true")
    batch = packed.collate(packed.train[:2])
    assert batch["sample_type"].shape == batch["input_ids"].shape
    for row, e in enumerate(packed.train[:2]):
        start = 0
        for n, source in zip(e.seq_lens, e.source.split("; ")):
            assert (batch["sample_type"][row, start:start + n] == want[line_of(source)]).all()
            start += n

    # without names the column holds the group index itself
    cfg = config(tmp_path, records(lambda i: int(i % 3 == 0)), "peft.type_field=type")
    _, tok = load_model(cfg.model, seed=0)
    assert [e.types for e in load_data(cfg, tok, 0).train][:4] == [(1,), (0,), (0,), (1,)]


@pytest.mark.parametrize("label,extra,match", [
    (lambda i: None if i == 5 else "task", ["peft.type_labels=[world,task]"],
     r"data.jsonl line 6: no type label: peft.type_field='type' names a column.*'world', 'task'"),
    (lambda i: "news" if i == 2 else "world", ["peft.type_labels=[world,task]"],
     r"data.jsonl line 3: type label 'news' in column 'type' is not one of 'world', 'task'"),
    (lambda i: 2, [], r"type label 2 in column 'type' is not one of the integers 0..1"),
])
def test_a_missing_or_unknown_label_is_named(tmp_path, label, extra, match):
    cfg = config(tmp_path, records(label), "peft.type_field=type", *extra)
    _, tok = load_model(cfg.model, seed=0)
    with pytest.raises(TypeLabelError, match=match):
        load_data(cfg, tok, 0)


def test_bad_type_settings_are_refused():
    with pytest.raises(ConfigError, match="must name each of the 2 groups"):
        load_config(None, [*tiny_overrides("llama"), "peft.method=loramoe", "peft.type_field=type",
                           "peft.type_labels=[a,b,c]"]).peft.validate()
    with pytest.raises(ConfigError, match="needs peft.type_field"):
        load_config(None, [*tiny_overrides("llama"), "peft.method=loramoe", "peft.type_labels=[a,b]"]).peft.validate()


def test_the_constraint_uses_the_labels_and_equals_its_formula(tmp_path):
    from peftlab import registry
    from peftlab.methods.moe_lora import moe_layers

    cfg, tok, data = typed(tmp_path)
    model, _ = prepared_model(cfg, None, None)
    method = registry.get("loramoe")
    rows = data.train[:4]
    types = torch.tensor([LABELS.index(records()[line_of(e.source)]["type"]) for e in rows])
    assert sorted(set(types.tolist())) == [0, 1]
    batch = data.collate(rows)
    model.train()
    seen = {}
    for name, layer in moe_layers(model).items():
        layer.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, m.last_routing[0].detach()))
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    got = method.aux_loss(model, cfg.peft, batch)

    real = batch["attention_mask"].bool()
    n_experts, groups, delta = 4, [0, 0, 1, 1], 0.25  # expert n's group
    terms = []
    for probs in seen.values():  # [B, T, N] router probabilities of this layer
        k = int(real.sum())
        z = torch.zeros(n_experts, 2, dtype=torch.float64)
        for n in range(n_experts):
            for m in range(2):
                q = sum(float(probs[b, t, n]) for b in range(len(rows)) for t in range(probs.shape[1])
                        if real[b, t] and types[b] == m) / k
                z[n, m] = (1 + delta if groups[n] == m else 1 - delta) * q
        terms.append(z.var(unbiased=False) / z.mean())
    want = torch.stack(terms).mean()
    assert len(terms) == 2 * 3  # two layers, three FFN linears each
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)

    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    without = method.aux_loss(model, cfg.peft, {k: v for k, v in batch.items() if k != "sample_type"})
    assert abs(float(without) - float(got)) > 1e-4  # all of type sample_type = 0 is another constraint


def test_a_typed_run_trains_through_the_loop(tmp_path):
    from peftlab.train.loop import train

    cfg = config(tmp_path, records(), "peft.type_field=type", "peft.type_labels=[world,task]", "train.steps=2",
                 "train.lr=1e-2", "data.eval_split=2")
    result = train(cfg)
    assert result.steps == 2 and all(m["aux_loss"] > 0 and "moe_router_entropy" in m for m in result.metrics)
