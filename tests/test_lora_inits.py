"""LoRA's data-driven and quantisation-aware inits (EVA, CorDA, LoRA-GA, LoftQ) against PEFT 0.21.

EVA, CorDA (both modes) and LoRA-GA: on the same tiny model and the same batches, peftlab's
factors, ranks, alphas and residual base weights equal PEFT's (``initialize_lora_eva_weights``,
``preprocess_corda``, ``preprocess_loraga`` + ``get_peft_model``), and the saved adapter loads in
PEFT on the untouched base with peftlab's logits. LoRA-GA's randomised SVD is seeded the same on
both sides (torch.svd_lowrank is wrapped to reseed before each call). LoftQ needs bitsandbytes and
CUDA in PEFT, so it is checked against its formula (PEFT's loop with peftlab's NF4 quantiser).
The training loop: the init reads batches before the optimiser, LoftQ's base is quantised after
the init, and an exact resume does not redo the init.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from peft import EvaConfig, LoraConfig, PeftModel, get_peft_model, initialize_lora_eva_weights
from peft.tuners.lora.config import CordaConfig, LoraGAConfig  # PEFT's corda.py needs attrs (dev extras)
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.loraga import preprocess_loraga
from peft.utils.loftq_utils import _low_rank_decomposition
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

from conftest import randomize, tiny_model, tiny_overrides
from peftlab import registry
from peftlab.config import build_dataclass
from peftlab.configure import load_config
from peftlab.export.adapter import load_adapter, save_adapter
from peftlab.methods import lora_init
from peftlab.methods.lowrank import LoRALinear
from peftlab.model.load import load_model
from peftlab.quant.layers import QuantLinear
from peftlab.train import setup
from peftlab.train.loop import train
from test_resume import write_data

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def batches(n: int = 3, rows: int = 2, length: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 1000, (rows, length), generator=g)
        labels = ids.clone()
        labels[:, :4] = -100  # a prompt: EVA leaves these positions out
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def ours(arch: str, init: str, **extra):
    """(model, method, cfg, the untouched base): peftlab's LoRA with ``init`` run on ``batches()``."""
    base, _ = tiny_model(arch)
    original = copy.deepcopy(base)
    method = registry.get("lora")
    cfg = build_dataclass(method.config_cls, {"method": "lora", "r": 4, "alpha": 8, "init": init,
                                              "targets": TARGETS[arch], **extra}, "peft")
    torch.manual_seed(0)
    method.apply(base, cfg)
    method.init_from_data(base, cfg, batches(), None)
    return base, method, cfg, original


@pytest.fixture
def seeded_svd(monkeypatch):
    """torch.svd_lowrank reseeded before every call, so PEFT's LoRA-GA draws what peftlab's does."""
    original = torch.svd_lowrank

    def seeded(*args, **kwargs):
        torch.manual_seed(0)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)


def compare_with_peft(model, peft_model, rtol: float = 1e-5) -> int:
    """Every LoRA factor and every adapted base weight equal; returns how many factors were compared."""
    mine = dict(model.named_parameters())
    compared = 0
    for name, p in peft_model.named_parameters():
        if name.startswith("base_model.model.") and ("lora_" in name or "base_layer" in name):
            key = name[len("base_model.model."):].replace(".default", "")
            torch.testing.assert_close(mine[key], p, atol=rtol * max(1.0, p.abs().max().item()), rtol=0, msg=key)
            compared += "lora_" in key
    return compared


@torch.no_grad()
def logits(model, ids):
    model.eval()
    return model(input_ids=ids).logits


def close(a, b, rel=2e-4):
    torch.testing.assert_close(a, b, atol=rel * max(1.0, b.abs().max().item()), rtol=0)


