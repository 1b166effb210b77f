"""Helpers for the shipping tests (merge/export, PEFT interop, multi-adapter serving, chat, server).

Tiny bases are saved as real Hugging Face directories (config + safetensors + tokenizer) so the
adapters built on them record a base that anything — peftlab, PEFT, plain transformers, a server
subprocess — can load by path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import peftlab
from conftest import randomize, tiny_model
from peftlab.config import ModelConfig
from peftlab.export.adapter import save_adapter
from peftlab.methods.lora import LoRAConfig
from peftlab.model.load import load_model

SRC = str(Path(peftlab.__file__).resolve().parents[1])


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "peftlab", *args]


def save_tiny_base(arch: str, path: Path, dtype: torch.dtype = torch.float32, **extra) -> Path:
    """A tiny base saved as a HF directory. initializer_range 0.1 gives logits of a real LM's spread
    (std ~0.8); conftest's 0.5 (for learning tests) makes fp32 round-off 10x larger."""
    extra.setdefault("initializer_range", 0.1)
    model, tok = tiny_model(arch, **extra)
    model.to(dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def load_base(path: Path, dtype: str = "float32", tokenizer: bool = False):
    """(model, tokenizer or None); loading the tokenizer costs ~1 s, so only when asked."""
    return load_model(ModelConfig(name=str(path), dtype=dtype), with_tokenizer=tokenizer)


def lora_model(base: Path, r: int = 4, alpha: float = 8.0, targets="all-linear", seed: int = 1,
               use_rslora: bool = False, dtype: str = "float32"):
    """(model with LoRA whose A and B are random, None, LoRAConfig)."""
    model, tok = load_base(base, dtype)
    cfg = LoRAConfig(r=r, alpha=alpha, targets=targets, use_rslora=use_rslora)
    torch.manual_seed(seed)
    peftlab.apply_method(model, cfg)
    randomize(model, names=("lora_B",), std=0.2, seed=seed)
    return model, tok, cfg


def make_adapter(base: Path, out: Path, **kw) -> Path:
    model, _, cfg = lora_model(base, **kw)
    save_adapter(model, cfg, out, base_model_name=str(base))
    return out


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()
