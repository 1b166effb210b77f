"""The contract every peftlab method keeps: one suite, one ``Case`` type, one entry per registered method.

``CONTRACT`` maps every name of ``registry.names()`` (``full`` included) to the configurations its
contract runs with; a meta-test fails when a registered method has no entry, when an entry names
no registered method, or when a method has no section in docs/methods.md.

HOW TO JOIN (a new method): add ``"name": [Case(...)]`` to ``CONTRACT`` and a section to
docs/methods.md — nothing else. A Case names the method's peft.* settings and a few facts:

    Case("ia3", {},                      # id, peft.* settings (the method is the entry's key)
         expected=...,                   # (base model, cfg) -> {tensor name or regex: numel}: a
                                         # closed-form formula over the BASE model's shapes, written
                                         # here (never by calling the method); a regex key counts
                                         # every trainable tensor it matches
         randomize=None,                 # tensors that start at a no-op value, given random values
                                         # before the merge test (None: every trainable tensor moves)
         identity_atol=0.0,              # None: not the identity at init (the output must change)
         mergeable=True,                 # False: merge must raise ConfigError ("cannot be merged")
         lr=1e-2, steps=30,              # how it overfits one batch
         peft_config=...,                # PEFT's config of the same adapter: logit parity both ways
         peft_archs=None)                # the archs PEFT can load it on (None: all; PEFT 0.21 has no
                                         # Conv1D LoHa/LoKr/OFT/HRA, so those say ("llama",))

Helpers for formulas: ``linear_targets(model, targets)`` resolves peft.targets on the base model
(own code, not peftlab's), ``shape(module)`` gives (in, out), ``dims(model)`` the sizes in the
HF config. Every training here goes through the real loop step (``conftest.train_steps`` ->
``peftlab.train.step.train_step``).

For every case and its tiny architectures (GPT-2 with Conv1D, Llama; tests/conftest.py):
  1. identity at init where promised (logits equal the base model's within ``identity_atol``),
     a visible change where not;
  2. the trainable tensors and their sizes equal ``expected`` (and ``param_report`` agrees);
  3. save -> load into a fresh base gives bit-identical logits (``roundtrip_atol`` where saving
     re-expresses the adapter, e.g. PiSSA saved as a rank-2r delta against the original W), in
     PEFT's layout (``peft_type``, key names); a method without ``peft_type`` saves a whole model;
  4. merge == unmerged within ``merge_atol`` (fp32; fp64 within 1e-9) after ``randomize``;
     ``.eval()``/``.train()`` never merge; after merge only plain transformers/torch modules remain
     and the model saves and reloads as a plain HF model; a method that cannot merge says so;
  5. it learns: the loss on one small batch falls below ``overfit_ratio`` x its start;
  6. ``peftlab params --json`` reports the same trainable count;
  7. greedy generation of a batched, left-padded prompt set with the KV cache equals generation
     without the cache and each prompt generated alone;
  8. where PEFT has the method (``peft_config``): PEFT loads our adapter and we load PEFT's, with
     equal logits.
Method-specific behaviour (initialisations, packing, router formulas, ...) is tested in
tests/test_method_specifics.py.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import (
    SMALL_VOCAB,
    batch_logits,
    batch_of,
    perturb,
    randomize,
    small_vocab,
    tiny_model_config,
    tiny_overrides,
    train_steps,
)
from peftlab import api, registry
from peftlab.config import build_dataclass
from peftlab.errors import ConfigError
from peftlab.export.adapter import WEIGHTS_NAME, load_adapter, save_adapter
from peftlab.model import decode
from peftlab.model.load import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

N = 3  # virtual tokens in the prompt/prefix cases
H = 16  # encoder hidden size in the reparameterised cases
B = 8  # adapter bottleneck
R = 4  # MoE expert rank


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


def lora_drop_expected(model: nn.Module, cfg) -> dict[str, int]:
    """LoRA-drop: LoRA's r (in + out) on the kept layers' targets (every layer before pruning), plus one
    shared pair r (in + out) per kind of target (the module path within a layer) for the rest."""
    if cfg.keep_layers is None:
        return lora_expected(model, cfg)
    out = {}
    for path, m in linear_targets(model, cfg.targets):
        i, o = shape(m)
        layer, kind = re.match(r".*\.(?:layers|h)\.(\d+)\.(.+)$", path).groups()
        if int(layer) in cfg.keep_layers:
            out[f"{path}.lora_A.weight"], out[f"{path}.lora_B.weight"] = r_in_out(cfg.r, i, o)
        else:
            key = "peftlab_lora_drop." + kind.replace(".", "__")
            out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = r_in_out(cfg.r, i, o)
    return out


def r_in_out(r: int, i: int, o: int) -> tuple[int, int]:
    return r * i, r * o


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


def dims(model: nn.Module) -> dict:
    """The facts the size formulas need, read from the HF config (not from peftlab)."""
    c = model.config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = c.hidden_size // heads
    ff = getattr(c, "intermediate_size", None) or (c.n_inner or 4 * c.hidden_size)
    return {"d": c.hidden_size, "L": c.num_hidden_layers, "t": kv * hd, "ff": ff, "V": c.vocab_size,
            "P": getattr(c, "n_positions", 0), "llama": c.model_type == "llama"}


def linears(D: dict) -> list[tuple[int, int]]:
    """(in, out) of the linear layers of one decoder layer."""
    d, t, ff = D["d"], D["t"], D["ff"]
    if D["llama"]:
        return [(d, d), (d, t), (d, t), (d, d), (d, ff), (d, ff), (ff, d)]
    return [(d, 3 * d), (d, d), (d, ff), (ff, d)]


def prefix_count(D: dict, h: int | None) -> int:
    t, L = D["t"], D["L"]
    return N * 2 * L * t if h is None else N * t + t * h + h + h * 2 * L * t + 2 * L * t


def adapter_count(D: dict, sites: int, dropped: int = 0) -> int:
    """L·|sites|·(2db + b + d); AdapterDrop builds none in the lowest ``dropped`` layers."""
    d = D["d"]
    return (D["L"] - dropped) * sites * (2 * d * B + B + d)


def unipelt_count(D: dict) -> int:
    """UniPELT (r = R): gated LoRA on q, v (GPT-2: the q and v slices of c_attn) r (in + out) + in + 1 each,
    a gated serial FFN adapter (2db + b + d) + d + 1, prefix tuning + a prefix gate d + 1, per layer."""
    d, t, L = D["d"], D["t"], D["L"]
    lora = (R * (d + d) + d + 1) + (R * (d + t) + d + 1) if D["llama"] else 2 * R * d + 2 * R * d + d + 1
    return L * (lora + 2 * d * B + B + d + d + 1 + d + 1) + prefix_count(D, H)


def lstm_count(D: dict) -> int:
    d, h = D["d"], H
    lstm = 2 * (4 * h * d + 4 * h * h + 8 * h) + 2 * (4 * h * 2 * h + 4 * h * h + 8 * h)
    return N * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


def layer_count(D: dict) -> int:
    d = D["d"]
    norms = 2 * d if D["llama"] else 4 * d
    biases = 0 if D["llama"] else sum(o for _, o in linears(D))
    return sum(i * o for i, o in linears(D)) + biases + norms


def outside_count(D: dict) -> int:  # tied embeddings/head, final norm, (GPT-2) position embeddings
    return D["V"] * D["d"] + (D["d"] if D["llama"] else D["P"] * D["d"] + 2 * D["d"])


def moe_count(D: dict, experts: list[int]) -> int:
    return sum(n * (R * (i + o) + i) for n in experts for i, o in linears(D))


def ia3_count(D: dict) -> int:
    return D["L"] * ((2 * D["t"] if D["llama"] else 3 * D["d"]) + D["ff"])


def bitfit_count(D: dict) -> int:
    if D["llama"]:  # zero biases added to every linear layer
        return D["L"] * sum(o for _, o in linears(D))
    return D["L"] * (sum(o for _, o in linears(D)) + 2 * D["d"]) + D["d"]


def divisors_near_root(n: int) -> tuple[int, int]:
    """n = m k with m the largest divisor of n not above sqrt(n)."""
    m = max(x for x in range(1, math.isqrt(n) + 1) if n % x == 0)
    return m, n // m


def loha_expected(model: nn.Module, cfg) -> dict[str, int]:
    """LoHa: 2 r (in + out) per layer (two rank-r pairs)."""
    out, r = {}, cfg.r
    for path, m in linear_targets(model, cfg.targets, kinds=(nn.Linear, Conv1D)):
        i, o = shape(m)
        for name, n in (("w1_a", o * r), ("w1_b", r * i), ("w2_a", o * r), ("w2_b", r * i)):
            out[f"{path}.hada_{name}"] = n
    return {**out, **extra_expected(model, cfg)}


def lokr_expected(model: nn.Module, cfg) -> dict[str, int]:
    """LoKr: W1 [a, c] (or r (a + c) factored) + W2 [b, d] (or r (b + d)), out = a b, in = c d."""
    out, r, f = {}, cfg.r, cfg.decompose_factor
    for path, m in linear_targets(model, cfg.targets, kinds=(nn.Linear, Conv1D)):
        i, o = shape(m)
        assert f == -1 or (i % f == 0 and o % f == 0), "the formula covers factors that divide the sizes"
        (a, b), (c, d) = [(f, n // f) if f > 0 else divisors_near_root(n) for n in (o, i)]
        if cfg.decompose_both and r < max(a, c) / 2:
            out[f"{path}.lokr_w1_a"], out[f"{path}.lokr_w1_b"] = a * r, r * c
        else:
            out[f"{path}.lokr_w1"] = a * c
        if r < max(b, d) / 2:
            out[f"{path}.lokr_w2_a"], out[f"{path}.lokr_w2_b"] = b * r, r * d
        else:
            out[f"{path}.lokr_w2"] = b * d
    return {**out, **extra_expected(model, cfg)}


def oft_expected(model: nn.Module, cfg) -> dict[str, int]:
    """OFT: (in / b) blocks of b (b - 1) / 2 per layer (one block with block_share), b = block_size or in / r."""
    out = {}
    for path, m in linear_targets(model, cfg.targets, kinds=(nn.Linear, Conv1D)):
        i = shape(m)[0]
        b = cfg.block_size or i // cfg.r
        out[f"{path}.oft_R.weight"] = (1 if cfg.block_share else i // b) * b * (b - 1) // 2
    return {**out, **extra_expected(model, cfg)}


def ln_count(D: dict) -> int:
    """LN tuning: every norm's γ (and β): Llama 2 RMSNorms per layer + the final one; GPT-2 2 LayerNorms + ln_f."""
    d = D["d"]
    return D["L"] * 2 * d + d if D["llama"] else D["L"] * 4 * d + 2 * d