# ---------------------------------------------------------------------------- EVA


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_eva_equals_peft_and_its_adapter_loads_in_peft(arch, ids, tmp_path):
    model, _, cfg, original = ours(arch, "eva", eva_tau=0.9)
    twin = copy.deepcopy(original)
    peft_model = get_peft_model(twin, LoraConfig(r=4, lora_alpha=8, init_lora_weights="eva", target_modules=TARGETS[arch],
                                                 eva_config=EvaConfig(tau=0.9), fan_in_fan_out=arch == "gpt2"))
    initialize_lora_eva_weights(peft_model, dataloader=batches(), show_progress_bar=False)
    layers = lora_init.linear_layers(model)
    theirs = peft_model.peft_config["default"]
    assert {p: m.r for p, m in layers.items() if m.r != 4} == theirs.rank_pattern != {}  # ranks were redistributed
    assert {p: m.alpha for p, m in layers.items() if m.alpha != 8} == theirs.alpha_pattern
    targets = sum(1 for n, _ in original.named_modules() if n.split(".")[-1] in TARGETS[arch])
    assert sum(m.r for m in layers.values()) == 4 * targets  # the whole budget, redistributed
    assert compare_with_peft(model, peft_model) == 2 * len(layers)
    randomize(model, names=("lora_B",), std=0.1, seed=3)  # "train", then save: plain LoRA with PEFT's patterns
    save_adapter(model, cfg, tmp_path / "eva")
    saved = json.loads((tmp_path / "eva" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == theirs.rank_pattern
    close(logits(PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "eva"), ids), logits(model, ids), 1e-5)
    fresh = copy.deepcopy(original)
    load_adapter(fresh, tmp_path / "eva")
    close(logits(fresh, ids), logits(model, ids), 1e-5)
    randomize(peft_model, names=("lora_B",), std=0.1, seed=4)  # PEFT's own EVA file (init_lora_weights="eva")
    peft_model.save_pretrained(tmp_path / "peft_eva")
    theirs_loaded = copy.deepcopy(original)
    load_adapter(theirs_loaded, tmp_path / "peft_eva")
    close(logits(theirs_loaded, ids), logits(peft_model, ids), 1e-5)


# ---------------------------------------------------------------------------- CorDA, LoRA-GA


def peft_corda(arch: str, original, mode: str):
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="corda", target_modules=TARGETS[arch],
                        corda_config=CordaConfig(corda_method=mode), fan_in_fan_out=arch == "gpt2")
    twin = copy.deepcopy(original)

    def run_model():  # PEFT takes one example per forward
        for b in batches():
            for row in b["input_ids"]:
                twin(input_ids=row[None])

    preprocess_corda(twin, config, run_model=run_model)
    return get_peft_model(twin, config)


def peft_lora_ga(arch: str, original):
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="lora_ga", target_modules=TARGETS[arch],
                        lora_ga_config=LoraGAConfig(), fan_in_fan_out=arch == "gpt2")
    twin = copy.deepcopy(original)

    def train_step():
        for b in batches():
            twin(**b).loss.backward()

    preprocess_loraga(twin, config, train_step)
    return get_peft_model(twin, config)


@pytest.mark.parametrize("init,arch", [("corda_ipm", "gpt2"), ("corda_ipm", "llama"), ("corda_kpm", "gpt2"),
                                       ("corda_kpm", "llama"), ("lora_ga", "llama")])
def test_residual_inits_equal_peft_and_save_as_a_delta_on_the_original_base(init, arch, ids, tmp_path, seeded_svd):
    model, _, cfg, original = ours(arch, init)
    peft_model = peft_corda(arch, original, init[-3:]) if init.startswith("corda") else peft_lora_ga(arch, original)
    assert compare_with_peft(model, peft_model) == 2 * len(lora_init.linear_layers(model))  # A, B and W - s B A
    unmerged = logits(model, ids)
    close(unmerged, logits(original, ids), 1e-4)  # W_res + s B A = W (fp32 rounding): the model starts as the base
    randomize(model, names=("lora_A", "lora_B"), std=0.05, seed=5)  # "train"
    want = logits(model, ids)
    save_adapter(model, cfg, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 8  # [A; A0], [B, -B0]
    close(logits(PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "a"), ids), want)
    fresh = copy.deepcopy(original)
    load_adapter(fresh, tmp_path / "a")
    close(logits(fresh, ids), want)
    merged = copy.deepcopy(model)
    registry.get("lora").merge(merged)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    close(logits(merged, ids), want, 5e-5)  # W_res + s B A rounds once in fp32; both terms are of |W|


