"""Batched generation with the training template.

Prompts are encoded exactly as the training prefix (``Encoder.prompt_ids``), left-padded into
batches, and continued with KV caching. Greedy decoding of an fp32 Llama-family model goes through
``decode.lean_greedy`` (the same tokens as HF ``generate``, without its per-token overhead);
sampling (``temperature`` > 0, with ``top_p``) and other models use Hugging Face ``generate``.
Only the new tokens are decoded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

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


def stop_token_ids(tokenizer, encoder) -> set[int]:
    """The end-of-sequence id and every template stop string that is a single token."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for s in encoder.renderer.stop_strings:
        tok = tokenizer(s, add_special_tokens=False).input_ids
        if len(tok) == 1:
            ids.add(tok[0])
    return ids


def _as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, encoder, prompts: list, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8, seed: int | None = None) -> list[str]:
    """Answers for ``prompts`` (strings, or lists of {role, content} messages ending with a user turn)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = stop_token_ids(tokenizer, encoder)
    use_cache = getattr(model.config, "use_cache", True)
    model.config.use_cache = True
    if seed is not None:
        torch.manual_seed(seed)
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [encoder.prompt_ids(_as_messages(p)) for p in prompts[start:start + batch_size]]
            width = max(len(c) for c in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, ids in enumerate(chunk):
                input_ids[i, width - len(ids):] = torch.tensor(ids)
                mask[i, width - len(ids):] = 1
            sampling = temperature > 0
            # fp32: token for token HF's output (tested on the real model, batch 1 and padded
            # batches); half precision can round differently in padded batches, so HF decides there
            if not sampling and decode.supports(model) and model.dtype == torch.float32:
                out = decode.lean_greedy(model, input_ids.to(device), mask.to(device), max_new_tokens,
                                         sorted(eos_ids), pad_id)
            else:
                out = None
            out = out if out is not None else model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=sampling,
                temperature=temperature if sampling else None,
                top_p=top_p if sampling else None,
                top_k=None,
                pad_token_id=pad_id,
                eos_token_id=sorted(eos_ids),
            )
            for row in out[:, width:]:
                outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    return outputs
