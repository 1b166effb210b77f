"""LoRA-drop resumes exactly on both sides of its pruning step, and what it saves loads everywhere.

The kept layers come from step W's activations, which no checkpoint can replay; every checkpoint
records them (``Method.run_fields``), so a run killed by SIGKILL after pruning and resumed equals
the uninterrupted run bit for bit (adapter, metrics.jsonl, the kept layers and importance saved
with the adapter). The adapter then loads for eval/generate (``load_adapter``: the same pruned
structure, the trained model's logits) and for the multi-adapter server (each module on the shared
pair served as a LoRA with that pair's factors: the same logits).
"""

from __future__ import annotations

import json
import signal

import pytest
import torch

from conftest import tiny_overrides
from peftlab.configure import load_config
from peftlab.errors import ConfigError
from peftlab.train.loop import train
from test_method_hooks_in_the_loop import RECORDS
from test_resume import adapter, metrics, run_killed

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, WARMUP = 7, 3


def args(tmp_path, out: str, save_every: int) -> list[str]:
    data = tmp_path / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return [*tiny_overrides("llama"), "model.seed=0", f"data.path={data}", "data.eval_split=4",
            "data.max_length=64", "train.batch_size=2", "train.progress=false", "train.schedule=constant",
            "train.warmup=0", "train.eval_every=0", f"train.steps={STEPS}", "train.lr=1e-2",
            f"train.save_every={save_every}", "train.threads=1", "train.mixed_precision=no",
            f"train.output_dir={tmp_path / out}", "peft.method=lora_drop", "peft.r=2", "peft.dropout=0.1",
            f"peft.warmup_steps={WARMUP}", "peft.threshold=0.5"]


@pytest.mark.parametrize("save_every,kill_after,resumed_from", [(2, 5, 4), (3, 4, 3)],
                         ids=["after-pruning", "at-pruning"])
def test_killed_after_pruning_resumes_bit_identical(tmp_path, capfd, save_every, kill_after, resumed_from):
    straight = train(load_config(None, args(tmp_path, "a", save_every)))
    kept = straight.model.peftlab_lora_drop is not None and json.loads(
        (straight.artifact / "adapter_config.json").read_text())["keep_layers"]
    assert kept and len(kept) < 2  # pruned: one of the tiny model's two layers keeps its own LoRA
    assert run_killed(tmp_path, args(tmp_path, "b", save_every), "after_step", kill_after) == -signal.SIGKILL
    capfd.readouterr()
    train(load_config(None, args(tmp_path, "b", save_every)), resume=True)
    assert f"resumed from {tmp_path / 'b' / 'checkpoints' / f'step-{resumed_from:06d}'}" in capfd.readouterr().err
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    assert a.keys() == b.keys() and any("peftlab_lora_drop" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert metrics(tmp_path / "b") == metrics(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "b" / "adapter" / "adapter_config.json").read_text())
    record = [json.loads((tmp_path / d / "adapter" / "peftlab.json").read_text())["method"] for d in "ab"]
    assert record[0] == record[1] and record[0]["keep_layers"] == kept and len(record[0]["importance"]) == 2
    # config.yaml is the config as given, in both runs (the kept layers live in checkpoints and the adapter)
    assert (tmp_path / "a" / "config.yaml").read_text().replace("/a", "/b") == (tmp_path / "b" / "config.yaml").read_text()
    newest = sorted((tmp_path / "b" / "checkpoints").glob("step-*"))[-1]
    assert json.loads((newest / "trainer_state.json").read_text())["run_fields"]["keep_layers"] == kept


def test_saved_adapter_loads_with_its_structure_and_serves_as_lora(tmp_path):
    from conftest import batch_of
    from peftlab.export.adapter import load_adapter
    from peftlab.methods.lora_drop import SharedLoRALinear
    from peftlab.methods.lowrank import LoRALinear
    from peftlab.model.load import load_model
    from peftlab.serve.multi_lora import MultiLoRAModel

    cfg = load_config(None, args(tmp_path, "run", 2))
    result = train(cfg)
    kept = json.loads((result.artifact / "adapter_config.json").read_text())["keep_layers"]
    batch = batch_of(0, high=500)

    def logits(model):
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    fresh, _ = load_model(cfg.model, seed=0, with_tokenizer=False)
    loaded = load_adapter(fresh, result.artifact)
    assert loaded.keep_layers == kept
    own = {int(n.split(".layers.")[1].split(".")[0]) for n, m in fresh.named_modules() if isinstance(m, LoRALinear)}
    shared = {int(n.split(".layers.")[1].split(".")[0]) for n, m in fresh.named_modules()
              if isinstance(m, SharedLoRALinear)}
    assert own == set(kept) and shared == {0, 1} - set(kept)
    fresh.eval()
    want = logits(result.model.eval())
    assert torch.equal(logits(fresh), want)

    base, _ = load_model(cfg.model, seed=0, with_tokenizer=False)
    base_logits = logits(base)
    served = MultiLoRAModel(base)
    served.load("drop", result.artifact)
    served.set_active("drop")
    got = logits(served)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_serving_an_adapter_without_its_shared_modules_is_refused(tmp_path):
    from peftlab.methods.lora_drop import as_lora_tensors

    with pytest.raises(ConfigError, match="does not list its shared_modules"):
        as_lora_tensors({"peft_type": "LORA_DROP"}, {}, "old-adapter")
