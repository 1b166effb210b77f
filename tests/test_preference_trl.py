"""Every preference loss equals TRL 1.16's on the same model and batch (TRL: the test oracle).

One batch, built by peftlab's own data path (prompt rendered once, [chosen; rejected] rows), is
handed to TRL's trainers in their input layout; the loss comes from TRL's own code:

    DPO sigmoid / robust / IPO   DPOTrainer._compute_loss (policy + separate reference model)
    sequence log-probs           the fused LM head TRL patches onto the model (``log_probs``)
    SimPO                        CPOTrainer.get_batch_loss_metrics (loss_type=simpo, cpo_alpha=0)
    ORPO                         ORPOTrainer.get_batch_loss_metrics
    KTO                          KTOTrainer._compute_loss (with its KL rows)

Two losses have no TRL function to call in isolation and are checked against their formula:
conservative DPO (sigmoid with label smoothing: TRL 1.16's ``sigmoid`` ignores
``label_smoothing``) and the Bradley-Terry reward model (TRL's RewardTrainer needs a
sequence-classification model; the formula is its loss line).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from peftlab.config import DataConfig, PreferenceConfig
from peftlab.data.dataset import build_datasets
from peftlab.data.preference import unpair, with_kl_rows
from peftlab.data.tokenize import IGNORE
from peftlab.train import preference as P
from peftlab.train.reference import Reference
from peftlab.train.seq_logps import row_logps

pytestmark = pytest.mark.usefixtures("one_thread")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

RECORDS = [
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "5"},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A car, probably."},
    {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "No."},
]
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(policy, reference, tokenizer, pair examples): the policy is the reference, perturbed."""
    ref, tok = tiny_model("llama", initializer_range=0.02)
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(RECORDS))
    data = build_datasets(DataConfig(path=str(path), eval_split=0, template="chatml", max_length=64), tok, 0)
    return policy, ref, tok, data


def fresh(setup):
    policy, ref, tok, data = setup
    return copy.deepcopy(policy), copy.deepcopy(ref), tok, data


def trl_args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, fp16=False,
               per_device_train_batch_size=2, **kw)


def pair_dataset():
    return datasets.Dataset.from_list(RECORDS)


