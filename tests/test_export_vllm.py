"""vLLM's LoRA loading rules, applied by peftlab.export.vllm.check_vllm_compatible."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from peftlab.export.vllm import check_vllm_compatible, main, parse_lora_name
from shipkit import make_adapter, save_tiny_base


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {arch: save_tiny_base(arch, root / arch) for arch in ("llama", "gpt2")}


def _peft_adapter(base, out, **kw):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **kw)).save_pretrained(out)
    return out


def test_peftlab_lora_passes(bases, tmp_path, capsys):
    adapter = make_adapter(bases["llama"], tmp_path / "a", r=8, targets="all-linear")
    report = check_vllm_compatible(adapter)
    assert report.model_type == "llama"
    assert report.ok and report.problems == [] and report.warnings == [], report.format()
    assert main([str(adapter)]) == 0
    assert "vLLM can load this adapter" in capsys.readouterr().out


def test_rank_limit_and_architecture(bases, tmp_path):
    adapter = make_adapter(bases["llama"], tmp_path / "a", r=32, targets=["q_proj"])
    report = check_vllm_compatible(adapter)
    assert not report.ok and "max_lora_rank 16" in report.problems[0] and "--max-lora-rank 32" in report.problems[0]
    assert check_vllm_compatible(adapter, max_lora_rank=64).ok
    gpt2 = make_adapter(bases["gpt2"], tmp_path / "g", r=4, targets=["c_attn"])
    report = check_vllm_compatible(gpt2)
    assert any("does not support LoRA" in p for p in report.problems)
    assert any("fan_in_fan_out" in w for w in report.warnings)


def test_unsupported_target_module(bases, tmp_path):
    adapter = make_adapter(bases["llama"], tmp_path / "a", r=4, targets=["q_proj", "lm_head"])
    report = check_vllm_compatible(adapter)
    assert len(report.problems) == 1 and "lm_head" in report.problems[0], report.format()


def test_peft_files_vllm_rejects(bases, tmp_path):
    """The layouts PEFT itself writes for features vLLM refuses."""
    dora = _peft_adapter(bases["llama"], tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True)
    problems = check_vllm_compatible(dora).problems
    assert any("DoRA" in p for p in problems)
    assert any("lora_magnitude_vector" in p for p in problems)  # the tensor vLLM cannot parse
    mts = _peft_adapter(bases["llama"], tmp_path / "mts", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    report = check_vllm_compatible(mts)
    assert any("modules_to_save" in p for p in report.problems)
    assert not check_vllm_compatible(mts, allow_modules_to_save=True).problems[0].startswith("modules_to_save")
    bias = _peft_adapter(bases["llama"], tmp_path / "bias", r=4, target_modules=["q_proj"], bias="lora_only")
    assert any("bias='lora_only'" in p for p in check_vllm_compatible(bias).problems)
    plain = _peft_adapter(bases["llama"], tmp_path / "plain", r=4, target_modules=["q_proj", "down_proj"])
    assert check_vllm_compatible(plain).ok, check_vllm_compatible(plain).format()


def test_names_patterns_and_unknown_keys(bases, tmp_path):
    adapter = make_adapter(bases["llama"], tmp_path / "a", r=4, targets=["q_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"q_proj": 8}
    cfg["my_custom_key"] = 1
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    report = check_vllm_compatible(adapter)
    assert report.ok
    assert any("rank_pattern" in w for w in report.warnings) and any("my_custom_key" in w for w in report.warnings)
    # an adapter name inside the tensor names (what a raw state_dict of a PEFT model has) cannot be parsed
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(4, 64)},
              str(adapter / "adapter_model.safetensors"))
    report = check_vllm_compatible(adapter)
    assert any("cannot parse" in p and "lora_A.default.weight" in p for p in report.problems)
    assert parse_lora_name("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight") == "model.layers.0.mlp.up_proj"
    assert parse_lora_name("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector") is None
    (adapter / "adapter_model.safetensors").unlink()
    assert "no adapter_model.safetensors" in check_vllm_compatible(adapter).problems[0]
