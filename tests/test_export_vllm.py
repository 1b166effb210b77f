"""vLLM's LoRA loading rules, applied by peftlab.export.vllm.check_vllm_compatible."""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peftlab.export.vllm import VLLM_DEFAULT_MAX_LORA_RANK, check_vllm_compatible, main, parse_lora_name
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
    """vLLM 0.34's Llama takes LoRA on lm_head (its embedding_modules); its Mistral class does not."""
    adapter = make_adapter(bases["llama"], tmp_path / "a", r=4, targets=["q_proj", "lm_head"])
    assert check_vllm_compatible(adapter).ok, check_vllm_compatible(adapter).format()
    report = check_vllm_compatible(adapter, model_type="mistral")
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


# ---------------------------------------------------------------------------- vLLM's own loader code

VLLM_VERSION = "0.34.0"
# vLLM's LoRA loader is pure Python, but vLLM itself is a CUDA build with a large dependency tree:
# the test reads the four files it executes straight out of the PyPI wheel (downloaded once with
# ``pip download --no-deps`` by the test itself, ~240 MB, kept in PEFTLAB_TEST_WHEELS or
# ~/.cache/peftlab/wheels; a skip says so if PyPI cannot be reached), each checked against the hash the wheel's own RECORD lists. Nothing of vLLM is committed.
WHEELS = Path(os.environ.get("PEFTLAB_TEST_WHEELS", Path.home() / ".cache" / "peftlab" / "wheels"))
VLLM_RECORD = {  # sha256 of each file in the vllm-0.34.0 wheel's RECORD (urlsafe base64)
    "peft_helper": "dTTGYCrktvmsZQrDl7GDjTTRxM9HA41wd6WZW9Brz2k",
    "lora_model": "UzSybHLAlTIh9qyySV7K3X4EKuwpogwHDXAz-9h1tx0",
    "lora_weights": "aiCryszYE11J4RknBYAgwP8TKjpAGvqaaAiotKaowK8",
    "utils": "wTpTTO5kl7kQ6kuT1sj6vbazmJqUTcjpLrZNhnJyJnw",
}
# LlamaForCausalLM (vllm/model_executor/models/llama.py): its linear layers are qkv_proj, o_proj,
# gate_up_proj, down_proj; packed_modules_mapping expands the packed ones; embedding_modules adds
# embed_tokens and lm_head. worker_manager._load_adapter turns that into the expected module set.
VLLM_LLAMA_SUPPORTED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"]
VLLM_LLAMA_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _vllm_wheel() -> Path:
    found = sorted(WHEELS.glob(f"vllm-{VLLM_VERSION}-*.whl"))
    if not found:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"vllm=={VLLM_VERSION}",
                            "-d", str(WHEELS)], capture_output=True, text=True)
        found = sorted(WHEELS.glob(f"vllm-{VLLM_VERSION}-*.whl"))
        if not found:
            pytest.skip(f"vllm=={VLLM_VERSION}'s wheel is not in {WHEELS} and pip could not download it "
                        f"({r.stderr.strip()[-300:]}); run: pip download --no-deps vllm=={VLLM_VERSION} -d {WHEELS}")
    return found[-1]


def _vllm_source(name: str) -> str:
    """``vllm/lora/<name>.py`` from the wheel, checked against the hash in the wheel's RECORD."""
    with zipfile.ZipFile(_vllm_wheel()) as wheel:
        raw = wheel.read(f"vllm/lora/{name}.py")
    assert base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).rstrip(b"=").decode() == VLLM_RECORD[name], (
        f"vllm/lora/{name}.py is not the file the vllm-{VLLM_VERSION} wheel ships")
    return raw.decode()