def completion_inputs(batch: dict) -> dict:
    """peftlab's pair batch in DPOTrainer's layout (same rows, completion_mask = our labels)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "completion_mask": (batch["labels"] != IGNORE).long()}


def split_inputs(batch: dict) -> dict:
    """peftlab's pair batch in CPO/ORPO's layout (chosen_* and rejected_* halves)."""
    b = batch["input_ids"].shape[0] // 2
    out = {}
    for side, rows in (("chosen", slice(0, b)), ("rejected", slice(b, 2 * b))):
        out[f"{side}_input_ids"] = batch["input_ids"][rows]
        out[f"{side}_attention_mask"] = batch["attention_mask"][rows]
        out[f"{side}_labels"] = batch["labels"][rows]
    return out


def test_sequence_log_probs_equal_trl(setup, tmp_path):
    policy, ref, tok, data = fresh(setup)
    tr = trl.DPOTrainer(model=policy, ref_model=ref, args=trl_args(trl.DPOConfig, tmp_path), train_dataset=pair_dataset(),
                        processing_class=tok)
    batch = data.collate(data.train)
    labels = batch["input_ids"].masked_fill(batch["labels"] == IGNORE, IGNORE)
    want = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    fused_lm_head=True).log_probs.sum(1)
    fused, counts = row_logps(policy, batch)  # with gradients: the fused head, row by row
    with torch.no_grad():
        plain, _ = row_logps(policy, batch, fused=False)
    torch.testing.assert_close(fused.detach(), want.detach(), **TOL)
    torch.testing.assert_close(plain, want.detach(), **TOL)
    assert counts.tolist() == (batch["labels"][:, 1:] != IGNORE).sum(1).tolist()
    assert (want < -1).all()  # real log-probabilities of several tokens, not a degenerate 0


@pytest.mark.parametrize("variant, smoothing", [("sigmoid", 0.0), ("robust", 0.2), ("ipo", 0.0)])
def test_dpo_losses_equal_trl(setup, tmp_path, variant, smoothing):
    policy, ref, tok, data = fresh(setup)
    args = trl_args(trl.DPOConfig, tmp_path, beta=0.3, loss_type=[variant], label_smoothing=smoothing)
    tr = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=pair_dataset(), processing_class=tok)
    batch = data.collate(data.train)
    want = tr._compute_loss(tr.model, completion_inputs(batch), False)
    objective = P.DPO(PreferenceConfig(loss=variant, beta=0.3, label_smoothing=smoothing), Reference("frozen_copy", ref))
    got = objective.loss(policy, batch) / objective.units(batch)
    torch.testing.assert_close(got, want, **TOL)
    stats = objective.pop_stats()
    assert stats["accuracy"][1] == len(RECORDS) and 0.0 < abs(want.item()) < 10


def test_conservative_dpo_is_the_smoothed_sigmoid_formula(setup):
    policy, ref, _, data = fresh(setup)
    batch = data.collate(data.train)
    beta, eps = 0.3, 0.1
    objective = P.DPO(PreferenceConfig(loss="sigmoid", beta=beta, label_smoothing=eps), Reference("frozen_copy", ref))
    got = objective.loss(policy, batch)
    with torch.no_grad():
        pc, pr = row_logps(policy, batch, fused=False)[0].chunk(2)
        rc, rr = row_logps(ref, batch, fused=False)[0].chunk(2)
    h = beta * ((pc - rc) - (pr - rr))
    want = (-(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)).sum()
    torch.testing.assert_close(got.detach(), want, **TOL)


def test_simpo_equals_trl_cpo_simpo(setup, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy, _, tok, data = fresh(setup)
    args = trl_args(CPOConfig, tmp_path, loss_type="simpo", cpo_alpha=0.0, beta=2.0,
                    simpo_gamma=0.7, label_smoothing=0.1, max_length=64)
    tr = CPOTrainer(model=policy, args=args, train_dataset=pair_dataset(), processing_class=tok)
    batch = data.collate(data.train)
    want, _ = tr.get_batch_loss_metrics(tr.model, split_inputs(batch))
    objective = P.SimPO(PreferenceConfig(beta=2.0, simpo_gamma=0.7, label_smoothing=0.1))
    got = objective.loss(policy, batch) / objective.units(batch)
    torch.testing.assert_close(got, want, **TOL)


def test_orpo_equals_trl(setup, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy, _, tok, data = fresh(setup)
    args = trl_args(ORPOConfig, tmp_path, beta=0.25, max_length=64)
    tr = ORPOTrainer(model=policy, args=args, train_dataset=pair_dataset(), processing_class=tok)
    batch = data.collate(data.train)
    want, metrics = tr.get_batch_loss_metrics(tr.model, split_inputs(batch))
    objective = P.ORPO(PreferenceConfig(orpo_lambda=0.25))
    got = objective.loss(policy, batch) / objective.units(batch)
    torch.testing.assert_close(got, want, **TOL)
    stats = objective.pop_stats()
    assert stats["nll"][0] / stats["nll"][1] == pytest.approx(metrics["nll_loss"], rel=1e-5)


def test_kto_equals_trl(setup, tmp_path):
    policy, ref, tok, data = fresh(setup)
    examples = with_kl_rows(unpair(data.train), 64)
    unpaired = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in RECORDS
                for k in ("chosen", "rejected")]
    args = trl_args(trl.KTOConfig, tmp_path, beta=0.2, desirable_weight=1.0, undesirable_weight=1.5)
    tr = trl.KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(unpaired),
                        processing_class=tok)
    batch = data.collate(examples)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != IGNORE).long(), "KL_input_ids": batch["kl_input_ids"],
              "KL_attention_mask": batch["kl_attention_mask"],
              "KL_completion_mask": (batch["kl_labels"] != IGNORE).long(), "label": batch["kto_label"]}
    want = tr._compute_loss(tr.model, inputs, False)
    objective = P.KTO(PreferenceConfig(beta=0.2, desirable_weight=1.0, undesirable_weight=1.5),
                      Reference("frozen_copy", ref))
    got = objective.loss(policy, batch) / objective.units(batch)
    torch.testing.assert_close(got, want, **TOL)
    assert objective.pop_stats()["kl"][0] >= 0


def test_reward_model_loss_is_bradley_terry(setup):
    policy, _, _, data = fresh(setup)
    batch = data.collate(data.train)
    objective = P.RewardModel(PreferenceConfig(center_rewards=0.01), policy)
    got = objective.loss(policy, batch) / objective.units(batch)
    with torch.no_grad():
        hidden = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True).hidden_states[-1]
    scores = []
    for row in range(batch["input_ids"].shape[0]):
        last = max(i for i, y in enumerate(batch["labels"][row].tolist()) if y != IGNORE)  # the answer's end
        scores.append(policy.reward_head(hidden[row, last]).squeeze())
    sc, sr = torch.stack(scores).chunk(2)
    want = -F.logsigmoid(sc - sr).mean() + 0.01 * torch.mean((sc + sr) ** 2)  # TRL RewardTrainer's loss line
    torch.testing.assert_close(got.detach(), want, **TOL)
    got.backward()
    assert policy.reward_head.weight.grad is not None and policy.reward_head.weight.grad.abs().sum() > 0