# ---- issue 18's survey methods, part A (KronA, Compacter, MoV, LoRAMoE, Chain of LoRA, PeriodicLoRA)


def krona_count(D: dict, f: int) -> int:
    """KronA: A [a, c] + B [b, d] per layer, out = a b, in = c d ((f, n / f), or the pair nearest sqrt)."""
    pairs = [[(f, n // f) if f > 0 else divisors_near_root(n) for n in (o, i)] for i, o in linears(D)]
    return D["L"] * sum(a * c + b * d for (a, b), (c, d) in pairs)


def compacter_count(D: dict, sites: int, n: int, r: int) -> int:
    """Compacter: the shared rules n³ + per adapter 2 r (b + d) + b + d (two PHM projections with biases)."""
    d = D["d"]
    return n ** 3 + D["L"] * sites * (2 * r * (B + d) + B + d)


def mov_count(D: dict, experts: int) -> int:
    """MoV: N (n + in) per (IA)3 target (n = out, or in for the FFN's down projection)."""
    d, t, ff = D["d"], D["t"], D["ff"]
    per_layer = 2 * (t + d) + 2 * ff if D["llama"] else (3 * d + d) + 2 * ff
    return D["L"] * experts * per_layer


def ffn_linears(D: dict) -> list[tuple[int, int]]:
    """(in, out) of the FFN's linear layers of one decoder layer."""
    d, ff = D["d"], D["ff"]
    return [(d, ff), (d, ff), (ff, d)] if D["llama"] else [(d, ff), (ff, d)]


COMPACTER = r"peftlab_compacter\.phm_rule|.+\.adapter_(down|up)\.(phm_s|phm_t|bias)"


def sized(formula: Callable[[dict], dict[str, int]]) -> Callable[[nn.Module, Any], dict[str, int]]:
    """An ``expected`` from {regex: count} over ``dims(model)``."""
    return lambda model, cfg: formula(dims(model))


LAYER = r".+\.(layers|h)\.{active}\..+"  # LISA: {active} is the one layer that trains now
OUTSIDE = r"(?!.*\.(layers|h)\.\d+\.).+"  # everything outside the decoder layers
PROMPT = r"prompt_encoder\..+"
ADAPTER = r".+\.adapter_(down|up)\.(weight|bias)"
MOE = r".+\.moe_(A|B|router)\.weight"


# ---------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    id: str
    peft: dict  # peft.* settings besides the method (the CONTRACT key)
    expected: Callable[[nn.Module, Any], dict[str, int]]
    randomize: tuple[str, ...] | None = ("lora_B", "lora_embedding_A")  # None: perturb every trainable tensor
    archs: tuple[str, ...] = ("gpt2", "llama")
    model: dict = field(default_factory=dict)  # model.* settings, e.g. {"quantize": "nf4"}
    vocab: int | None = None  # the tiny model's vocabulary (None: the real tokenizers', conftest)
    merge_init: float | None = None  # initializer_range of the merge/parity base (well-conditioned)
    identity_atol: float | None = 0.0  # None: not the identity at init
    roundtrip_atol: float = 0.0
    merge_atol: float = 1e-5  # fp32 (the fp64 run checks 1e-9), x the largest logit when it is over 1
    merge_relative: bool = True  # False: merge_atol is absolute
    fp64: bool = True  # False: the method computes in fp32 inside an fp64 model, so the fp64 merge run is moot
    mergeable: bool = True
    lr: float = 1e-2
    steps: int = 25
    overfit_ratio: float = 0.5
    peft_config: Callable[[], Any] | None = None  # PEFT's config of the same adapter
    peft_archs: tuple[str, ...] | None = None  # where PEFT can load it (None: every arch of the case)
    method: str = ""  # filled from the CONTRACT key


def beyond(id: str, peft: dict, expected, **kw) -> Case:
    """A case on the 1,024-vocabulary base, every trainable tensor perturbed, merged on a well-conditioned
    base (initializer_range 0.02) within an absolute tolerance (the methods beyond LoRA)."""
    kw = {"randomize": None, "vocab": SMALL_VOCAB, "merge_init": 0.02, "merge_relative": False, "steps": 20, **kw}
    return Case(id, peft, sized(expected), **kw)


def peft_configs():
    import peft

    c = "CAUSAL_LM"
    return {
        "prompt_tuning": lambda: peft.PromptTuningConfig(task_type=c, num_virtual_tokens=N),
        "p_tuning_mlp": lambda: peft.PromptEncoderConfig(task_type=c, num_virtual_tokens=N),
        "p_tuning_lstm": lambda: peft.PromptEncoderConfig(task_type=c, num_virtual_tokens=N, encoder_hidden_size=H,
                                                          encoder_reparameterization_type="LSTM"),
        "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type=c, num_virtual_tokens=N, prefix_projection=True,
                                                         encoder_hidden_size=H),
        "p_tuning_v2": lambda: peft.PrefixTuningConfig(task_type=c, num_virtual_tokens=N),
        "ia3": lambda: peft.IA3Config(task_type=c),
        "loha": lambda: peft.LoHaConfig(task_type=c, r=4, alpha=8, target_modules="all-linear"),
        "loha_dropout": lambda: peft.LoHaConfig(task_type=c, r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                                rank_dropout=0.2, module_dropout=0.1),
        "lokr": lambda: peft.LoKrConfig(task_type=c, r=2, alpha=4, target_modules="all-linear"),
        "lokr_both": lambda: peft.LoKrConfig(task_type=c, r=1, alpha=2, decompose_both=True,
                                             target_modules="all-linear"),
        "lokr_factor": lambda: peft.LoKrConfig(task_type=c, r=4, alpha=4, decompose_factor=4, init_weights="lycoris",
                                               target_modules="all-linear"),
        "oft": lambda: peft.OFTConfig(task_type=c, oft_block_size=16, target_modules="all-linear"),
        "oft_exact": lambda: peft.OFTConfig(task_type=c, r=4, oft_block_size=0, use_cayley_neumann=False,
                                            target_modules="all-linear"),
        "oft_coft_shared": lambda: peft.OFTConfig(task_type=c, oft_block_size=16, coft=True, eps=0.3, block_share=True,
                                                  module_dropout=0.25, target_modules="all-linear"),
        "ln_tuning": lambda: peft.LNTuningConfig(task_type=c),
        "trainable_tokens": lambda: peft.TrainableTokensConfig(task_type=c, token_indices=TOKENS),
        "hra": lambda: peft.HRAConfig(task_type=c, r=4, target_modules="all-linear"),
        "hra_gs": lambda: peft.HRAConfig(task_type=c, r=3, apply_GS=True, target_modules="all-linear"),
        "boft": lambda: peft.BOFTConfig(task_type=c, boft_block_size=8, target_modules="all-linear"),
        "fourierft": lambda: peft.FourierFTConfig(task_type=c, n_frequency=200, scaling=10.0, target_modules="all-linear"),
        "fourierft_zeros": lambda: peft.FourierFTConfig(task_type=c, n_frequency=200, scaling=10.0, init_weights=True,
                                                        target_modules="all-linear"),
        "vblora": lambda: peft.VBLoRAConfig(task_type=c, r=4, num_vectors=16, vector_length=16, topk=2,
                                            target_modules="all-linear"),
    }


def parity(name: str) -> Callable[[], Any]:
    return lambda: peft_configs()[name]()


SMALL = {"r": 4, "alpha": 8}
TOKENS = sorted(set(batch_of(0)["input_ids"].flatten().tolist()))  # trainable tokens: the rows the batch uses
VIRTUAL = {"identity_atol": None, "mergeable": False, "overfit_ratio": 0.8}
CONTRACT: dict[str, list[Case]] = {
    "lora": [
        Case("lora", SMALL, lora_expected),
        Case("rslora", {**SMALL, "use_rslora": True}, lora_expected),
        # merge_atol 2e-5: Gaussian A's larger delta put one logit of 1.2M at 1.04e-5 x the largest
        # on an AVX-512 CPU (the fp64 run still checks 1e-9)
        Case("lora_gaussian", {**SMALL, "init": "gaussian"}, lora_expected, merge_atol=2e-5),
        # PiSSA/OLoRA factors are large (sqrt of singular values): fp32 rounding, amplified by the tiny
        # models' large init, reaches ~1.3e-5 of the logits' scale; the fp64 merge run proves exactness
        Case("pissa", {**SMALL, "init": "pissa"}, lora_expected, randomize=("lora_A", "lora_B"),
             identity_atol=2e-4, roundtrip_atol=2e-4, merge_atol=2e-5),
        Case("pissa_fast", {**SMALL, "init": "pissa", "pissa_niter": 4}, lora_expected,
             randomize=("lora_A", "lora_B"), identity_atol=2e-4, roundtrip_atol=2e-4, archs=("llama",)),
        Case("olora", {**SMALL, "init": "olora"}, lora_expected, randomize=("lora_A", "lora_B"),
             identity_atol=2e-4, roundtrip_atol=2e-4),
        Case("lora_fa", {**SMALL, "freeze_a": True}, lora_expected),
        Case("loraplus", {**SMALL, "loraplus_lr_ratio": 16}, lora_expected, lr=2e-3),
        Case("lora_sparsity_dropout", {**SMALL, "sparsity_dropout": 0.1}, lora_expected),
        Case("lora_embeddings", {**SMALL, "targets": "EMB"}, lora_expected),
        Case("lora_fused_qv", {**SMALL, "targets": ["c_attn"], "enable_lora": {"c_attn": [True, False, True]}},
             lora_expected, archs=("gpt2",), lr=2e-2),
        Case("lora_extra_modules", {**SMALL, "additional_targets": ["lm_head"]}, lora_expected,
             randomize=("lora_B", "modules_to_save"), lr=3e-3),
        Case("qlora_nf4", SMALL, lora_expected, model={"quantize": "nf4"}),
        Case("lora_int8", SMALL, lora_expected, model={"quantize": "int8"}, archs=("llama",)),
    ],
    "dora": [
        Case("dora", SMALL, lora_expected),
        Case("dora_exact_norm", {**SMALL, "exact_norm": True}, lora_expected, archs=("llama",)),
        Case("dora_nf4", SMALL, lora_expected, model={"quantize": "nf4"}, archs=("gpt2",)),
    ],
    "vera": [Case("vera", {"r": 16}, vera_expected, randomize=("vera_lambda_b",), lr=5e-2, steps=30,
                  overfit_ratio=0.8, merge_atol=2e-5)],
    "adalora": [
        Case("adalora", {"init_r": 4, "target_r": 2}, adalora_expected, randomize=("lora_E",), lr=3e-2),
        Case("adalora_nf4", {"init_r": 4, "target_r": 2}, adalora_expected, randomize=("lora_E",),
             model={"quantize": "nf4"}, archs=("llama",), lr=3e-2),
    ],
    # PEFT 0.21 has LoHa/LoKr for nn.Linear only (not GPT-2's Conv1D): parity on Llama
    "loha": [
        Case("loha", SMALL, loha_expected, randomize=None, peft_config=parity("loha"), peft_archs=("llama",)),
        Case("loha_nf4", SMALL, loha_expected, randomize=None, model={"quantize": "nf4"}, archs=("llama",)),
        Case("loha_dropout", {**SMALL, "targets": ["q_proj", "v_proj"], "rank_dropout": 0.2, "module_dropout": 0.1},
             loha_expected, randomize=None, archs=("llama",), lr=3e-2, overfit_ratio=0.7,
             peft_config=parity("loha_dropout")),
    ],
    "lokr": [
        Case("lokr", {"r": 2, "alpha": 4}, lokr_expected, randomize=None, peft_config=parity("lokr"),
             peft_archs=("llama",)),
        Case("lokr_both", {"r": 1, "alpha": 2, "decompose_both": True}, lokr_expected, randomize=None,
             archs=("llama",), lr=3e-2, overfit_ratio=0.7, peft_config=parity("lokr_both")),
        Case("lokr_factor", {"r": 4, "alpha": 4, "decompose_factor": 4, "init": "lycoris"}, lokr_expected,
             randomize=None, archs=("llama",), peft_config=parity("lokr_factor")),
    ],
    "oft": [
        Case("oft", {"block_size": 16}, oft_expected, randomize=None, peft_config=parity("oft"),
             peft_archs=("llama",)),
        Case("oft_nf4", {"block_size": 16}, oft_expected, randomize=None, model={"quantize": "nf4"}, archs=("llama",)),
        Case("oft_exact", {"r": 4, "block_size": 0, "use_cayley_neumann": False}, oft_expected, randomize=None,
             archs=("llama",), peft_config=parity("oft_exact")),
        Case("oft_coft_shared", {"block_size": 16, "coft": True, "eps": 0.3, "block_share": True,
                                 "module_dropout": 0.25}, oft_expected, randomize=None, archs=("llama",),
             peft_config=parity("oft_coft_shared")),
    ],
    "ln_tuning": [beyond("ln_tuning", {}, lambda D: {r".+\.ln_tuning_layers\.(weight|bias)": ln_count(D)}, lr=3e-2,
                         overfit_ratio=0.7, peft_config=parity("ln_tuning"))],
    # the head is tied to the embedding in both tiny models: it trains the same rows (counted once)
    "trainable_tokens": [beyond("trainable_tokens", {"token_indices": TOKENS},
                                lambda D: {r".+\.(embed_tokens|wte)\.trainable_tokens_delta": len(TOKENS) * D["d"]},
                                lr=0.1, overfit_ratio=0.7, peft_config=parity("trainable_tokens"))],
    # HRA's paired reflections cancel up to rounding; PEFT 0.21 has no Conv1D HRA
    "hra": [
        beyond("hra", {"r": 4}, lambda D: {r".+\.hra_u": 4 * D["L"] * sum(i for i, _ in linears(D))},
               identity_atol=1e-5, lr=1e-2, peft_config=parity("hra"), peft_archs=("llama",)),
        beyond("hra_gs", {"r": 3, "apply_gs": True}, lambda D: {r".+\.hra_u": 3 * D["L"] * sum(i for i, _ in linears(D))},
               identity_atol=None, archs=("llama",), peft_config=parity("hra_gs")),
    ],
    # BOFT: boft_R m·D·b² = m·in·b and boft_s [out] per layer; PEFT 0.21 computes m > 1 only with its
    # CUDA kernel (tests/test_tuners.py checks the butterfly against PEFT's construction)
    "boft": [
        beyond("boft", {"block_size": 8}, lambda D: {r".+\.boft_R": D["L"] * sum(8 * i for i, _ in linears(D)),
                                                     r".+\.boft_s": D["L"] * sum(o for _, o in linears(D))},
               lr=1e-2, peft_config=parity("boft"), peft_archs=("llama",)),
        beyond("boft_butterfly", {"block_size": 4, "n_butterfly_factor": 2, "module_dropout": 0.1},
               lambda D: {r".+\.boft_R": D["L"] * sum(2 * 4 * i for i, _ in linears(D)),
                          r".+\.boft_s": D["L"] * sum(o for _, o in linears(D))}, lr=1e-2, archs=("llama",)),
    ],
    # FourierFT: n coefficients per layer; N(0, 1) at init (the paper's, PEFT's), so no identity by default; Adam
    # moves each coefficient ~lr per step and ΔW ~ scaling·lr/(out·in), hence lr 1
    "fourierft": [
        beyond("fourierft", {"n_frequency": 200, "scaling": 10.0}, lambda D: {r".+\.fourierft_spectrum":
                                                                          200 * D["L"] * len(linears(D))},
               identity_atol=None, lr=1.0, peft_config=parity("fourierft")),
        beyond("fourierft_zeros", {"n_frequency": 200, "scaling": 10.0, "init": "zeros"},
               lambda D: {r".+\.fourierft_spectrum": 200 * D["L"] * len(linears(D))}, archs=("llama",), lr=1.0,
               peft_config=parity("fourierft_zeros")),
    ],
    # VB-LoRA: the bank N·L once, logits r·N·(in + out)/L per layer; B A is not zero at init
    "vblora": [beyond("vblora", {"r": 4, "num_vectors": 16, "vector_length": 16},
                      lambda D: {r"peftlab_vblora\.vblora_vector_bank": 16 * 16,
                                 r".+\.vblora_logits_(A|B)": D["L"] * sum(4 * 16 * (i + o) // 16 for i, o in linears(D))},
                      identity_atol=None, lr=3e-2, peft_config=parity("vblora"))],
    # LoRA-drop prunes at step 3 of the overfit run (regrouping the optimiser) and saves keep_layers;
    # keep_layers=[1] builds the pruned form directly (layer 0's modules share one pair per kind)
    "lora_drop": [
        Case("lora_drop", {**SMALL, "warmup_steps": 3, "threshold": 0.5}, lora_drop_expected),
        Case("lora_drop_pruned", {**SMALL, "keep_layers": [1]}, lora_drop_expected),
        Case("lora_drop_nf4", {**SMALL, "keep_layers": [0]}, lora_drop_expected, model={"quantize": "nf4"},
             archs=("llama",)),
    ],
    "relora": [Case("relora", {**SMALL, "reset_every": 10, "restart_warmup": 2}, lora_expected, steps=30)],
    "delta_lora": [Case("delta_lora", SMALL, lora_expected, lr=5e-3)],
    "prompt_tuning": [beyond("prompt_tuning", {"num_virtual_tokens": N}, lambda D: {PROMPT: N * D["d"]},
                             lr=0.3, peft_config=parity("prompt_tuning"), **VIRTUAL)],
    "p_tuning": [
        beyond("p_tuning_mlp", {"num_virtual_tokens": N}, lambda D: {PROMPT: N * D["d"] + 3 * (D["d"] ** 2 + D["d"])},
               peft_config=parity("p_tuning_mlp"), **VIRTUAL),
        beyond("p_tuning_lstm", {"num_virtual_tokens": N, "encoder": "lstm", "encoder_hidden_size": H},
               lambda D: {PROMPT: lstm_count(D)}, peft_config=parity("p_tuning_lstm"), **VIRTUAL),
    ],
    "prefix_tuning": [
        beyond("prefix_tuning", {"num_virtual_tokens": N, "encoder_hidden_size": H},
               lambda D: {PROMPT: prefix_count(D, H)}, lr=5e-2, peft_config=parity("prefix_tuning"), **VIRTUAL),
        beyond("prefix_tuning_vocab_init", {"num_virtual_tokens": N, "encoder_hidden_size": H, "init": "vocab"},
               lambda D: {PROMPT: prefix_count(D, H)}, lr=5e-2, archs=("llama",), **VIRTUAL),
    ],
    "p_tuning_v2": [beyond("p_tuning_v2", {"num_virtual_tokens": N}, lambda D: {PROMPT: prefix_count(D, None)},
                           lr=0.1, peft_config=parity("p_tuning_v2"), **VIRTUAL)],
    "adapter": [
        beyond("adapter_serial", {"bottleneck": B}, lambda D: {ADAPTER: adapter_count(D, 2)}, mergeable=False),
        beyond("adapter_parallel", {"bottleneck": B, "placement": "parallel", "scaling": 4.0},
               lambda D: {ADAPTER: adapter_count(D, 2)}, mergeable=False),
        beyond("adapter_drop", {"bottleneck": B, "drop_layers": 1},
               lambda D: {r".+\.(layers|h)\.[1-9]\d*\.(self_attn|attn|mlp)\.adapter_(down|up)\.(weight|bias)":
                          adapter_count(D, 2, dropped=1)}, mergeable=False),
    ],
    "mam": [beyond("mam", {"num_virtual_tokens": N, "encoder_hidden_size": H, "bottleneck": B},
                   lambda D: {PROMPT: prefix_count(D, H), r".+\.mlp\.adapter_(down|up)\..+": adapter_count(D, 1)},
                   lr=5e-2, **{**VIRTUAL, "overfit_ratio": 0.6})],
    # AdapterFusion over two saved task adapters (peft.adapters=TASKS: made by task_adapters on the case's base)
    "adapter_fusion": [beyond("adapter_fusion", {"adapters": "TASKS"},
                              lambda D: {r".+\.fusion_(query|key|value)\.weight": D["L"] * 2 * 3 * D["d"] ** 2},
                              identity_atol=None, mergeable=False, lr=3e-3)],
    "unipelt": [
        beyond("unipelt", {"r": R, "num_virtual_tokens": N, "encoder_hidden_size": H, "bottleneck": B},
               lambda D: {r".+\.(lora_(A|B)|adapter_(down|up)|gate_(lora|adapter|prefix))\.(weight|bias)|"
                          + PROMPT: unipelt_count(D)}, archs=("llama",), lr=5e-2, **{**VIRTUAL, "overfit_ratio": 0.6}),
        beyond("unipelt_gpt2", {"r": R, "num_virtual_tokens": N, "encoder_hidden_size": H, "bottleneck": B,
                                "lora_targets": ["c_attn"]},
               lambda D: {r".+\.(lora_(A|B)|adapter_(down|up)|gate_(lora|adapter|prefix))\.(weight|bias)|"
                          + PROMPT: unipelt_count(D)}, archs=("gpt2",), lr=5e-2, **{**VIRTUAL, "overfit_ratio": 0.6}),
    ],
    # (IA)3 scales in fp32 (PEFT's dtype for ia3_l), also inside an fp64 model
    "ia3": [beyond("ia3", {}, lambda D: {r".+\.ia3_l": ia3_count(D)}, lr=0.1, overfit_ratio=0.6, fp64=False,
                   peft_config=parity("ia3")),
            # a quantised base has no float .weight: the scales are made on its device, merge requantises
            beyond("ia3_nf4", {}, lambda D: {r".+\.ia3_l": ia3_count(D)}, lr=0.1, overfit_ratio=0.6, fp64=False,
                   model={"quantize": "nf4"}, archs=("llama",))],
    "bitfit": [beyond("bitfit", {"add_biases": True}, lambda D: {r".+\.bias": bitfit_count(D)}, lr=0.1,
                      overfit_ratio=0.7)],
    "lisa": [beyond("lisa", {"layers": 1, "interval": 2}, lambda D: {OUTSIDE: outside_count(D),
                                                                     LAYER: layer_count(D)},
                    lr=3e-3, overfit_ratio=0.3)],
    "moe_lora": [
        beyond("moe_lora_soft", {"r": R, "num_experts": 3}, lambda D: {MOE: moe_count(D, [3] * D["L"])},
               mergeable=False, overfit_ratio=0.1),
        beyond("moe_lora_top2", {"r": R, "num_experts": [2, 3], "top_k": 2}, lambda D: {MOE: moe_count(D, [2, 3])},
               mergeable=False, overfit_ratio=0.1),
    ],
    # issue 18's survey methods, part A
    "krona": [
        beyond("krona", {"scale": 2.0}, lambda D: {r".+\.lokr_w(1|2)": krona_count(D, -1)}),
        beyond("krona_factor_nf4", {"factor": 4}, lambda D: {r".+\.lokr_w(1|2)": krona_count(D, 4)},
               model={"quantize": "nf4"}, archs=("llama",)),
    ],
    "compacter": [
        beyond("compacter", {"bottleneck": B, "phm_dim": 4}, lambda D: {COMPACTER: compacter_count(D, 2, 4, 1)},
               mergeable=False),
        beyond("compacter_pp", {"bottleneck": B, "phm_dim": 2, "phm_rank": 2, "sites": ["ffn"]},
               lambda D: {COMPACTER: compacter_count(D, 1, 2, 2)}, mergeable=False, archs=("llama",)),
    ],
    # the router's softmax sums to 1 up to rounding: identity within 1e-5 of the logits' scale
    "mov": [
        beyond("mov", {"num_experts": 3}, lambda D: {r".+\.mov_(experts|router\.weight)": mov_count(D, 3)},
               identity_atol=1e-5, mergeable=False, lr=3e-2, overfit_ratio=0.6),
        beyond("mov_nf4", {"num_experts": 2}, lambda D: {r".+\.mov_(experts|router\.weight)": mov_count(D, 2)},
               identity_atol=1e-5, mergeable=False, lr=3e-2, overfit_ratio=0.6, model={"quantize": "nf4"},
               archs=("llama",)),
    ],
    "loramoe": [
        beyond("loramoe", {"r": R, "num_experts": 4, "expert_groups": [1, 3]},
               lambda D: {MOE: D["L"] * sum(4 * (R * (i + o) + i) for i, o in ffn_linears(D))},
               mergeable=False, overfit_ratio=0.1),
        beyond("loramoe_nf4", {"r": R, "num_experts": 2, "expert_groups": [1, 1]},
               lambda D: {MOE: D["L"] * sum(2 * (R * (i + o) + i) for i, o in ffn_linears(D))},
               mergeable=False, overfit_ratio=0.1, model={"quantize": "nf4"}, archs=("llama",)),
    ],
    "chain_lora": [Case("chain_lora", {**SMALL, "chain_links": 3}, lora_expected, steps=30)],
    "periodic_lora": [Case("periodic_lora", {**SMALL, "unload_every": 8, "unload_momentum": 0.5}, lora_expected,
                           steps=30)],
    # LongLoRA: LoRA on q,k,v,o + the embedding and every norm trained in full; S²-Attn in training (RoPE: llama)
    "longlora": [beyond("longlora", {"r": R, "alpha": 2 * R},
                        lambda D: {r".+\.lora_(A|B)\.weight": D["L"] * R * (4 * D["d"] + 2 * (D["d"] + D["t"])),
                                   r".+\.embed_tokens\.modules_to_save\.weight": D["V"] * D["d"],
                                   r".+norm\.modules_to_save\.weight": (2 * D["L"] + 1) * D["d"]},
                        archs=("llama",), lr=5e-3)],
    "full": [beyond("full", {}, lambda D: {OUTSIDE: outside_count(D), r".+\.(layers|h)\.\d+\..+": D["L"] * layer_count(D)},
                    lr=1e-3)],
}
CASES = [dataclasses.replace(c, method=m) for m, cases in CONTRACT.items() for c in cases]
PARAMS = [pytest.param(c, a, id=f"{c.id}-{a}") for c in CASES for a in c.archs]
PARITY = [p for p in PARAMS if p.values[0].peft_config is not None
          and p.values[1] in (p.values[0].peft_archs or p.values[0].archs)]


# ---------------------------------------------------------------------------- plumbing


_TASK_ADAPTERS: dict[str, list[str]] = {}


def task_adapters(arch: str) -> list[str]:
    """AdapterFusion's inputs: two adapters saved on the 1,024-vocabulary base of ``arch`` (serial b = B;
    parallel b = B/2, s = 2), moved off their init so each changes the output its own way."""
    if arch not in _TASK_ADAPTERS:
        import atexit
        import shutil
        import tempfile

        root = tempfile.mkdtemp(prefix="peftlab-fusion-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        dirs = []
        for i, peft in enumerate([{"bottleneck": B}, {"bottleneck": B // 2, "placement": "parallel", "scaling": 2.0}]):
            case = dataclasses.replace(beyond(f"task{i}", peft, lambda D: {}), method="adapter")
            model, _, cfg = applied(case, arch)
            perturb(model, std=0.2, seed=i + 1)
            dirs.append(str(save_adapter(model, cfg, Path(root) / f"task{i}")))
        _TASK_ADAPTERS[arch] = dirs
    return _TASK_ADAPTERS[arch]


def peft_settings(case: Case, arch: str) -> dict:
    raw = {"method": case.method, **case.peft}
    if raw.get("adapters") == "TASKS":
        raw["adapters"] = task_adapters(arch)
    if raw.get("targets") == "EMB":
        raw["targets"] = {"gpt2": ["c_attn", "wte"], "llama": ["q_proj", "v_proj", "embed_tokens"]}[arch]
    return raw


def base_overrides(case: Case, arch: str, precise: bool = False) -> dict:
    """config_overrides of the case's tiny base on top of conftest's."""
    out = small_vocab(arch) if case.vocab else {}
    return {**out, "initializer_range": case.merge_init} if precise and case.merge_init else out


_BASES: dict[tuple, nn.Module] = {}


def make(case: Case, arch: str, precise: bool = False, seed: int = 0):
    """(fresh base model, method, cfg) for a case (a copy of a cached base: building one costs 10x more)."""
    method = registry.get(case.method)
    cfg = build_dataclass(method.config_cls, peft_settings(case, arch), "peft")
    extra = base_overrides(case, arch, precise)
    key = (arch, seed, tuple(sorted(case.model.items())), tuple(sorted(extra.items())))
    if key not in _BASES:
        mcfg = dataclasses.replace(tiny_model_config(arch, **extra), **case.model)
        _BASES[key], _ = load_model(mcfg, seed=seed, with_tokenizer=False)
    return copy.deepcopy(_BASES[key]), method, cfg


def applied(case: Case, arch: str, precise: bool = False, dtype: torch.dtype | None = None):
    model, method, cfg = make(case, arch, precise)
    if dtype is not None:
        model.to(dtype)
    torch.manual_seed(0)
    method.apply(model, cfg)
    return model, method, cfg


def expected(case: Case, arch: str) -> dict[str, int]:
    """The case's formula over the float base model (a quantised base has the same shapes)."""
    float_case = dataclasses.replace(case, model={k: v for k, v in case.model.items() if k != "quantize"})
    model, _, cfg = make(float_case, arch)
    return case.expected(model, cfg)


def case_batch(case: Case, seed: int = 0) -> dict:
    """The case's batch: ids below 1,000 on the real tokenizers' vocabularies (the LoRA family's
    tolerances were set on it), 3..1,023 on the small vocabulary."""
    return batch_of(seed) if case.vocab else batch_of(seed, low=0, high=1000)


def train(model: nn.Module, case: Case, cfg, steps: int) -> list[float]:
    return train_steps(model, cfg, case_batch(case), steps=steps, lr=case.lr)


def trainable(model: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def grouped(got: dict[str, int], want: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """Sum the trainable sizes per key of ``want`` (an exact name, else a regex it fully matches);
    returns (sums, names no key matches)."""
    sums, stray = dict.fromkeys(want, 0), []
    for name, n in got.items():
        key = name if name in want else next((k for k in want if re.fullmatch(k, name)), None)
        if key is None:
            stray.append(name)
        else:
            sums[key] += n
    return sums, stray


def is_plain(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] in ("torch", "transformers")


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    """Equal when ``atol`` is 0, else within ``atol`` x the largest logit."""
    if atol == 0.0:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=atol * want.abs().max().item(), rtol=0)


# ---------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("case,arch", PARAMS)
def test_identity_at_init(case: Case, arch: str):
    model, method, cfg = make(case, arch)
    batch = case_batch(case)
    before = batch_logits(model, batch)
    torch.manual_seed(0)
    method.apply(model, cfg)
    after = batch_logits(model, batch)
    if case.identity_atol is None:
        assert not torch.equal(after, before), "virtual tokens must change the output"
    else:
        assert_close_scaled(after, before, case.identity_atol)


def lisa_active_layer(model: nn.Module, got: dict[str, int], want: dict[str, int], case: Case) -> dict[str, int]:
    """LISA: exactly ``layers`` decoder layers train, besides everything outside the layers."""
    active = {m.group(2) for n in got if (m := re.match(r".*\.(layers|h)\.(\d+)\.", n))}
    assert len(active) == case.peft["layers"]
    frozen_outside = [n for n, p in model.named_parameters()
                      if not p.requires_grad and not re.match(r".*\.(layers|h)\.\d+\.", n)]
    assert not frozen_outside
    layer = active.pop()
    return {k.replace("{active}", layer): v for k, v in want.items()}


@pytest.mark.parametrize("case,arch", PARAMS)
def test_trainable_names_and_counts(case: Case, arch: str):
    want = expected(case, arch)
    model, _, _ = applied(case, arch)
    got = trainable(model)
    if any("{active}" in k for k in want):
        want = lisa_active_layer(model, got, want, case)
    sums, stray = grouped(got, want)
    assert not stray, f"unexpected trainable tensors: {stray[:5]}"
    assert sums == want
    assert sum(got.values()) == sum(want.values()) > 0
    assert api.param_report(model).trainable == sum(want.values())


def saved_and_loaded(model: nn.Module, method, cfg, case: Case, arch: str, out: Path) -> nn.Module:
    """The model saved as the run saves it and loaded into a fresh base (or as a whole model)."""
    if method.peft_type is None:  # LISA, full: a whole model
        from peftlab.config import Config, ModelConfig
        from peftlab.train.loop import save_artifact

        path = save_artifact(model, None, Config(peft=cfg), out)
        return load_model(ModelConfig(name=str(path)), with_tokenizer=False)[0]
    save_adapter(model, cfg, out / "adapter")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == method.peft_type
    keys = set(safe_open_keys(out / "adapter" / WEIGHTS_NAME))
    prompt_keys = {"prompt_embeddings"} if hasattr(model, "prompt_encoder") else set()
    assert prompt_keys <= keys  # PEFT's names: the folded virtual tokens, the rest under PEFT's prefix
    model_level = {"base_model.vblora_vector_bank"}  # PEFT's names of tensors held by the model, not a layer
    assert all(k.startswith("base_model.model.") for k in keys - prompt_keys - model_level)
    fresh, _, _ = make(case, arch)  # the same base; the method's tensors can only come from the file
    load_adapter(fresh, out / "adapter")
    return fresh


def safe_open_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("case,arch", PARAMS)
def test_save_load_roundtrip(case: Case, arch: str, tmp_path):
    model, method, cfg = applied(case, arch)
    train(model, case, cfg, steps=6)  # trained tensors (and AdaLoRA masks, ReLoRA restarts, LISA switches)
    if case.randomize is None:
        perturb(model)  # every trainable tensor off its init, however little a step moved it
    if method.finalize is not None:
        before = batch_logits(model, case_batch(case))
        method.finalize(model, cfg)
        assert torch.equal(batch_logits(model, case_batch(case)), before), "folding the encoder changed the output"
    batch = case_batch(case, seed=3)
    want = batch_logits(model, batch)
    fresh = saved_and_loaded(model, method, cfg, case, arch, tmp_path)
    assert_close_scaled(batch_logits(fresh, batch), want, case.roundtrip_atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case,arch", PARAMS)
def test_merge_equals_unmerged_and_is_explicit(case: Case, arch: str, dtype: torch.dtype, tmp_path):
    """fp32 within ``merge_atol`` (x the logits' scale when ``merge_relative``); fp64 within 1e-9 (the same way)."""
    if dtype == torch.float64 and case.model.get("quantize"):
        pytest.skip("a quantised base computes in the dtype it was loaded in (fp32 here)")
    if dtype == torch.float64 and not case.mergeable:
        pytest.skip("nothing to merge: the fp32 run checks the refusal")
    if dtype == torch.float64 and not case.fp64:
        pytest.skip("the method computes in fp32 even in an fp64 model")
    model, _, cfg = applied(case, arch, precise=True, dtype=dtype)
    if case.randomize is None:
        perturb(model)
    else:
        randomize(model, names=case.randomize)
    batch = case_batch(case)
    ref = batch_logits(model, batch)
    model.train()
    model.eval()
    assert not any(getattr(m, "merged", False) for m in model.modules()), ".eval()/.train() must never merge"
    assert torch.equal(batch_logits(model, batch), ref)
    if not case.mergeable:
        with pytest.raises(ConfigError, match="cannot be merged"):
            api.merge(model, cfg)
        return
    api.merge(model, cfg)
    odd = sorted({type(m).__name__ for m in model.modules() if not is_plain(m)})
    assert not odd, f"merge left non-plain modules: {odd}"
    scale = max(1.0, ref.abs().max().item()) if case.merge_relative else 1.0
    atol = (case.merge_atol if dtype == torch.float32 else 1e-9) * scale
    torch.testing.assert_close(batch_logits(model, batch), ref, atol=atol, rtol=0)
    if dtype == torch.float32:  # the merged model is a plain HF model: it saves and reloads as one
        from transformers import AutoModelForCausalLM

        model.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        torch.testing.assert_close(batch_logits(reloaded, batch), ref, atol=atol, rtol=0)


@pytest.mark.parametrize("case,arch", PARAMS)
def test_overfits_one_batch(case: Case, arch: str):
    model, _, cfg = applied(case, arch)
    torch.manual_seed(0)
    losses = train(model, case, cfg, steps=case.steps)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < case.overfit_ratio * losses[0], f"{case.id}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("case,arch", PARAMS)
def test_params_json(case: Case, arch: str, capsys):
    from peftlab.commands import params

    overrides = tiny_overrides(arch, **base_overrides(case, arch))
    for k, v in peft_settings(case, arch).items():
        text = yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
        overrides.append(f"peft.{k}={text}")
    overrides += [f"model.{k}={v}" for k, v in case.model.items()]
    assert params.run(argparse.Namespace(args=overrides, json=True)) == 0
    report = json.loads(capsys.readouterr().out)
    model, _, _ = applied(case, arch)
    total = sum(p.numel() for p in model.parameters()) + sum(
        getattr(m, "quantized_numel", 0) for m in model.modules())
    assert report["trainable"] == sum(expected(case, arch).values())
    assert report["total"] == total  # the base (a quantised weight counted as its elements) + the adapter


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("case,arch", PARAMS)
def test_generation_cache_padding(case: Case, arch: str):
    model, _, _ = applied(case, arch)
    perturb(model, std=0.2)
    model.eval()
    prompts = [[11, 12, 13, 14, 15, 16], [21, 22, 23], [31, 32, 33, 34]]
    ids, mask = left_padded(prompts)
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
        uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)[:, ids.shape[1]:]
        alone = [model.generate(input_ids=torch.tensor([p]), **kw)[0, len(p):].tolist() for p in prompts]
        # peftlab's own decoder (eval's generate, GRPO's rollouts) takes the model only where it decodes the
        # same tokens: a method it cannot see (virtual tokens in a wrapped backbone) must send it to HF
        lean = decode.lean_greedy(model, ids, mask, 5, [], 0)[:, ids.shape[1]:] if decode.supports(model) else cached
    assert cached.tolist() == uncached.tolist() == alone == lean.tolist()


# ---------------------------------------------------------------------------- parity with HF PEFT


def real_token_logits(out: torch.Tensor, t: int) -> torch.Tensor:
    return out[:, -t:]  # PEFT's prompt tuning returns logits for the virtual positions too


def peft_logits(theirs, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        out = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return real_token_logits(out, batch["input_ids"].shape[1])


@pytest.mark.parametrize("case,arch", PARITY)
def test_peft_loads_our_adapter(case: Case, arch: str, tmp_path):
    from peft import PeftModel

    model, method, cfg = applied(case, arch, precise=True)  # well-conditioned: 1e-5 is meaningful
    perturb(model)
    if method.finalize is not None:
        method.finalize(model, cfg)
    save_adapter(model, cfg, tmp_path)
    theirs = PeftModel.from_pretrained(make(case, arch, precise=True)[0], tmp_path)
    batch = case_batch(case)
    batch["attention_mask"][1, 8:] = 0  # right padding, as in training
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(batch_logits(model, batch)[keep], peft_logits(theirs, batch)[keep], atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("case,arch", PARITY)
def test_we_load_peft_adapter(case: Case, arch: str, tmp_path):
    from peft import get_peft_model

    theirs = get_peft_model(make(case, arch, precise=True)[0], case.peft_config())
    perturb(theirs)  # PEFT initialises (IA)3 at ones; move everything off its init
    theirs.save_pretrained(tmp_path)
    ours = make(case, arch, precise=True)[0]
    cfg = load_adapter(ours, tmp_path)
    assert cfg.method == case.method
    batch = case_batch(case, seed=5)
    theirs.eval()
    torch.testing.assert_close(batch_logits(ours, batch), peft_logits(theirs, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning"])
def test_generate_matches_peft(name, tmp_path):
    """Greedy generation (KV cache on) equals PEFT's greedy decoding for an unpadded prompt.

    PEFT's reference is its model's forward, one token at a time over the whole sequence (no cache):
    PEFT 0.21.2's own cached ``generate`` for prompt/prefix methods disagrees with its forward under
    transformers 5.25 (which renamed the cache argument to ``cache``), so it cannot be the oracle."""
    from peft import PeftModel

    case = next(c for c in CASES if c.id == name)
    model, method, cfg = applied(case, "llama")
    perturb(model, std=0.2)
    if method.finalize is not None:
        method.finalize(model, cfg)
    save_adapter(model, cfg, tmp_path)
    theirs = PeftModel.from_pretrained(make(case, "llama")[0], tmp_path).eval()
    ids = torch.tensor([[11, 12, 13, 14, 15]])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        ref = ids
        for _ in range(6):
            step = theirs(input_ids=ref, attention_mask=torch.ones_like(ref)).logits[:, -1]
            ref = torch.cat([ref, step.argmax(-1, keepdim=True)], dim=1)
        out = model.eval().generate(input_ids=ids, **kw)
    assert out[0, 5:].tolist() == ref[0, 5:].tolist()


# ---------------------------------------------------------------------------- every method is in, and documented


def contract_gaps(registered: list[str], contract: dict[str, list]) -> list[str]:
    """What keeps the contract from covering exactly the registered methods."""
    gaps = [f"registered method {m!r} has no contract entry" for m in sorted(set(registered) - set(contract))]
    gaps += [f"contract entry {m!r} names no registered method" for m in sorted(set(contract) - set(registered))]
    return gaps + [f"contract entry {m!r} has no case" for m, cases in contract.items() if not cases]


DOC_NAME = re.compile(r"`(?:peft\.method=)?([a-z0-9_]+)`")


def undocumented(registered: list[str], doc: str) -> list[str]:
    """Methods with no section: a heading of docs/methods.md that names the method in backticks,
    as `peft.method=NAME` or `NAME` (e.g. "## LoRA — `peft.method=lora`", "### BitFit (`bitfit`)")."""
    documented = {name for line in doc.splitlines() if line.startswith("#") for name in DOC_NAME.findall(line)}
    return sorted(set(registered) - documented)


def test_every_registered_method_has_one_contract_entry():
    assert contract_gaps(registry.names(), CONTRACT) == []
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    # the check itself: a missing entry and an entry for no registered method both fail
    assert contract_gaps(["lora", "new"], {"lora": [1], "gone": [1]}) == [
        "registered method 'new' has no contract entry", "contract entry 'gone' names no registered method"]


def overview_rows(doc: str) -> set[str]:
    """Methods named in the first cell of a row of docs/methods.md's "Every method at a glance" table."""
    section = doc.split("## Every method at a glance", 1)[1].split("\n## ", 1)[0]
    return {m.group(1) for line in section.splitlines() if (m := re.match(r"\| `([a-z0-9_]+)`", line))}


def test_every_registered_method_is_in_the_overview_table():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    assert sorted(set(registry.names()) - overview_rows(doc)) == []
    assert overview_rows("## Every method at a glance\n| `lora` | x |\n## Next\n| `gone` |") == {"lora"}


def test_every_registered_method_has_a_docs_section():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    assert undocumented(registry.names(), doc) == []
    # the check itself: a name only in the prose (not in a heading) is not a section
    assert undocumented(["lora", "bitfit", "new"], "## LoRA — `peft.method=lora`\n### BitFit (`bitfit`)\n`new`") == [
        "new"]
