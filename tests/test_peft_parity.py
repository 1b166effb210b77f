"""The LoRA family against Hugging Face PEFT 0.21 (the oracle), on tiny GPT-2 and Llama models.

For each method both libraries have, with the same base weights on both sides:
  - peftlab -> PEFT: peftlab's adapter file loads in ``PeftModel.from_pretrained`` and PEFT's
    logits equal peftlab's (so the forward math and the file layout agree);
  - PEFT -> peftlab: an adapter PEFT trained-and-saved (random weights) loads with
    ``peftlab.export.adapter.load_adapter`` and peftlab's logits equal PEFT's.
PiSSA: the factors and residual base after init equal PEFT's; the adapter saved as a delta
against the original W gives PEFT, on the untouched base, the logits of peftlab's PiSSA model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, VeraConfig, get_peft_model

from conftest import randomize, tiny_model
from peftlab import registry
from peftlab.config import build_dataclass
from peftlab.export.adapter import load_adapter, save_adapter

ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_E",
                   "vera_lambda_b", "vera_lambda_d", "modules_to_save")
EMB = {"gpt2": "wte", "llama": "embed_tokens"}
FUSED = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": ["q_proj", "v_proj"]}


pytestmark = pytest.mark.usefixtures("one_thread")


def base_model(arch: str):
    """A tiny model whose biases are not zero (GPT-2 initialises them to zero; a trained model's are
    not, and DoRA's treatment of the bias must be tested)."""
    model, _ = tiny_model(arch)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def peftlab_cfg(raw: dict):
    method = registry.get(raw["method"])
    return method, build_dataclass(method.config_cls, raw, "peft")


# (id, peftlab settings, PEFT config factory(arch)) — the same adapter described twice
CASES = [
    ("lora", lambda a: {"method": "lora", "r": 4, "alpha": 8},
     lambda a: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=a == "gpt2")),
    ("rslora", lambda a: {"method": "lora", "r": 4, "alpha": 8, "use_rslora": True},
     lambda a: LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear", fan_in_fan_out=a == "gpt2")),
    ("dora", lambda a: {"method": "dora", "r": 4, "alpha": 8, "targets": FUSED[a]},
     lambda a: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=FUSED[a], fan_in_fan_out=a == "gpt2")),
    ("vera", lambda a: {"method": "vera", "r": 16, "targets": FUSED[a]},
     lambda a: VeraConfig(r=16, target_modules=FUSED[a], save_projection=False, fan_in_fan_out=a == "gpt2")),
    ("adalora", lambda a: {"method": "adalora", "init_r": 4, "target_r": 2, "alpha": 8, "targets": FUSED[a]},
     lambda a: AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10, target_modules=FUSED[a],
                             fan_in_fan_out=a == "gpt2")),
    ("lora_embeddings", lambda a: {"method": "lora", "r": 4, "alpha": 8, "targets": [*FUSED[a], EMB[a]]},
     lambda a: LoraConfig(r=4, lora_alpha=8, target_modules=[*FUSED[a], EMB[a]], fan_in_fan_out=a == "gpt2")),
    ("lora_extra_modules", lambda a: {"method": "lora", "r": 4, "alpha": 8, "targets": FUSED[a],
                                      "additional_targets": ["lm_head"]},
     lambda a: LoraConfig(r=4, lora_alpha=8, target_modules=FUSED[a], modules_to_save=["lm_head"],
                          fan_in_fan_out=a == "gpt2")),
]
PARAMS = [pytest.param(c, a, id=f"{c[0]}-{a}") for c in CASES for a in ("gpt2", "llama")]


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=rel * max(1.0, b.abs().max().item()), rtol=0)


@pytest.mark.parametrize("case,arch", PARAMS)
def test_peftlab_adapter_loads_in_peft_with_equal_logits(case, arch, ids, tmp_path):
    _, ours, theirs = case
    base = base_model(arch)
    twin = copy.deepcopy(base)
    method, cfg = peftlab_cfg(ours(arch))
    method.apply(base, cfg)
    randomize(base, names=ADAPTER_TENSORS, std=0.1, seed=3)
    want = logits(base, ids)
    save_adapter(base, cfg, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(twin, tmp_path / "a")
    close(logits(peft_model, ids), want)


@pytest.mark.parametrize("case,arch", PARAMS)
def test_peft_adapter_loads_in_peftlab_with_equal_logits(case, arch, ids, tmp_path):
    _, _, theirs = case
    base = base_model(arch)
    twin = copy.deepcopy(base)
    peft_model = get_peft_model(twin, theirs(arch))
    randomize(peft_model, names=ADAPTER_TENSORS, std=0.1, seed=4)
    want = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "p")
    load_adapter(base, tmp_path / "p")
    close(logits(base, ids), want)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_pissa_init_equals_peft_and_saves_as_delta_on_original_base(arch, ids, tmp_path):
    base, _ = tiny_model(arch)
    original = copy.deepcopy(base)
    twin = copy.deepcopy(base)
    method, cfg = peftlab_cfg({"method": "lora", "r": 4, "alpha": 8, "init": "pissa"})
    method.apply(base, cfg)
    peft_model = get_peft_model(twin, LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                 target_modules="all-linear", fan_in_fan_out=arch == "gpt2"))
    ours = dict(base.named_parameters())
    compared = 0
    for name, p in peft_model.named_parameters():
        if name.startswith("base_model.model."):
            key = name[len("base_model.model."):].replace(".default", "")
            torch.testing.assert_close(ours[key], p, atol=1e-5, rtol=1e-4)
            compared += "lora_" in key
    assert compared == 2 * sum(1 for n in ours if n.endswith("lora_A.weight"))
    # "train" (perturb the factors), then save: the file is a rank-2r delta against the original W
    randomize(base, names=("lora_A", "lora_B"), std=0.05, seed=5)
    want = logits(base, ids)
    save_adapter(base, cfg, tmp_path / "pissa")
    restored = PeftModel.from_pretrained(original, tmp_path / "pissa")
    close(logits(restored, ids), want, rel=2e-4)
    fresh, _ = tiny_model(arch)
    load_adapter(fresh, tmp_path / "pissa")
    close(logits(fresh, ids), want, rel=2e-4)


def test_peft_pissa_conversion_loads_in_peftlab(ids, tmp_path):
    """PEFT's own PiSSA -> LoRA conversion (path_initial_model_for_weight_conversion) loads in peftlab."""
    base, _ = tiny_model("llama")
    twin = copy.deepcopy(base)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(twin, config)
    peft_model.save_pretrained(tmp_path / "init")  # the initial factors, for the conversion
    randomize(peft_model, names=("lora_A", "lora_B"), std=0.05, seed=6)
    want = logits(peft_model, ids)
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "init")
    load_adapter(base, tmp_path / "converted")
    close(logits(base, ids), want, rel=2e-4)
