"""Hugging Face PEFT as the oracle: same weights, same logits; adapter files both ways."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize, tiny_model
from peftlab import registry
from peftlab.export.adapter import load_adapter, save_adapter
from peftlab.methods.lora import LoRAConfig

peft = pytest.importorskip("peft")


def _peft_model(base, cfg: LoRAConfig, fan_in_fan_out: bool):
    lc = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=cfg.targets, lora_dropout=0.0,
                         use_rslora=cfg.use_rslora, fan_in_fan_out=fan_in_fan_out)
    return peft.get_peft_model(base, lc)


def _peft_twin(ours, arch, cfg: LoRAConfig, **model_kw):
    """A PEFT model over a fresh copy of the same base, holding exactly our LoRA weights."""
    theirs = _peft_model(tiny_model(arch, **model_kw)[0], cfg, arch == "gpt2")
    peft_state = theirs.state_dict()
    ours_lora = {k: v for k, v in ours.state_dict().items() if ".lora_" in k}
    assert len(ours_lora) == sum(1 for k in peft_state if ".lora_" in k)
    with torch.no_grad():
        for k, v in ours_lora.items():
            pk = "base_model.model." + k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            peft_state[pk].copy_(v)
    return theirs


@pytest.mark.parametrize("rslora", [False, True])
def test_same_weights_same_logits(arch, ids, rslora):
    targets = ["c_attn", "c_proj"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    cfg = LoRAConfig(r=4, alpha=8, targets=targets, use_rslora=rslora)
    ours, _ = tiny_model(arch)
    registry.get("lora").apply(ours, cfg)
    randomize(ours, names=("lora_A", "lora_B"))
    theirs = _peft_twin(ours, arch, cfg)
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)


def test_merged_weights_equal_peft_merge_and_unload(arch):
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "gate_proj"]
    cfg = LoRAConfig(r=4, alpha=8, targets=targets)
    ours, _ = tiny_model(arch, initializer_range=0.02)
    registry.get("lora").apply(ours, cfg)
    randomize(ours)
    theirs = _peft_twin(ours, arch, cfg, initializer_range=0.02).merge_and_unload()
    registry.get("lora").merge(ours)
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert set(mine) == set(ref)
    for k in ref:
        assert torch.allclose(mine[k], ref[k], atol=1e-6), k


def test_peftlab_adapter_loads_in_peft(arch, ids, tmp_path):
    cfg = LoRAConfig(r=4, alpha=16)
    ours, _ = tiny_model(arch)
    registry.get("lora").apply(ours, cfg)
    randomize(ours)
    save_adapter(ours, cfg, tmp_path / "ad", base_model_name="tiny")
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch)[0], str(tmp_path / "ad"))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)


def test_peft_adapter_loads_in_peftlab(arch, ids, tmp_path):
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "k_proj", "o_proj", "up_proj"]
    theirs = _peft_model(tiny_model(arch)[0], LoRAConfig(r=2, alpha=6, targets=targets), arch == "gpt2")
    randomize(theirs)
    theirs.save_pretrained(str(tmp_path / "peft_ad"))
    ours, _ = tiny_model(arch)
    cfg = load_adapter(ours, tmp_path / "peft_ad")
    assert (cfg.r, cfg.alpha) == (2, 6.0)
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)


def test_pickle_adapters_are_refused(tmp_path):
    from peftlab.errors import ConfigError

    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "target_modules": ["c_attn"]}')
    torch.save({"x": torch.zeros(1)}, d / "adapter_model.bin")
    with pytest.raises(ConfigError, match="pickle"):
        load_adapter(tiny_model("gpt2")[0], d)
