"""Checks that need a CUDA device (``-m cuda``; run by benchmarks/gpu_check.sh), skipped without one.

bf16 and fp16 autocast training against fp32 on the same batches; packing (SDPA with the 4-D
block mask, and the variable-length path: flash-attention when installed, else flex attention)
against unpacked sequences; an NF4 base on the device; greedy generation against HF
``generate``; the multi-adapter engine's mixed batches against each adapter alone.

``PEFTLAB_GPU_CHECK_DRY=1`` runs the same checks on the CPU (the script's ``--dry`` mode, so the
script is known to work up to the device): the varlen kernel is skipped there. The measured
differences are appended to ``$PEFTLAB_GPU_CHECK_OUT/measured.jsonl`` when that is set, so the
figures come back with the run. No tokenizer is loaded (the GPU machine has no model assets):
every model is a random tiny Llama with a 1,024-token vocabulary and every batch random ids.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_VOCAB, batch_of, small_vocab, tiny_model_config
from peftlab import registry
from peftlab.config import Config, TrainConfig, build_dataclass
from peftlab.model.load import load_model


def check_device() -> torch.device | None:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("PEFTLAB_GPU_CHECK_DRY") == "1":
        return torch.device("cpu")
    return None


DEVICE = check_device()
ON_CUDA = DEVICE is not None and DEVICE.type == "cuda"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device "
                                                    "(PEFTLAB_GPU_CHECK_DRY=1 runs the same checks on the CPU)")]


def record(check: str, **values) -> None:
    out = os.environ.get("PEFTLAB_GPU_CHECK_OUT")
    if out:
        with open(os.path.join(out, "measured.jsonl"), "a") as f:
            f.write(json.dumps({"check": check, "device": str(DEVICE), **values}) + "\n")


def model_on_device(seed: int = 0, **extra):
    cfg = tiny_model_config("llama", **small_vocab("llama"), **extra)
    cfg.device = DEVICE.type
    model, _ = load_model(cfg, seed=seed, with_tokenizer=False)
    return model


def lora(model, seed: int = 0, **options):
    m = registry.get("lora")
    cfg = build_dataclass(m.config_cls, {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, **options}, "peft")
    torch.manual_seed(seed)
    m.apply(model, cfg)
    return cfg


def on_device(batch: dict) -> dict:
    return {k: v.to(DEVICE) for k, v in batch.items()}


# ---------------------------------------------------------------------------- autocast training


# bf16 on a CPU without native bf16 is ~100x slower than fp32: the dry run takes a smaller shape
STEPS, ROWS, LENGTH = (8, 4, 64) if ON_CUDA else (3, 2, 16)


def updates(precision: str) -> list[dict]:
    """STEPS applied updates over fixed batches (a skipped fp16 step is retried on the same batches)."""
    from peftlab.train.step import start_training, train_step

    model = model_on_device(initializer_range=0.1)
    peft = lora(model)
    cfg = Config(peft=peft, train=TrainConfig(mixed_precision=precision, lr=2e-3, warmup=0, schedule="constant"))
    state = start_training(model, cfg, total_steps=STEPS)
    out = []
    while state.step < STEPS:
        micro = [batch_of(2 * state.step + k, rows=ROWS, length=LENGTH) for k in (0, 1)]
        r = train_step(state, micro)
        if r is not None:
            out.append(r)
    return out


@pytest.mark.parametrize("precision, loss_tol, norm_tol", [("bf16", 3e-2, 1.5e-1), ("fp16", 5e-3, 6e-2)])
def test_autocast_training_follows_fp32(precision, loss_tol, norm_tol):
    """Tolerances (relative, the largest over the updates): bf16 keeps 8 bits of mantissa (~3e-3
    per rounding), fp16 11 bits; on CPU fp16 measured 6.6e-4 on the loss and 2.8e-2 on the grad
    norm (tests/test_fp16.py). The CUDA figures are written to measured.jsonl."""
    ref = updates("no")
    got = updates(precision)
    loss_rel = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(ref, got))
    norm_rel = max(abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"] for a, b in zip(ref, got))
    record(f"autocast_{precision}", loss_rel=loss_rel, grad_norm_rel=norm_rel, steps=STEPS,
           overflows=got[-1].get("overflow_steps"))
    assert loss_rel < loss_tol and norm_rel < norm_tol, (loss_rel, norm_rel)


# ---------------------------------------------------------------------------- packing


def varlen_kernel() -> str:
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"


@pytest.mark.parametrize("path", ["sdpa", "varlen"])
def test_packed_loss_equals_unpacked(path):
    """Three sequences of different lengths packed into one row (4-D block-diagonal mask and
    per-sequence position ids) give the loss of the three alone; the varlen path flattens the rows
    and lets the kernel find the sequences from the position ids (train/loss.backbone_hidden)."""
    from peftlab.data.collate import block_causal_mask, position_ids_for
    from peftlab.train.loss import backbone_hidden, causal_lm_loss

    if path == "varlen" and not ON_CUDA:
        pytest.skip("the varlen kernels (flash-attention, flex attention) are checked on CUDA only")
    attn = "sdpa" if path == "sdpa" else varlen_kernel()
    model = model_on_device(attn_implementation=attn, initializer_range=0.1)
    lens = (17, 9, 30)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, SMALL_VOCAB, (n,), generator=g) for n in lens]
    with torch.no_grad():
        total, n_tok = 0.0, 0
        for s in seqs:  # each alone
            b = on_device({"input_ids": s[None], "attention_mask": torch.ones_like(s)[None], "labels": s[None]})
            loss_sum, k = causal_lm_loss(model, b)
            total, n_tok = total + float(loss_sum), n_tok + int(k)
        ref = total / n_tok
        ids = torch.cat(seqs)[None]
        labels = ids.clone()
        labels[0, torch.tensor([0, lens[0], lens[0] + lens[1]])] = -100  # no target across a boundary
        packed = on_device({"input_ids": ids, "labels": labels,
                            "attention_mask": block_causal_mask([lens], ids.shape[1]),
                            "position_ids": position_ids_for([lens], ids.shape[1])})
        hidden = backbone_hidden(model, packed, varlen=path == "varlen")
        targets = packed["labels"][:, 1:]
        keep = targets != -100
        logits = model.get_output_embeddings()(hidden[:, :-1][keep])
        got = float(F.cross_entropy(logits.float(), targets[keep], reduction="sum")) / int(keep.sum())
    assert int(keep.sum()) == n_tok
    record(f"packing_{path}", kernel=attn, abs_diff=abs(got - ref), loss=ref)
    assert abs(got - ref) < 1e-4, (got, ref)  # fp32; the kernels sum in another order


# ---------------------------------------------------------------------------- NF4


def test_nf4_base_on_device_matches_its_dequantised_weights_and_trains_lora():
    """The frozen base in NF4 on the device (bitsandbytes' Linear4bit where installed on CUDA,
    else peftlab's QuantLinear): its logits equal those of the same model with the NF4 weights
    dequantised into plain layers (the 4-bit kernels compute with exactly those weights), it is a
    real quantisation (the logits differ from the fp32 original's), and one LoRA step moves only
    the adapter."""
    import copy

    from peftlab.quant.convert import dequantize_model
    from peftlab.train.step import start_training, train_step

    cfg = tiny_model_config("llama", **small_vocab("llama"), initializer_range=0.1)
    cfg.device = DEVICE.type
    original, _ = load_model(cfg, seed=0, with_tokenizer=False)
    cfg.quantize = "nf4"
    model, _ = load_model(cfg, seed=0, with_tokenizer=False)
    kinds = sorted({type(m).__name__ for m in model.modules() if "4bit" in type(m).__name__ or "Quant" in type(m).__name__})
    assert kinds, "no quantised layers"
    plain = copy.deepcopy(model)
    dequantize_model(plain)
    b = on_device(batch_of(0, rows=2, length=24))
    with torch.no_grad():
        q = model(input_ids=b["input_ids"]).logits.float()
        d = plain(input_ids=b["input_ids"]).logits.float()
        o = original(input_ids=b["input_ids"]).logits.float()
    same, vs_original = float((q - d).abs().max()), float((q - o).norm() / o.norm())
    record("nf4", layers=kinds, max_abs_vs_dequantised=same, rel_vs_fp32_original=vs_original)
    assert same < (2e-2 if ON_CUDA else 1e-4), same  # bitsandbytes computes in its own order and dtype
    assert vs_original > 1e-3  # the weights really are 4-bit
    peft = lora(model)
    state = start_training(model, Config(peft=peft, train=TrainConfig(mixed_precision="no", lr=1e-2, warmup=0)), 2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    r = train_step(state, [b])
    assert r is not None and torch.isfinite(torch.tensor(r["loss"]))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


# ---------------------------------------------------------------------------- generation


def test_greedy_generation_equals_hf_generate():
    from peftlab.model import decode

    model = model_on_device(initializer_range=0.1)
    peft = lora(model)
    with torch.no_grad():  # a non-zero adapter, so the LoRA path is in the tokens
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=None)
    model.eval()
    ids = torch.randint(3, SMALL_VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    model.config.use_cache = True
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                             eos_token_id=[SMALL_VOCAB + 5], temperature=None, top_p=None, top_k=None)
        got = decode.lean_greedy(model, ids, mask, 16, [SMALL_VOCAB + 5], 0) if decode.supports(model) else ref
    record("generation", lean_path=decode.supports(model), equal=bool(torch.equal(got, ref)))
    assert got.shape == ref.shape == (3, 26) and torch.equal(got, ref)
    assert peft is not None


# ---------------------------------------------------------------------------- multi-adapter engine


def test_multi_adapter_mixed_batch_equals_each_adapter_alone(tmp_path):
    from peftlab.export.adapter import load_adapter, save_adapter
    from peftlab.serve.multi_lora import MultiLoRAModel

    dirs = {}
    for i, (name, r) in enumerate((("a", 2), ("b", 8))):
        model = model_on_device(initializer_range=0.1)
        peft = lora(model, seed=10 + i, r=r, alpha=2 * r)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
        dirs[name] = save_adapter(model, peft, tmp_path / name, base_model_name="config:llama")
    ids = torch.randint(3, SMALL_VOCAB, (4, 12), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    refs = {}
    for name in ("a", "b", None):
        model = model_on_device(initializer_range=0.1)
        if name is not None:
            load_adapter(model, dirs[name])
        with torch.no_grad():
            refs[name] = model(input_ids=ids).logits.float()
    assert (refs["a"] - refs["b"]).abs().max() > 1e-3  # the routing is really tested
    mm = MultiLoRAModel(model_on_device(initializer_range=0.1))
    for name, d in dirs.items():
        mm.load(name, d)
    rows = ["a", None, "b", "a"]
    worst = 0.0
    for mode in ("gather", "grouped", "auto"):
        mm.router.mode = mode
        with torch.no_grad(), mm.route(rows):
            mixed = mm(input_ids=ids).logits.float()
        for i, name in enumerate(rows):
            worst = max(worst, float((mixed[i] - refs[name][i]).abs().max()))
    record("multi_adapter", max_abs_diff=worst)
    assert worst < (1e-3 if ON_CUDA else 1e-5), worst  # CUDA's TF32-free fp32 GEMMs still sum in another order
