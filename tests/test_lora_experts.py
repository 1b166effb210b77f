"""LoRA on fused mixture-of-experts tensors (``peft.target_parameters``) against Hugging Face PEFT.

A tiny Mixtral built from its config (4 experts, top-2, experts stored as 3-D ``gate_up_proj`` and
``down_proj``): equal logits both ways with PEFT's ``target_parameters``, identity at init, the
trainable count from the formula, merge == unmerged, and it learns.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import randomize, train_steps
from peftlab import registry
from peftlab.config import ModelConfig, build_dataclass
from peftlab.errors import ConfigError
from peftlab.export.adapter import load_adapter, save_adapter
from peftlab.methods import lora_experts
from peftlab.model.load import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

MIXTRAL = {"vocab": 128, "hidden": 32, "intermediate": 48, "layers": 2, "heads": 4, "kv_heads": 2,
           "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64,
           "initializer_range": 0.2}
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
IDS = torch.tensor([[5, 17, 30, 42, 7, 99, 12, 64, 3, 100, 77, 8]])


def mixtral(seed: int = 0):
    model, _ = load_model(ModelConfig(name="config:mixtral", config_overrides=MIXTRAL), seed=seed,
                          with_tokenizer=False)
    return model.eval()


def ours(model, **extra):
    method = registry.get("lora")
    cfg = build_dataclass(method.config_cls, {"method": "lora", "r": 2, "alpha": 4, "targets": ["q_proj"],
                                              "target_parameters": TARGETS, **extra}, "peft")
    torch.manual_seed(0)
    method.apply(model, cfg)
    return cfg


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


def test_identity_at_init_count_and_merge():
    base = logits(mixtral())
    model = mixtral()
    ours(model)
    torch.testing.assert_close(logits(model), base, atol=0, rtol=0)  # B = 0: the very same model
    c = model.config
    experts = c.num_local_experts * 2 * ((c.hidden_size + 2 * c.intermediate_size) + (c.intermediate_size + c.hidden_size))
    q = 2 * (c.hidden_size + c.hidden_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == c.num_hidden_layers * (experts + q) == lora_experts.trainable_count(model) + \
        c.num_hidden_layers * q
    randomize(model, names=("lora_B",), std=0.3)
    adapted = logits(model)
    assert (adapted - base).abs().max() > 1e-2
    registry.get("lora").merge(model)
    assert not any(isinstance(m, lora_experts.ParamLoRA) for m in model.modules())
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)


def test_equal_logits_with_peft_both_ways(tmp_path):
    # peftlab -> PEFT
    model = mixtral()
    cfg = ours(model)
    randomize(model, names=("lora_B",), std=0.3)
    save_adapter(model, cfg, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(mixtral(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(peft_model), logits(model), atol=1e-5, rtol=0)
    # PEFT -> peftlab: PEFT's own init and layout, its B moved off zero
    torch.manual_seed(3)
    theirs = get_peft_model(mixtral(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                  target_parameters=TARGETS))
    randomize(theirs, names=("lora_B",), std=0.3, seed=4)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = mixtral()
    load_adapter(loaded, tmp_path / "peft")
    theirs.eval()
    torch.testing.assert_close(logits(loaded), logits(theirs), atol=1e-5, rtol=0)
    assert (logits(loaded) - logits(mixtral())).abs().max() > 1e-2


def test_learns_and_gradients_reach_every_expert_factor():
    model = mixtral()
    cfg = ours(model)
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS.clone()}
    losses = train_steps(model, cfg, batch, steps=12, lr=1e-2)
    assert losses[-1] < 0.8 * losses[0]
    moved = [m for m in model.modules() if isinstance(m, lora_experts.ParamLoRA)]
    assert moved and all(m.lora_B.weight.abs().sum() > 0 for m in moved)


def test_refusals_say_what_works():
    with pytest.raises(ConfigError, match="matched no parameter"):
        ours(mixtral(), target_parameters=["mlp.experts.nope"])
    with pytest.raises(ConfigError, match="dropout 0"):
        ours(mixtral(), dropout=0.1)