def test_lora_ga_on_conv1d_differs_from_peft_only_by_peft_s_fan_in_scale(seeded_svd):
    """PEFT's "stable" scale takes out_features from ``weight.shape[0]``, which for GPT-2's Conv1D
    ([in, out]) is in_features; peftlab uses the true out_features. Nothing else differs."""
    model, _, _, original = ours("gpt2", "lora_ga")
    peft_model = peft_lora_ga("gpt2", original)
    theirs = dict(peft_model.named_parameters())
    for path, layer in lora_init.linear_layers(model).items():
        key = f"base_model.model.{path}.lora_%s.default.weight"
        ratio = (layer.in_features / layer.out_features) ** 0.25
        torch.testing.assert_close(layer.lora_A.weight, theirs[key % "A"], atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.lora_B.weight * ratio, theirs[key % "B"], atol=1e-5, rtol=1e-4)


def test_lora_ga_and_corda_refuse_a_quantised_base():
    model, _ = tiny_model("llama", )
    from peftlab.quant.convert import quantize_model

    quantize_model(model, "nf4")
    method = registry.get("lora")
    cfg = build_dataclass(method.config_cls, {"method": "lora", "r": 4, "init": "lora_ga"}, "peft")
    method.apply(model, cfg)
    with pytest.raises(Exception, match="float"):
        method.init_from_data(model, cfg, batches(1), None)


# ---------------------------------------------------------------------------- LoftQ