@pytest.fixture(scope="module")
def vllm():
    """vLLM 0.34.0's LoRA loading code, executed from the wheel's own files, with stand-ins for the
    modules that need vLLM's GPU build (a logger, LoRAConfig's one field read here, WeightsMapper)."""
    import logging

    logger = logging.getLogger("vllm-stand-in")
    logger.info_once = logger.warning_once = lambda *a, **k: None
    lora_config = types.SimpleNamespace(LoRAConfig=lambda max_lora_rank: types.SimpleNamespace(max_lora_rank=max_lora_rank))
    stubs = {
        "vllm": types.ModuleType("vllm"), "vllm.lora": types.ModuleType("vllm.lora"),
        "vllm.config": types.ModuleType("vllm.config"), "vllm.config.lora": lora_config,
        "vllm.logger": types.SimpleNamespace(init_logger=lambda name: logger),
        "vllm.utils": types.ModuleType("vllm.utils"),
        "vllm.utils.torch_utils": types.SimpleNamespace(PIN_MEMORY=False),
        "vllm.model_executor": types.ModuleType("vllm.model_executor"),
        "vllm.model_executor.models": types.ModuleType("vllm.model_executor.models"),
        "vllm.model_executor.models.utils": types.SimpleNamespace(WeightsMapper=type("WeightsMapper", (), {})),
    }
    # utils.py imports the whole GPU stack at its top: only these definitions of it are executed
    utils = types.ModuleType("vllm.lora.utils")
    tree = ast.parse(_vllm_source("utils"))
    keep = {"parse_fine_tuned_lora_name", "is_base_embedding_weights", "get_lora_id", "_GLOBAL_LORA_ID"}
    tree.body = [n for n in tree.body
                 if (isinstance(n, ast.FunctionDef) and n.name in keep)
                 or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in keep for t in n.targets))]
    assert len(tree.body) == len(keep), "vLLM's utils.py no longer defines what the test executes"
    exec(compile(tree, "vllm/lora/utils.py", "exec"), utils.__dict__)
    stubs["vllm.lora.utils"] = utils
    saved = {k: sys.modules.get(k) for k in [*stubs, "vllm.lora.peft_helper", "vllm.lora.lora_weights",
                                              "vllm.lora.lora_model"]}
    loaded = {}
    try:
        sys.modules.update(stubs)
        for name in ("peft_helper", "lora_weights", "lora_model"):
            module = types.ModuleType(f"vllm.lora.{name}")
            sys.modules[module.__name__] = module
            exec(compile(_vllm_source(name), f"vllm/lora/{name}.py", "exec"), module.__dict__)
            loaded[name] = module
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    expected = set()
    for module in VLLM_LLAMA_SUPPORTED:  # as worker_manager._load_adapter builds it
        expected.update(VLLM_LLAMA_PACKED.get(module, [module]))

    def load(adapter_dir: Path, vocab: int, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK) -> str | None:
        """None when vLLM 0.34.0's loader takes the adapter, else its error message."""
        try:
            helper = loaded["peft_helper"].PEFTHelper.from_local_dir(str(adapter_dir), None)
            helper.validate_legal(lora_config.LoRAConfig(max_lora_rank=max_lora_rank))
            lora = loaded["lora_model"].LoRAModel.from_local_checkpoint(
                str(adapter_dir), expected, helper, lora_model_id=1, device="cpu", dtype=torch.float32,
                model_vocab_size=vocab)
        except (ValueError, RuntimeError, OSError) as e:
            return str(e)
        assert lora.loras and all(w.lora_a is not None and w.lora_b is not None for w in lora.loras.values())
        return None

    return load


def _edit_config(adapter: Path, **changes) -> Path:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return adapter


def _peftlab_adapter(base, out, **peft):
    from conftest import randomize
    from peftlab import apply_method, registry
    from peftlab.config import build_dataclass
    from peftlab.export.adapter import save_adapter
    from shipkit import load_base

    model, _ = load_base(base)
    cfg = build_dataclass(registry.get(peft.get("method", "lora")).config_cls, {"method": "lora", **peft}, "peft")
    torch.manual_seed(0)
    apply_method(model, cfg)
    randomize(model, names=("lora_B", "lora_embedding_B"), std=0.2, seed=1)
    save_adapter(model, cfg, out, base_model_name=str(base))
    return out


