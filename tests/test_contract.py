"""The contract every peftlab method keeps: one parametrised suite, run for every entry of CASES.

HOW TO JOIN (another method family): append a ``Case`` to ``CASES`` at the bottom of the list —
nothing else. A Case names the method's peft.* settings and a few facts about it:

    Case("ia3", {"method": "ia3"},
         expected=ia3_expected,          # (base model, cfg) -> {trainable tensor name: numel}, a
                                         # closed-form formula over the BASE model's layer shapes,
                                         # written in the test file (never by calling the method)
         randomize=("ia3_l",),           # tensors that start at a no-op value; given random values
                                         # before the merge test so it tests something
         identity_atol=0.0,              # None: the method does not promise identity at init
         mergeable=True,                 # False: merge must raise ConfigError (prompt/prefix/...)
         lr=1e-2, steps=30)              # how it overfits one batch

Helpers for formulas: ``linear_targets(model, targets)`` resolves peft.targets on the base model
(own code, not peftlab's), ``shape(module)`` gives (in, out). ``train_steps`` drives a method the
way the training loop does (on_train_start, param_groups, aux_loss, on_step before zero_grad).

For every case and both tiny architectures (GPT-2 with Conv1D, Llama; tests/conftest.py):
  1. identity at init, where promised (logits equal the base model's within ``identity_atol``);
  2. the exact set of trainable tensor names and their sizes equal ``expected``;
  3. save -> load into a fresh base gives bit-identical logits (``roundtrip_atol`` where saving
     re-expresses the adapter, e.g. PiSSA saved as a rank-2r delta against the original W);
  4. merge == unmerged within ``merge_atol`` (fp32) after ``randomize``; ``.eval()``/``.train()``
     never merge; after merge only plain transformers/torch modules remain;
  5. it learns: the loss on one small batch falls below ``overfit_ratio`` x its start;
  6. ``peftlab params --json`` reports the same trainable count.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import yaml
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import randomize, tiny_model_config, tiny_overrides
from peftlab import registry
from peftlab.config import TrainConfig, build_dataclass
from peftlab.errors import ConfigError
from peftlab.export.adapter import load_adapter, save_adapter
from peftlab.model.load import load_model
from peftlab.train.loss import causal_lm_loss
from peftlab.train.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- formula helpers


def shape(m: nn.Module) -> tuple[int, int]:
    """(in, out) of a base linear layer, from its weight."""
    w = m.weight
    return (w.shape[0], w.shape[1]) if isinstance(m, Conv1D) else (w.shape[1], w.shape[0])


def _matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def linear_targets(model: nn.Module, targets, kinds=(nn.Linear, Conv1D, nn.Embedding)) -> list[tuple[str, nn.Module]]:
    """(path, module) selected by peft.targets on the base model: all-linear or leaf names."""
    head = model.get_output_embeddings()
    mods = [(n, m) for n, m in model.named_modules() if n and isinstance(m, kinds)]
    if targets == "all-linear":
        return [(n, m) for n, m in mods if isinstance(m, (nn.Linear, Conv1D)) and m is not head]
    names = targets if isinstance(targets, list) else [t.strip() for t in targets.split(",")]
    return [(n, m) for n, m in mods if any(_matches(n, t) for t in names)]


def extra_expected(model: nn.Module, cfg) -> dict[str, int]:
    out = {}
    for path, m in linear_targets(model, cfg.additional_targets or [], kinds=(nn.Module,)):
        for pname, p in m.named_parameters():
            out[f"{path}.modules_to_save.{pname}"] = p.numel()
    return out


def lora_expected(model: nn.Module, cfg) -> dict[str, int]:
    """LoRA: r (in + out) per layer; fused: k r in + k r out/n; embeddings: r (V + d)."""
    r, out = cfg.r, {}
    for path, m in linear_targets(model, cfg.targets):
        if isinstance(m, nn.Embedding):
            vocab, dim = m.weight.shape
            out[f"{path}.lora_embedding_A"] = r * vocab
            if not cfg.freeze_a:
                out[f"{path}.lora_embedding_B"] = dim * r
            continue
        i, o = shape(m)
        mask = next((v for k, v in cfg.enable_lora.items() if _matches(path, k)), None)
        n, k = (len(mask), sum(mask)) if mask else (1, 1)
        if not cfg.freeze_a:
            out[f"{path}.lora_A.weight"] = k * r * i
        out[f"{path}.lora_B.weight"] = k * r * o // n
        if cfg.method == "dora":
            out[f"{path}.lora_magnitude_vector"] = o
    return {**out, **extra_expected(model, cfg)}


def vera_expected(model: nn.Module, cfg) -> dict[str, int]:
    """VeRA: out + r per layer (b and d); the shared A and B are not parameters."""
    out = {}
    for path, m in linear_targets(model, cfg.targets, kinds=(nn.Linear, Conv1D)):
        out[f"{path}.vera_lambda_b"] = shape(m)[1]
        out[f"{path}.vera_lambda_d"] = cfg.r
    return {**out, **extra_expected(model, cfg)}


def adalora_expected(model: nn.Module, cfg) -> dict[str, int]:
    """AdaLoRA: r0 (in + out + 1) per layer (P, Q and the diagonal E)."""
    out, r = {}, cfg.init_r
    for path, m in linear_targets(model, cfg.targets, kinds=(nn.Linear, Conv1D)):
        i, o = shape(m)
        out[f"{path}.lora_A"], out[f"{path}.lora_B"], out[f"{path}.lora_E"] = r * i, o * r, r
    return {**out, **extra_expected(model, cfg)}


# ---------------------------------------------------------------------------- the cases


@dataclass
class Case:
    id: str
    peft: dict
    expected: Callable[[nn.Module, object], dict[str, int]]
    randomize: tuple[str, ...] = ("lora_B", "lora_embedding_A")
    archs: tuple[str, ...] = ("gpt2", "llama")
    model: dict = field(default_factory=dict)  # model.* settings, e.g. {"quantize": "nf4"}
    identity_atol: float | None = 0.0
    roundtrip_atol: float = 0.0
    merge_atol: float = 1e-5  # fp32, relative to the largest logit (the fp64 run checks 1e-9)
    mergeable: bool = True
    lr: float = 1e-2
    steps: int = 25
    overfit_ratio: float = 0.5


def _targets(arch: str, gpt2: list[str], llama: list[str]) -> dict:
    return {"gpt2": gpt2, "llama": llama}[arch]


SMALL = {"r": 4, "alpha": 8}
CASES = [
    Case("lora", {"method": "lora", **SMALL}, lora_expected),
    Case("rslora", {"method": "lora", **SMALL, "use_rslora": True}, lora_expected),
    Case("lora_gaussian", {"method": "lora", **SMALL, "init": "gaussian"}, lora_expected),
    # PiSSA/OLoRA factors are large (sqrt of singular values): fp32 rounding, amplified by the tiny
    # models' large init, reaches ~1.3e-5 of the logits' scale; the fp64 merge run proves exactness
    Case("pissa", {"method": "lora", **SMALL, "init": "pissa"}, lora_expected, randomize=("lora_A", "lora_B"),
         identity_atol=2e-4, roundtrip_atol=2e-4, merge_atol=2e-5),
    Case("pissa_fast", {"method": "lora", **SMALL, "init": "pissa", "pissa_niter": 4}, lora_expected,
         randomize=("lora_A", "lora_B"), identity_atol=2e-4, roundtrip_atol=2e-4, archs=("llama",)),
    Case("olora", {"method": "lora", **SMALL, "init": "olora"}, lora_expected, randomize=("lora_A", "lora_B"),
         identity_atol=2e-4, roundtrip_atol=2e-4),
    Case("lora_fa", {"method": "lora", **SMALL, "freeze_a": True}, lora_expected),
    Case("loraplus", {"method": "lora", **SMALL, "loraplus_lr_ratio": 16}, lora_expected, lr=2e-3),
    Case("lora_sparsity_dropout", {"method": "lora", **SMALL, "sparsity_dropout": 0.1}, lora_expected),
    Case("lora_embeddings", {"method": "lora", **SMALL, "targets": "EMB"}, lora_expected),
    Case("lora_fused_qv", {"method": "lora", **SMALL, "targets": ["c_attn"],
                           "enable_lora": {"c_attn": [True, False, True]}}, lora_expected, archs=("gpt2",), lr=2e-2),
    Case("lora_extra_modules", {"method": "lora", **SMALL, "additional_targets": ["lm_head"]}, lora_expected,
         randomize=("lora_B", "modules_to_save"), lr=3e-3),
    Case("dora", {"method": "dora", **SMALL}, lora_expected),
    Case("dora_exact_norm", {"method": "dora", **SMALL, "exact_norm": True}, lora_expected, archs=("llama",)),
    Case("vera", {"method": "vera", "r": 16}, vera_expected, randomize=("vera_lambda_b",), lr=5e-2, steps=30,
         overfit_ratio=0.8, merge_atol=2e-5),
    Case("adalora", {"method": "adalora", "init_r": 4, "target_r": 2}, adalora_expected, randomize=("lora_E",),
         lr=3e-2),
    Case("relora", {"method": "relora", **SMALL, "reset_every": 10, "restart_warmup": 2}, lora_expected, steps=30),
    Case("delta_lora", {"method": "delta_lora", **SMALL}, lora_expected, lr=5e-3),
    Case("qlora_nf4", {"method": "lora", **SMALL}, lora_expected, model={"quantize": "nf4"}),
    Case("lora_int8", {"method": "lora", **SMALL}, lora_expected, model={"quantize": "int8"}, archs=("llama",)),
    Case("dora_nf4", {"method": "dora", **SMALL}, lora_expected, model={"quantize": "nf4"}, archs=("gpt2",)),
    Case("adalora_nf4", {"method": "adalora", "init_r": 4, "target_r": 2}, adalora_expected, randomize=("lora_E",),
         model={"quantize": "nf4"}, archs=("llama",), lr=3e-2),
]
PARAMS = [pytest.param(c, a, id=f"{c.id}-{a}") for c in CASES for a in c.archs]


# ---------------------------------------------------------------------------- plumbing


def peft_settings(case: Case, arch: str) -> dict:
    raw = dict(case.peft)
    if raw.get("targets") == "EMB":
        raw["targets"] = _targets(arch, ["c_attn", "wte"], ["q_proj", "v_proj", "embed_tokens"])
    return raw


_BASES: dict[tuple, nn.Module] = {}


def make(case: Case, arch: str, seed: int = 0):
    """(fresh base model, method, cfg) for a case (a copy of a cached base: building one costs 10x more)."""
    method = registry.get(case.peft["method"])
    cfg = build_dataclass(method.config_cls, peft_settings(case, arch), "peft")
    key = (arch, seed, tuple(sorted(case.model.items())))
    if key not in _BASES:
        mcfg = dataclasses.replace(tiny_model_config(arch), **case.model)
        _BASES[key], _ = load_model(mcfg, seed=seed, with_tokenizer=False)
    return copy.deepcopy(_BASES[key]), method, cfg


def expected(case: Case, arch: str) -> dict[str, int]:
    """The case's formula over the float base model (a quantised base has the same shapes)."""
    float_case = dataclasses.replace(case, model={k: v for k, v in case.model.items() if k != "quantize"})
    model, _, cfg = make(float_case, arch)
    return case.expected(model, cfg)


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(batch()["input_ids"]).logits


