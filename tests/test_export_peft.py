"""Adapter files both ways with Hugging Face PEFT (the oracle): equal logits after each round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peftlab.errors import ConfigError
from peftlab.export.adapter import CONFIG_NAME, adapter_method_config, load_adapter, save_adapter
from shipkit import load_base, lora_model, save_tiny_base

IDS = torch.tensor([[3, 141, 59, 26, 535, 89, 79, 323, 84, 62, 643]])

CASES = {  # name: (arch, targets, use_rslora, r, alpha)
    "llama-all-linear": ("llama", "all-linear", False, 4, 8.0),
    "llama-qv-rslora": ("llama", ["q_proj", "v_proj"], True, 8, 4.0),
    "gpt2-conv1d": ("gpt2", ["c_attn", "c_proj", "c_fc"], False, 4, 16.0),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {arch: save_tiny_base(arch, root / arch) for arch in ("llama", "gpt2")}


def _hf(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_peftlab_adapter_loads_in_peft(case, bases, tmp_path):
    arch, targets, rslora, r, alpha = CASES[case]
    model, _, cfg = lora_model(bases[arch], r=r, alpha=alpha, targets=targets, use_rslora=rslora)
    save_adapter(model, cfg, tmp_path / "a", base_model_name=str(bases[arch]))
    written = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    # only keys PEFT's LoraConfig knows (older loaders and vLLM choke on others)
    assert set(written) <= {f.name for f in dataclasses.fields(LoraConfig)}
    peft_model = PeftModel.from_pretrained(_hf(bases[arch]), tmp_path / "a").eval()
    with torch.no_grad():
        ours = model(input_ids=IDS).logits
        theirs = peft_model(input_ids=IDS).logits
        base = _hf(bases[arch])(input_ids=IDS).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_peftlab(case, bases, tmp_path):
    arch, targets, rslora, r, alpha = CASES[case]
    torch.manual_seed(3)
    peft_cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=None if targets == "all-linear" else targets,
                          use_rslora=rslora, init_lora_weights=False, task_type="CAUSAL_LM",
                          fan_in_fan_out=arch == "gpt2")
    if targets == "all-linear":
        peft_cfg.target_modules = "all-linear"
    peft_model = get_peft_model(_hf(bases[arch]), peft_cfg).eval()  # init_lora_weights=False: B random
    peft_model.save_pretrained(tmp_path / "p")
    assert not (tmp_path / "p" / "peftlab.json").exists()
    model, _ = load_base(bases[arch])
    cfg = load_adapter(model, tmp_path / "p")
    assert cfg.r == r and cfg.use_rslora == rslora
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, peft_model(input_ids=IDS).logits, atol=1e-5, rtol=0)


def test_peft_regex_targets_and_rejections(bases, tmp_path):
    torch.manual_seed(4)
    regex = r".*layers\.1\.self_attn\.(q_proj|o_proj)"
    peft_model = get_peft_model(_hf(bases["llama"]), LoraConfig(r=2, target_modules=regex, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "rx")
    model, _ = load_base(bases["llama"])
    load_adapter(model, tmp_path / "rx")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, peft_model.eval()(input_ids=IDS).logits,
                                   atol=1e-5, rtol=0)
    # modules_to_save (a trained copy of the head, tied to the embeddings in the base): loads with
    # PEFT's logits, the copy's changes included
    m2 = get_peft_model(_hf(bases["llama"]), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                        init_lora_weights=False))
    with torch.no_grad():
        for n, p in m2.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.01 * torch.randn_like(p))
    m2.save_pretrained(tmp_path / "mts")
    assert adapter_method_config(tmp_path / "mts").additional_targets
    model, _ = load_base(bases["llama"])
    load_adapter(model, tmp_path / "mts")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, m2.eval()(input_ids=IDS).logits, atol=1e-5, rtol=0)
    # pickled weights are refused with the reason
    (tmp_path / "pk").mkdir()
    (tmp_path / "pk" / "adapter_config.json").write_text("{}")
    (tmp_path / "pk" / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ConfigError, match="pickle"):
        load_adapter(load_base(bases["llama"])[0], tmp_path / "pk")