def vllm_cases(base: Path, root: Path) -> dict[str, Path]:
    """Adapters peftlab and PEFT write, and hand-edited ones that probe each of vLLM's rules."""
    def lora(name, **kw):
        return _peftlab_adapter(base, root / name, **{"r": 4, "targets": "all-linear", **kw})

    def peft_made(name, **kw):
        return _peft_adapter(base, root / name, **{"r": 4, "target_modules": ["q_proj", "down_proj"], **kw})

    cases = {
        "peftlab_lora": lora("peftlab_lora"),
        "peftlab_rslora": lora("peftlab_rslora", use_rslora=True),
        "peftlab_pissa": lora("peftlab_pissa", init="pissa"),  # saved as a plain rank-2r delta
        "peftlab_olora": lora("peftlab_olora", init="olora"),
        "peftlab_gaussian": lora("peftlab_gaussian", init="gaussian"),
        "peftlab_r16": lora("peftlab_r16", r=16),
        "peftlab_r32": lora("peftlab_r32", r=32),
        "peftlab_embed_and_head": lora("peftlab_embed_and_head", targets=["q_proj", "embed_tokens", "lm_head"]),
        "peftlab_dora": lora("peftlab_dora", method="dora"),
        "peft_plain": peft_made("peft_plain"),
        "peft_dora": peft_made("peft_dora", use_dora=True),
        "peft_modules_to_save": peft_made("peft_modules_to_save", modules_to_save=["lm_head"]),
        "peft_bias_lora_only": peft_made("peft_bias_lora_only", bias="lora_only"),
        "peft_lora_bias": peft_made("peft_lora_bias", lora_bias=True),
        "peft_pissa_unconverted": peft_made("peft_pissa_unconverted", init_lora_weights="pissa"),
    }
    for name, changes in {
        "rank_pattern_over_max": {"rank_pattern": {"q_proj": 32}},
        "rank_pattern_within": {"rank_pattern": {"q_proj": 8}},
        "alpha_pattern": {"alpha_pattern": {"q_proj": 32}},
        "unknown_key": {"my_custom_key": 1},
        "no_target_modules": {"target_modules": None},
        "no_r": {"r": None},
        "r_zero": {"r": 0},
        "layer_replication": {"layer_replication": [[0, 2]]},
        "init_olora_string": {"init_lora_weights": "olora"},
        "init_gaussian_string": {"init_lora_weights": "gaussian"},
    }.items():
        shutil.copytree(cases["peftlab_lora"], root / name)
        cases[name] = _edit_config(root / name, **changes)
    renamed = shutil.copytree(cases["peftlab_lora"], root / "tensor_names")
    weights = load_file(str(renamed / "adapter_model.safetensors"))
    save_file({k.replace("lora_A.weight", "lora_A.default.weight"): v for k, v in weights.items()},
              str(renamed / "adapter_model.safetensors"))
    cases["tensor_names"] = renamed
    foreign = shutil.copytree(cases["peftlab_lora"], root / "foreign_module")
    save_file({k.replace("self_attn.q_proj", "self_attn.x_proj"): v for k, v in weights.items()},
              str(foreign / "adapter_model.safetensors"))
    cases["foreign_module"] = foreign
    missing = shutil.copytree(cases["peftlab_lora"], root / "no_weights")
    (missing / "adapter_model.safetensors").unlink()
    cases["no_weights"] = missing
    return cases


def test_vllm_own_loader_agrees_with_check_vllm_compatible(bases, vllm, tmp_path):
    """Every adapter: check_vllm_compatible says ok exactly when vLLM 0.34.0's own loader code
    (PEFTHelper.validate_legal + LoRAModel.from_local_checkpoint) takes it."""
    vocab = json.loads((bases["llama"] / "config.json").read_text())["vocab_size"]
    disagree, verdicts = [], {}
    for name, adapter in vllm_cases(bases["llama"], tmp_path).items():
        theirs = vllm(adapter, vocab)
        ours = check_vllm_compatible(adapter, model_type="llama")
        verdicts[name] = theirs is None
        if ours.ok != (theirs is None):
            disagree.append(f"{name}: vLLM {'loads it' if theirs is None else 'refuses: ' + theirs}; "
                            f"peftlab says {ours.format()}")
    assert not disagree, "\n".join(disagree)
    # the oracle is not vacuous: it takes what peftlab writes and refuses what it must
    assert verdicts["peftlab_lora"] and verdicts["peftlab_pissa"] and verdicts["peft_plain"]
    assert not verdicts["peftlab_dora"] and not verdicts["peftlab_r32"] and not verdicts["foreign_module"]
