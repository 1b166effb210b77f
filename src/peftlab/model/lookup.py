"""Prompt-lookup speculative decoding: batch-1 greedy decoding that checks several tokens per forward.

Saxena 2023, "Prompt Lookup Decoding" (github.com/apoorvumang/prompt-lookup-decoding); Hugging
Face ``generate(prompt_lookup_num_tokens=k)`` implements the same idea. At batch 1 in fp32 a
token costs one pass over every weight (matrix-vector products, benchmarks/README.md), and a
forward over k+1 positions reads the same weights once: on the 2-core EPYC it costs 1.5-2x a
one-token step (k = 4-10), not k+1 steps.
Text that copies from its prompt (rewriting, extraction, code edits, quoting) can be drafted for
free by looking the last n-gram up in the text so far:

    draft:   d_1..d_k = the tokens that followed the earliest earlier occurrence of the
             sequence's last n-gram (n = max_ngram .. 1, the longest that occurs)
    verify:  one forward over [x_last, d_1..d_k] -> greedy choices p_0..p_k, where p_i is the
             model's next token after x_last, d_1..d_i
    accept:  j = the longest prefix with d_i == p_{i-1}; emit d_1..d_j, p_j     (j + 1 tokens)

Every emitted token is the model's own greedy choice given the tokens before it, so the output is
plain greedy decoding's — exactly in exact arithmetic; in fp32 a forward over k+1 positions can
round differently from k+1 one-token forwards (a different GEMM shape), which only matters at a
near tie between the top two logits (benchmarks/README.md measures how often). The cache rollback
after a partial acceptance is a length: the K/V of the rejected drafts d_{j+1}..d_k stay in the
preallocated cache past the valid length, are never attended to (the causal mask stops at each
query's own position) and are overwritten by the next forward, which starts at the first
position they took.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .decode import _rms, lean_weights, linear, run_layers

VERIFY_SPLIT_ROWS = 16  # verify forwards of up to this many positions split their products over the threads


def check_setting(lookup: int, temperature: float = 0.0, flag: str = "lookup",
                  temperature_flag: str = "temperature") -> None:
    """A ConfigError naming ``flag`` unless ``lookup`` is 0 (off), or a draft length >= 1 with greedy
    decoding (every caller: eval.generate, the serving engine, chat, serve, eval)."""
    if lookup < 0:
        raise ConfigError(f"{flag} is the number of tokens drafted per forward (>= 1, 0 = off); got {lookup}")
    if lookup and temperature > 0:
        raise ConfigError(f"prompt-lookup decoding ({flag} {lookup}) is greedy only; got {temperature_flag} "
                          f"{temperature}. Set {temperature_flag} to 0 or {flag} to 0")


def draft(seq: torch.Tensor, k: int, max_ngram: int = 2) -> torch.Tensor:
    """Up to ``k`` draft tokens for the 1-D token sequence ``seq`` [L]: the continuation of the
    earliest earlier occurrence of its last n-gram, trying n = max_ngram down to 1 (HF's
    PromptLookupCandidateGenerator's rule); empty when nothing matches or k <= 0."""
    length = seq.shape[0]
    if k <= 0:
        return seq[:0]
    for n in range(min(max_ngram, length - 1), 0, -1):
        windows = seq[:length - 1].unfold(0, n, 1)  # [L - n, n]: every n-gram followed by a token
        hits = (windows == seq[length - n:]).all(1).nonzero()
        if len(hits):
            start = int(hits[0]) + n
            return seq[start:start + k]
    return seq[:0]


@torch.inference_mode()
def lookup_greedy(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  eos_ids: list[int], lookup: int = 10, max_ngram: int = 2,
                  stats: dict | None = None) -> torch.Tensor:
    """Greedy continuation of one prompt, drafting up to ``lookup`` tokens per forward by prompt
    lookup: input_ids, attention_mask [1, T] -> [1, T + n], n <= max_new_tokens, stopping after
    the first id in ``eos_ids``. Left padding in the prompt is dropped (the output keeps the input
    row as given). ``stats``, when given, receives the counts: forwards (the prefill included),
    verified (forwards that carried a draft), drafted and accepted (draft tokens), new (tokens).
    The model must pass ``decode.supports``."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"prompt-lookup decoding runs one prompt at a time; got a batch of {input_ids.shape[0]} "
                         "(decode the rows one by one, or use lean_greedy for a batch)")
    if lookup < 1 or max_ngram < 1:
        raise ValueError(f"lookup and max_ngram must be >= 1; got lookup={lookup}, max_ngram={max_ngram}")
    if max_new_tokens < 1:
        return input_ids
    lw = lean_weights(model)
    dev, dtype = input_ids.device, lw.embed.dtype
    prompt = input_ids[0][attention_mask[0].bool()]
    t = prompt.shape[0]
    total = t + max_new_tokens
    cos, sin = lw.rotary(lw.embed[:1], torch.arange(total, device=dev)[None])  # [1, total, hd]
    cos, sin = cos[:, None], sin[:, None]
    cache = [torch.zeros(len(lw.layers), 1, lw.n_kv, total, lw.head_dim, dtype=dtype, device=dev)]
    cache.append(torch.zeros_like(cache[0]))
    neg = torch.finfo(dtype).min
    positions = torch.arange(total, device=dev)

    def forward(ids: torch.Tensor, start: int, last_only: bool = False) -> torch.Tensor:
        """Tokens ids [n] at positions start..start+n-1 -> greedy choices [n] (or [1]: the last)."""
        n = ids.shape[0]
        future = positions[None, :start + n] > positions[start:start + n, None]  # query i sees keys <= start + i
        mask = torch.zeros(1, 1, n, start + n, dtype=dtype, device=dev).masked_fill_(future, neg)
        split = 1 if last_only else VERIFY_SPLIT_ROWS  # the prefill's products round as plain decoding's
        x = run_layers(lw, cache, F.embedding(ids[None], lw.embed), cos[:, :, start:start + n],
                       sin[:, :, start:start + n], start, mask, split)[0]
        if last_only:
            x = x[-1:]
        return linear(_rms(x, *lw.final_norm), lw.head, None, split).float().argmax(-1)

    eos = torch.tensor(sorted(set(eos_ids)), dtype=prompt.dtype, device=dev)
    seq = torch.empty(total, dtype=prompt.dtype, device=dev)
    seq[:t] = prompt
    seq[t] = forward(prompt, 0, last_only=True)[0]
    n = t + 1  # tokens in seq; the cache holds the K/V of the first n - 1
    counts = {"forwards": 1, "verified": 0, "drafted": 0, "accepted": 0}
    while n - t < max_new_tokens and not bool(torch.isin(seq[n - 1], eos)):
        room = max_new_tokens - (n - t) - 1  # a draft token past this could never be emitted
        d = draft(seq[:n], min(lookup, room), max_ngram)
        preds = forward(torch.cat([seq[n - 1:n], d]), n - 1)  # [1 + len(d)]
        j = int((d == preds[:-1]).long().cumprod(0).sum())  # drafts accepted
        new = torch.cat([d[:j], preds[j:j + 1]])
        stop = torch.isin(new, eos).nonzero()
        if len(stop):  # an eos inside the accepted run ends the answer there
            new = new[:int(stop[0]) + 1]
        seq[n:n + len(new)] = new
        n += len(new)  # the cache's valid length is now n - 1: the rollback past rejected drafts
        counts["forwards"] += 1
        counts["verified"] += len(d) > 0
        counts["drafted"] += len(d)
        counts["accepted"] += j
    if stats is not None:
        stats.update(counts, new=n - t)
    return torch.cat([input_ids[0], seq[t:n]])[None]