def loftq_formula(w: torch.Tensor, r: int, iters: int):
    """PEFT's loftq_init loop (utils/loftq_utils.py) with its bitsandbytes NF4 swapped for peftlab's
    quantiser and its own ``_low_rank_decomposition`` (scaling 1: PEFT's factors ignore alpha/r)."""
    q = QuantLinear("nf4", w.shape[1], w.shape[0], None)
    res = w.clone()
    for i in range(iters):
        q.quantize_(res)
        deq = q.dequantize(torch.float32)
        out = _low_rank_decomposition(w - deq, reduced_rank=r)
        if i + 1 == iters:
            break
        res = w - out["L"] @ out["R"]
    return deq, out["R"], out["L"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_loftq_equals_its_formula_and_the_error_falls_with_iterations(arch):
    base, _ = tiny_model(arch)
    errors = {}
    for iters in (1, 2, 5):
        model = copy.deepcopy(base)
        cfg = build_dataclass(registry.get("lora").config_cls, {"method": "lora", "r": 8, "alpha": 8, "init": "loftq",
                                                                "loftq_iter": iters, "targets": TARGETS[arch]}, "peft")
        registry.get("lora").apply(model, cfg)
        layers = lora_init.linear_layers(model)
        for path, layer in layers.items():
            w = weight(base, path)
            q, a, b = loftq_formula(w, 8, iters)
            assert isinstance(layer.base_layer, QuantLinear)
            torch.testing.assert_close(layer.base_layer.dequantize(torch.float32), q, atol=1e-6, rtol=0)
            torch.testing.assert_close(layer.scaling * layer.lora_B.weight @ layer.lora_A.weight, b @ a,
                                       atol=1e-4, rtol=0)
        errors[iters] = sum(float(torch.linalg.norm(weight(base, p) - m.base_layer.dequantize(torch.float32)
                                                    - m.scaling * m.lora_B.weight @ m.lora_A.weight)) ** 2
                            for p, m in layers.items()) ** 0.5
    plain = sum(float(torch.linalg.norm(weight(base, p) - QuantLinear.from_float(base.get_submodule(p), "nf4")
                                        .dequantize(torch.float32))) ** 2 for p in layers) ** 0.5
    assert errors[5] < errors[2] < errors[1] < plain  # QLoRA's start (B = 0) has the plain NF4 error


def weight(model, path):
    """A linear layer's float weight [out, in] (GPT-2's Conv1D stores it [in, out])."""
    layer = model.get_submodule(path)
    return (layer.weight.T if isinstance(layer, Conv1D) else layer.weight).detach().float()


# ---------------------------------------------------------------------------- the training loop


def run_args(tmp_path, out, **extra):
    base = {"data.path": write_data(tmp_path / "d.jsonl", 40), "data.eval_split": 4, "data.max_length": 96, "peft.r": 4,
            "peft.alpha": 8, "peft.dropout": 0.1, "train.steps": 6, "train.batch_size": 2, "train.lr": 1e-3,
            "train.schedule": "constant", "train.warmup": 0, "train.save_every": 3, "train.threads": 1,
            "train.mixed_precision": "no", "train.progress": False, "train.output_dir": out, **extra}
    return tiny_overrides("llama") + [f"{k}={v}" for k, v in base.items()]


@pytest.mark.parametrize("init", ["eva", "corda_kpm", "lora_ga"])
def test_data_init_runs_before_the_optimiser_and_resume_does_not_redo_it(init, tmp_path, monkeypatch):
    extra = {"peft.init": init, "peft.init_batches": 2, "peft.eva_tau": 0.9}
    drawn, real = [], setup.init_batches
    monkeypatch.setattr(setup, "init_batches", lambda *a: drawn.append(1) or real(*a))
    whole = train(load_config(None, run_args(tmp_path, tmp_path / "whole", **extra)))
    train(load_config(None, run_args(tmp_path, tmp_path / "cut", **{**extra, "train.steps": 3})))
    assert len(drawn) == 2  # each fresh run read its init batches
    monkeypatch.setattr(lora_init.lora_eva, "eva_components", lambda *a, **k: pytest.fail("EVA recomputed on resume"))
    monkeypatch.setattr(lora_init, "corda_init", lambda *a, **k: pytest.fail("CorDA recomputed on resume"))
    monkeypatch.setattr(lora_init, "lora_ga_init", lambda *a, **k: pytest.fail("LoRA-GA recomputed on resume"))
    resumed = train(load_config(None, run_args(tmp_path, tmp_path / "cut", **extra)), resume=True)
    assert len(drawn) == 2  # the resumed run read none: it rebuilt from the checkpoint
    a, b = load_file(whole.artifact / "adapter_model.safetensors"), load_file(resumed.artifact / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.eval_loss == whole.eval_loss  # the base's residual (CorDA, LoRA-GA) came back too
    if init == "eva":  # ranks redistributed: the resumed run had to rebuild the layers' shapes
        assert json.loads((resumed.artifact / "adapter_config.json").read_text())["rank_pattern"]


def test_loftq_loads_float_then_quantises_the_rest_and_learns(tmp_path):
    args = run_args(tmp_path, tmp_path / "q", **{"peft.init": "loftq", "peft.loftq_iter": 2, "model.quantize": "nf4",
                                                  "train.save_every": 0})
    result = train(load_config(None, args))
    model = result.model
    quantised = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert quantised and all(n.endswith(".base_layer") for n in quantised)  # LoftQ's Q_T, every target
    for layer in lora_init.linear_layers(model).values():
        assert isinstance(layer.base_layer, QuantLinear) and layer.lora_A.weight.dtype == torch.float32
    assert json.loads((result.artifact / "adapter_config.json").read_text())["init_lora_weights"] == "loftq"
    cfg = load_config(None, args)  # LoftQ saw the float W (not q(W)): its Q_T is the formula's on the float model
    float_model, _ = load_model(dataclasses.replace(cfg.model, quantize=None), seed=cfg.train.seed, with_tokenizer=False)
    path = "model.layers.0.self_attn.q_proj"
    q, _, _ = loftq_formula(weight(float_model, path), 4, 2)
    torch.testing.assert_close(model.get_submodule(path).base_layer.dequantize(torch.float32), q, atol=1e-6, rtol=0)
    with pytest.raises(Exception, match="model.quantize=nf4"):
        train(load_config(None, run_args(tmp_path, tmp_path / "r", **{"peft.init": "loftq", "train.save_every": 0})))
