"""The quantised base (``model.quantize``): NF4 with double quantisation and 8-bit row-wise absmax.

Expected values come from the QLoRA paper / bitsandbytes (the NF4 table), from baselines computed
here (int4 and FP4 on the same Gaussian weights), and from exact formulas (bits per weight).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from peftlab.model.load import load_model
from peftlab.quant.convert import (
    QuantLinear,
    dequantize_model,
    model_is_quantized,
    quantize_model,
    tensor_bytes,
)
from peftlab.quant.int8 import dequantize_int8, quantize_int8
from peftlab.quant.nf4 import DYNAMIC, NF4, dequantize_nf4, nf4_bytes, quantize_nf4

# QLoRA (Dettmers et al. 2023), Appendix E, as shipped in bitsandbytes' functional.py
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


pytestmark = pytest.mark.usefixtures("one_thread")


def blockwise(w: torch.Tensor, code: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Reference absmax block quantisation to the nearest value of ``code`` (for the baselines)."""
    b = w.reshape(-1, block)
    scale = b.abs().amax(1, keepdim=True)
    code = code.sort().values
    idx = torch.bucketize(b / scale, (code[1:] + code[:-1]) / 2)
    return (code[idx] * scale).reshape(w.shape)


def nf4_roundtrip(w: torch.Tensor, double_quant: bool = True) -> torch.Tensor:
    t = quantize_nf4(w, double_quant)
    return dequantize_nf4(t.packed, t.absmax_q, t.absmax2, t.offset, t.shape)


def test_nf4_code_is_the_published_table():
    torch.testing.assert_close(NF4, torch.tensor(PUBLISHED_NF4), atol=2e-7, rtol=0)
    assert NF4[7] == 0.0 and NF4[0] == -1.0 and NF4[-1] == 1.0


def test_dynamic_map_for_the_scales():
    assert DYNAMIC.numel() == 256 and DYNAMIC.unique().numel() == 256
    assert DYNAMIC.min() > -1.0 and DYNAMIC.max() == 1.0 and (DYNAMIC == 0).sum() == 1
    assert torch.all(DYNAMIC[1:] > DYNAMIC[:-1])
    assert DYNAMIC.abs()[DYNAMIC != 0].min() < 1e-6  # dense near zero: the smallest step is 10^-6 scale


def test_nf4_beats_int4_and_fp4_on_gaussian_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1 << 18, generator=g)
    fp4 = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3.0])  # bitsandbytes' FP4 (e2m1) values, /12
    fp4 = torch.cat([fp4, -fp4[1:]]) / 12
    int4 = torch.arange(-7, 8).float() / 7  # symmetric absmax int4
    mse = {name: float(((q - w) ** 2).mean()) for name, q in [
        ("nf4", nf4_roundtrip(w)), ("nf4_no_dq", nf4_roundtrip(w, double_quant=False)),
        ("fp4", blockwise(w, fp4)), ("int4", blockwise(w, int4))]}
    assert mse["nf4"] < 0.9 * mse["int4"] and mse["nf4"] < 0.7 * mse["fp4"], mse
    assert mse["nf4"] < 1.01 * mse["nf4_no_dq"], mse  # double quantisation costs < 1% more error
    assert mse["nf4_no_dq"] == pytest.approx(float(((blockwise(w, NF4) - w) ** 2).mean()), rel=1e-6)


def test_nf4_storage_is_4_127_bits_per_weight():
    w = torch.randn(512, 2048)
    t = quantize_nf4(w)
    nbytes = sum(x.numel() * x.element_size() for x in (t.packed, t.absmax_q, t.absmax2, t.offset))
    assert nbytes == nf4_bytes(w.numel())
    assert 8 * nbytes / w.numel() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)


def test_nf4_values_on_the_grid_roundtrip_exactly_and_pack_two_per_byte():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (4, 64), generator=g)
    codes[:, 0] = 15  # every block reaches +1 so its absmax is its scale
    scale = torch.rand(4, 1, generator=g) + 0.5
    w = NF4[codes] * scale
    t = quantize_nf4(w, double_quant=False)
    assert t.packed.dtype == torch.uint8 and t.packed.numel() == w.numel() // 2
    assert torch.equal(t.packed[0], (codes.view(-1)[0] << 4 | codes.view(-1)[1]).to(torch.uint8))
    torch.testing.assert_close(dequantize_nf4(t.packed, t.absmax_q, t.absmax2, t.offset, t.shape), w, atol=0, rtol=1e-6)


