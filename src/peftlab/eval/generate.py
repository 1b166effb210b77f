"""Batched generation with the training template.

Prompts are encoded exactly as the training prefix (``Encoder.prompt_ids``), left-padded into
batches, and continued with KV caching. An fp32 Llama-family model decodes through the lean
decoder (model/decode.py: greedy gives the same tokens as HF ``generate``, without its per-token
overhead; sampling, ``temperature`` > 0 with ``top_p``, draws from a generator seeded by ``seed``,
exactly as GRPO's rollouts do); other models use Hugging Face ``generate``.
``lookup`` > 0 (greedy only) decodes one prompt at a time with prompt-lookup speculative decoding
(model/lookup.py: up to ``lookup`` tokens drafted from the text so far, checked in one forward),
or on a model the lean decoder does not support, HF ``generate(prompt_lookup_num_tokens=lookup)``.
Only the new tokens are decoded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..data.prompts import stop_token_ids  # noqa: F401  (its old home: callers import it from here)
from ..model.lookup import check_setting, lookup_greedy
from . import decode


def load_for_generation(run: str | None, adapter: str | None, cfg_args: list[str]):
    """(model, tokenizer, encoder, cfg) for a run dir, an adapter, or a base model.

    ``cfg_args`` is the command line's ``[CONFIG] [key=value ...]``; with a run, its config.yaml
    replaces CONFIG and the overrides apply on top."""
    from ..config import split_config_args
    from ..configure import load_config
    from ..data.tokenize import Encoder
    from ..export.adapter import load_adapter
    from ..model.load import load_model
    from ..rundir import run_artifact, run_config

    path, overrides = split_config_args(cfg_args)
    if run:
        cfg = run_config(run, overrides)
        artifact = run_artifact(run)
        adapter = None if artifact is not None and (artifact / "config.json").is_file() else str(Path(run) / "adapter")
        if adapter is None:  # full fine-tuning: the run's model/ is the model
            cfg.model.name = str(artifact)
            cfg.model.config_overrides = {}
    else:
        cfg = load_config(path, overrides)
    model, tok = load_model(cfg.model, seed=cfg.train.seed)
    if adapter:
        load_adapter(model, adapter)
    encoder = Encoder(tok, cfg.data.template, cfg.data.max_length, cfg.data.system)
    return model, tok, encoder, cfg


def _as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, encoder, prompts: list, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8, seed: int | None = None,
             lookup: int = 0) -> list[str]:
    """Answers for ``prompts`` (strings, or lists of {role, content} messages ending with a user turn).
    ``lookup`` > 0: prompt-lookup decoding, one prompt at a time (greedy only)."""
    check_setting(lookup, temperature)
    if lookup:
        batch_size = 1  # speculative verification is per sequence
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = stop_token_ids(tokenizer, encoder)
    use_cache = getattr(model.config, "use_cache", True)
    model.config.use_cache = True
    generator = None
    if seed is not None:
        torch.manual_seed(seed)
        generator = torch.Generator(device).manual_seed(seed)
    sampling = temperature > 0
    # fp32: token for token HF's greedy output (tested on the real model, batch 1 and padded
    # batches); half precision can round differently in padded batches, so HF decides there
    lean = decode.supports(model) and model.dtype == torch.float32
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [encoder.prompt_ids(_as_messages(p)) for p in prompts[start:start + batch_size]]
            input_ids, mask = decode.left_pad(chunk, pad_id)
            width = input_ids.shape[1]
            if lookup and lean:
                out = lookup_greedy(model, input_ids.to(device), mask.to(device), max_new_tokens, sorted(eos_ids),
                                    lookup)
            elif lookup:
                out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                     top_k=None, pad_token_id=pad_id, eos_token_id=sorted(eos_ids),
                                     prompt_lookup_num_tokens=lookup)
            elif lean and not sampling:
                out = decode.lean_greedy(model, input_ids.to(device), mask.to(device), max_new_tokens,
                                         sorted(eos_ids), pad_id)
            else:  # sampling: the same decoder and draws as GRPO's rollouts (model/decode.py)
                out = decode.continue_batch(model, input_ids.to(device), mask.to(device), max_new_tokens,
                                            sorted(eos_ids), pad_id, temperature, top_p, generator, lean)
            for row in out[:, width:]:
                outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    return outputs
