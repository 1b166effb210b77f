"""GRPO's shared-prompt forward (``grpo.share_prompt``): each prompt runs once for its group.

A micro-batch holds P prompts with G completions each. Prompts are long (~42 tokens with the chat
template's system turn) and completions short, so the plain layout [prompt ; completion] of R = P*G
rows spends most of its forward and backward (and saved activations) on the same prompt G times.
Here:

    prompts [P, Lp] right-padded   -> backbone with a KV cache -> hidden [P, Lp, d], per layer K/V [P, h, Lp, D]
    K/V repeated G times along the batch (``repeat_interleave``: each row's gradient sums back into
        its prompt's K/V, so LoRA on k_proj/v_proj and on every earlier layer trains as before)
    completions [R, Lc-1] right-padded (the last token predicts nothing) -> backbone with that cache,
        position_ids = the prompt's own length + j, attention_mask [R, Lp + Lc-1] = the prompt's
        real tokens and the completion's
    the hidden state that predicts completion token j: the prompt's last real token's (j = 0, one
    per prompt, repeated), the completion forward's position j-1 (j >= 1) -> [R, Lc, d]

With a cache transformers puts the queries after the cache's Lp slots (masking_utils: the query
offset is the cache's length, not the position ids) and ANDs the causal mask with the 2-D mask, so
the prompts' padding sits at slots the 2-D mask removes; RoPE takes the explicit position ids. So
each completion token sees exactly the tokens it sees in the plain layout, at the same positions:
the log-probabilities and gradients equal the plain forward's up to rounding
(tests/test_grpo_share.py).

Where it runs (``share_blocker``): a per-token method on an architecture with plain causal
attention (unpad.per_token_blocker: prompt and prefix methods bring their own keys or cache),
eager or SDPA attention, no gradient checkpointing (transformers turns the cache off there) and no
``train.compile``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..model.kv_cache import cache_arg
from .unpad import per_token_blocker

ATTENTION = ("sdpa", "eager")  # kernels that take the dense 4-D mask built from the 2-D one


def share_blocker(model: nn.Module, method: str, gradient_checkpointing: bool = False,
                  compiled: bool = False) -> str | None:
    """None when ``model`` trained with ``method`` may share each prompt across its group, else why not."""
    return per_token_blocker(model, method, gradient_checkpointing, attention=ATTENTION, compiled=compiled)


def resolve(setting: str, model: nn.Module, method: str, gradient_checkpointing: bool = False,
            compiled: bool = False) -> bool:
    """``grpo.share_prompt`` made concrete: auto -> on where ``share_blocker`` allows it; true where
    it does not -> ConfigError."""
    if setting == "false":
        return False
    why = share_blocker(model, method, gradient_checkpointing, compiled)
    if setting == "true" and why is not None:
        raise ConfigError(f"grpo.share_prompt=true: {why}, so a prompt's keys and values cannot be shared by its "
                          "group's completions exactly; set grpo.share_prompt=auto (shares where it can) or false")
    return why is None


def share_layout(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """The shared forward's fields for P unique prompts and their R = P*G completions (a prompt's
    G completions adjacent): prompt_ids [P, Lp] right-padded, prompt_lengths [P],
    completion_ids [R, Lc] right-padded (Lc = the longest completion, at least 1)."""
    lp = max(len(p) for p in prompts)
    lc = max(1, max(len(c) for c in completions))
    prompt_ids = torch.full((len(prompts), lp), pad_id, dtype=torch.long)
    completion_ids = torch.full((len(completions), lc), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        prompt_ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    for i, c in enumerate(completions):
        completion_ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return {"prompt_ids": prompt_ids, "prompt_lengths": lengths, "completion_ids": completion_ids}


def shared_hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    """[R, Lc, d]: at [r, j] the last hidden state that predicts completion token j of row r
    (batch: prompt_ids [P, Lp], prompt_lengths [P], completion_ids [R, Lc], completion_mask [R, Lc])."""
    from transformers import DynamicCache

    backbone = model.base_model
    prompt_ids, lengths = batch["prompt_ids"], batch["prompt_lengths"]
    cmask = batch["completion_mask"]
    p, lp = prompt_ids.shape
    r, lc = cmask.shape
    g = r // p
    assert g * p == r, f"{r} completions for {p} prompts"
    cache, keyword = DynamicCache(config=backbone.config), cache_arg(backbone)
    # right padding: causal attention alone keeps every real prompt token off the padding after it
    out = backbone(input_ids=prompt_ids, use_cache=True, **{keyword: cache})
    first = out.last_hidden_state[torch.arange(p, device=prompt_ids.device), lengths - 1]  # [P, d]
    first = first.repeat_interleave(g, 0).unsqueeze(1)  # [R, 1, d]
    if lc == 1:
        return first
    cache.batch_repeat_interleave(g)  # every layer's K/V [P, h, Lp, D] -> [R, h, Lp, D]
    real = (torch.arange(lp, device=lengths.device) < lengths[:, None]).long().repeat_interleave(g, 0)
    steps = torch.arange(lc - 1, device=lengths.device)
    rest = backbone(input_ids=batch["completion_ids"][:, :-1], attention_mask=torch.cat([real, cmask[:, :-1]], 1),
                    position_ids=lengths.repeat_interleave(g)[:, None] + steps, use_cache=True, **{keyword: cache})
    return torch.cat([first, rest.last_hidden_state], 1)