def test_int8_rowwise_error_is_at_most_half_a_step():
    w = torch.randn(64, 300) * torch.linspace(0.01, 3, 64)[:, None]
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    err = (dequantize_int8(q, scale) - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-7)


def test_quantlinear_matches_dequantised_weight_and_keeps_nothing_for_backward():
    base = torch.nn.Linear(96, 80)
    x = torch.randn(3, 5, 96, requires_grad=True)
    for kind in ("nf4", "int8"):
        q = QuantLinear.from_float(base, kind)
        w = q.dequantize()
        saved: list[int] = []

        def pack(t, saved=saved):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = q(x)
        torch.testing.assert_close(y, F.linear(x, w, base.bias), atol=1e-6, rtol=0)
        assert not any(n >= w.numel() for n in saved), f"{kind}: a weight-sized tensor was saved for backward"
        grad = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, grad)
        torch.testing.assert_close(gx, grad @ w, atol=1e-5, rtol=0)


def test_quantlinear_under_bf16_autocast():
    q = QuantLinear.from_float(torch.nn.Linear(64, 32), "nf4")
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_quantised_model_memory_and_counts(arch):
    mcfg = tiny_model_config(arch, intermediate=256) if arch == "llama" else tiny_model_config(arch, n_inner=256)
    fp32, _ = load_model(mcfg, with_tokenizer=False)
    nf4, _ = load_model(dataclasses.replace(mcfg, quantize="nf4"), with_tokenizer=False)
    int8, _ = load_model(dataclasses.replace(mcfg, quantize="int8"), with_tokenizer=False)
    assert model_is_quantized(nf4) == "nf4" and model_is_quantized(int8) == "int8"
    layers = [m for m in nf4.modules() if isinstance(m, QuantLinear)]
    linear = sum(m.quantized_numel for m in layers)
    head = nf4.get_output_embeddings()
    assert head is not None and not isinstance(head, QuantLinear)  # the LM head stays in float
    # bytes: the float model minus 4 bytes per linear weight plus NF4's (0.5 + 1/64 + ...) bytes
    expect = tensor_bytes(fp32)["total"] - 4 * linear + sum(nf4_bytes(m.quantized_numel) for m in layers)
    assert tensor_bytes(nf4)["total"] == expect
    assert tensor_bytes(int8)["total"] == tensor_bytes(fp32)["total"] - 3 * linear + 4 * sum(
        m.out_features for m in layers)
    from peftlab.model.params import param_report

    assert param_report(nf4).total == param_report(fp32).total  # quantised weights still count as weights
    from peftlab.model.targets import weight_matrix

    for model, bound in ((nf4, 0.12), (int8, 0.01)):  # relative weight error: NF4 ~ sqrt(0.0085), int8 ~ 1/255
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                w = weight_matrix(fp32.get_submodule(name)).detach()
                err = float((m.dequantize() - w).norm() / w.norm())
                assert 0 < err < bound, (name, err)


def test_dequantize_model_gives_plain_layers_in_the_loaded_dtype():
    mcfg = dataclasses.replace(tiny_model_config("gpt2"), quantize="nf4", dtype="bfloat16")
    model, _ = load_model(mcfg, with_tokenizer=False)
    ids = torch.randint(0, 500, (1, 8))
    with torch.no_grad():
        before = model(ids).logits
    dequantize_model(model)
    assert model_is_quantized(model) is None
    from transformers.pytorch_utils import Conv1D

    assert all(m.weight.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, Conv1D))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)


def test_unknown_quantize_value_is_a_clear_error():
    from peftlab.errors import ConfigError

    model, _ = load_model(tiny_model_config("llama"), with_tokenizer=False)
    with pytest.raises(ConfigError, match="nf4, int8, none"):
        quantize_model(model, "nf3")


@pytest.mark.slow
def test_real_model_nf4_resident_memory_is_under_half_of_bf16():
    """SmolLM2-135M in fresh processes (benchmarks/qlora_memory.py): NF4 keeps the embeddings in
    bf16 (56 MB) and stores the 106M linear weights at 4.127 bits, so it needs < 0.5x bf16's memory."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import peftlab

    root = Path(peftlab.__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "HF_HUB_OFFLINE": "1"}
    rows = {}
    for mode in ("bf16", "nf4"):
        out = subprocess.run([sys.executable, str(root / "benchmarks" / "qlora_memory.py"), "--child", mode],
                             capture_output=True, text=True, env=env, check=True, timeout=600)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    assert rows["nf4"]["tensor_mb"] < 0.45 * rows["bf16"]["tensor_mb"]
    assert rows["nf4"]["rss_mb"] < 0.5 * rows["bf16"]["rss_mb"], rows