def train_steps(model: nn.Module, method, cfg, steps: int, lr: float) -> list[float]:
    """Drive the method as peftlab's loop does; returns the loss before each step."""
    if method.on_train_start is not None:
        method.on_train_start(model, cfg, steps)
    opt = build_optimizer(model, method, cfg, TrainConfig(lr=lr, weight_decay=0.0))
    data, losses = batch(), []
    model.train()
    for step in range(1, steps + 1):
        loss_sum, n = causal_lm_loss(model, data)
        loss = loss_sum / n
        extra = method.aux_loss(model, cfg, data) if method.aux_loss is not None else None
        (loss + extra if extra is not None else loss).backward()
        opt.step()
        if method.on_step is not None:
            method.on_step(model, cfg, step, opt)
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def trainable(model: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def is_plain(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] in ("torch", "transformers")


# ---------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("case,arch", PARAMS)
def test_identity_at_init(case: Case, arch: str):
    if case.identity_atol is None:
        pytest.skip(f"{case.id} does not promise identity at init")
    model, method, cfg = make(case, arch)
    before = logits(model)
    method.apply(model, cfg)
    after = logits(model)
    if case.identity_atol == 0.0:
        assert torch.equal(before, after)
    else:
        torch.testing.assert_close(after, before, atol=case.identity_atol * before.abs().max().item(), rtol=0)


@pytest.mark.parametrize("case,arch", PARAMS)
def test_trainable_names_and_counts(case: Case, arch: str):
    want = expected(case, arch)
    model, method, cfg = make(case, arch)
    method.apply(model, cfg)
    got = trainable(model)
    assert got == want
    assert sum(got.values()) == sum(want.values()) > 0


@pytest.mark.parametrize("case,arch", PARAMS)
def test_save_load_roundtrip(case: Case, arch: str, tmp_path):
    model, method, cfg = make(case, arch)
    method.apply(model, cfg)
    train_steps(model, method, cfg, steps=6, lr=case.lr)  # trained tensors (and AdaLoRA masks, ReLoRA restarts)
    want = logits(model)
    save_adapter(model, cfg, tmp_path / "adapter")
    fresh, _, _ = make(case, arch)
    load_adapter(fresh, tmp_path / "adapter")
    got = logits(fresh)
    if case.roundtrip_atol == 0.0:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=case.roundtrip_atol * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case,arch", PARAMS)
def test_merge_equals_unmerged_and_is_explicit(case: Case, arch: str, dtype: torch.dtype):
    """fp32 within ``merge_atol`` x the logits' scale; fp64 within 1e-9 x scale (exact up to rounding)."""
    if dtype == torch.float64 and case.model.get("quantize"):
        pytest.skip("a quantised base computes in the dtype it was loaded in (fp32 here)")
    model, method, cfg = make(case, arch)
    model.to(dtype)
    method.apply(model, cfg)
    randomize(model, names=case.randomize)
    ref = logits(model)
    model.train()
    model.eval()
    assert not any(getattr(m, "merged", False) for m in model.modules()), ".eval()/.train() must never merge"
    assert torch.equal(logits(model), ref)
    if not case.mergeable:
        from peftlab.api import merge

        with pytest.raises(ConfigError):
            merge(model, cfg)
        return
    method.merge(model)
    odd = sorted({type(m).__name__ for m in model.modules() if not is_plain(m)})
    assert not odd, f"merge left non-plain modules: {odd}"
    atol = (case.merge_atol if dtype == torch.float32 else 1e-9) * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(logits(model), ref, atol=atol, rtol=0)


@pytest.mark.parametrize("case,arch", PARAMS)
def test_overfits_one_batch(case: Case, arch: str):
    model, method, cfg = make(case, arch)
    method.apply(model, cfg)
    torch.manual_seed(0)
    losses = train_steps(model, method, cfg, steps=case.steps, lr=case.lr)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < case.overfit_ratio * losses[0], f"{case.id}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("case,arch", PARAMS)
def test_params_json(case: Case, arch: str, capsys):
    from peftlab.commands import params

    overrides = tiny_overrides(arch)
    for k, v in {**peft_settings(case, arch)}.items():
        text = yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
        overrides.append(f"peft.{k}={text}")
    overrides += [f"model.{k}={v}" for k, v in case.model.items()]
    assert params.run(argparse.Namespace(args=overrides, json=True)) == 0
    report = json.loads(capsys.readouterr().out)
    model, method, cfg = make(case, arch)
    method.apply(model, cfg)
    total = sum(p.numel() for p in model.parameters()) + sum(
        getattr(m, "quantized_numel", 0) for m in model.modules())
    assert report["trainable"] == sum(expected(case, arch).values())
    assert report["total"] == total  # the base (a quantised weight counted as its elements) + the adapter
