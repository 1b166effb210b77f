"""Trainable tokens: train only chosen rows of the embedding (e.g. the rows of added special tokens).

Hugging Face PEFT's ``TrainableTokens`` (PEFT >= 0.15), the sparse form of training the whole
embedding matrix for a few new tokens.

    E'[v] = T[j]  if v = ids[j],   else E[v]          T [k, d] trainable, starts at E[ids]

``trainable_tokens_delta`` [k, d] (PEFT's name; it holds the new rows themselves, not a difference)
starts as a copy of the selected rows, so the model starts as the base. Only k·d values train and
are saved — not the V·d of a fully trained embedding. When the LM head shares the embedding's weight
(tied embeddings), the head is wrapped too and uses the same T: logits[..., ids[j]] = h · T[j]
(+ its bias). Files hold T under both names, as PEFT writes them (peft_type ``TRAINABLE_TOKENS``).

The rows must exist in the base: resize the embeddings for new tokens before training (and before
loading such an adapter). Merging writes T into the rows of E (and so into a tied head; exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..model.params import freeze
from ..model.targets import find_targets, set_submodule
from ..registry import register
from . import peft_format

OWN = "trainable_tokens_delta"


@dataclass
class TrainableTokensConfig:
    method: str = "trainable_tokens"
    token_indices: list[int] = field(default_factory=list)  # ids of the rows to train
    targets: str | list[str] | None = None  # None: the input embedding (and a head tied to it)
    init_from: str | None = None
    merge_first: list[str] | None = None

    def validate(self) -> None:
        if not self.token_indices:
            raise ConfigError("peft.token_indices is empty; list the token ids whose embedding rows should train, "
                              "e.g. peft.token_indices=[49152,49153] (tokenizer.convert_tokens_to_ids(...))")
        if len(set(self.token_indices)) != len(self.token_indices):
            raise ConfigError(f"peft.token_indices lists an id twice: {self.token_indices}")


class TrainableTokens(nn.Module):
    """An embedding (ids [...] -> [..., d]) or an output head ([..., d] -> [..., V]) whose rows ``ids``
    are replaced by ``trainable_tokens_delta`` [k, d]; ``share`` gives it the rows of another wrapper."""

    def __init__(self, base_layer: nn.Module, ids: list[int], path: str, share: TrainableTokens | None = None):
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        bad = [i for i in ids if not 0 <= i < w.shape[0]]
        if bad:
            raise ConfigError(f"peft.token_indices has {bad[0]}, outside the {w.shape[0]} rows of {path!r}; "
                              "resize the embeddings for added tokens first")
        self.register_buffer("ids", torch.tensor(ids, device=w.device), persistent=False)
        lookup = torch.full((w.shape[0],), -1, dtype=torch.long, device=w.device)
        lookup[self.ids] = torch.arange(len(ids), device=w.device)
        self.register_buffer("slot", lookup, persistent=False)  # vocabulary id -> row of T, or -1
        self.shared = share is not None  # a tied head: the rows are the embedding wrapper's
        self.trainable_tokens_delta = share.trainable_tokens_delta if share else nn.Parameter(w[self.ids].detach().clone())
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        rows = self.trainable_tokens_delta
        if isinstance(self.base_layer, nn.Embedding):
            slot = self.slot[x]
            scale = getattr(self.base_layer, "embed_scale", None)  # scaled embeddings (Gemma)
            new = rows[slot.clamp(min=0)] * (scale if scale is not None else 1)
            return torch.where((slot >= 0).unsqueeze(-1), new.to(out.dtype), out)
        new = x.to(rows.dtype) @ rows.T  # [..., k]: the logits of the trained rows
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            new = new + bias[self.ids].to(new.dtype)
        return out.index_copy(-1, self.ids, new.to(out.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """E[ids] <- T (a tied head shares E, so it changes with it)."""
        w = self.base_layer.weight
        w.index_copy_(0, self.ids, self.trainable_tokens_delta.to(w.dtype))
        self.merged = True

    def extra_repr(self) -> str:
        return f"tokens={len(self.ids)}, merged={self.merged}"


def apply(model: nn.Module, cfg: TrainableTokensConfig) -> None:
    freeze(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    paths = {m: n for n, m in model.named_modules()}
    if cfg.targets is None:
        targets = [paths[emb]]
    else:
        targets = find_targets(model, cfg.targets, kinds=(nn.Embedding, nn.Linear))
    wrapped = {}
    for path in targets:
        wrapped[path] = TrainableTokens(model.get_submodule(path), list(cfg.token_indices), path)
        set_submodule(model, path, wrapped[path])
    emb_path = paths.get(emb)
    tied = head is not None and emb is not None and head.weight is emb.weight
    if tied and emb_path in wrapped and paths[head] in wrapped:
        raise ConfigError(f"peft.targets names both {emb_path!r} and {paths[head]!r}, which share one weight (tied "
                          f"embeddings): their rows cannot train apart; name only {emb_path!r} (the head follows it)")
    if tied and emb_path in wrapped and paths[head] not in wrapped:
        set_submodule(model, paths[head], TrainableTokens(head, list(cfg.token_indices), paths[head],
                                                          share=wrapped[emb_path]))


def merge(model: nn.Module) -> None:
    """Write the trained rows into the weights and put the plain modules back (ties kept)."""
    for path, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, TrainableTokens)]:
        layer.merge()
        set_submodule(model, path, layer.base_layer)


def to_peft_config(cfg: TrainableTokensConfig, model: nn.Module) -> dict:
    # a tied head is PEFT's to find, as it was ours: only the wrappers that own their rows are listed
    listed = [n for n, m in model.named_modules() if isinstance(m, TrainableTokens) and not m.shared]
    return {
        "peft_type": "TRAINABLE_TOKENS",
        "task_type": "CAUSAL_LM",
        "token_indices": list(cfg.token_indices),
        "target_modules": listed[0] if len(listed) == 1 else listed,
        "init_weights": True,
        "inference_mode": True,
    }


def from_peft_config(d: dict) -> TrainableTokensConfig:
    ids = d.get("token_indices")
    if not ids:
        raise ConfigError("adapter_config.json has no token_indices")
    targets = d.get("target_modules")
    if isinstance(targets, str) and targets:
        targets = [targets]  # PEFT writes one module path as a plain string
    return TrainableTokensConfig(token_indices=[int(i) for i in ids], targets=list(targets) if targets else None)


def to_peft_keys(state: dict) -> dict:
    """PEFT's names; a tied head's rows (the embedding's tensor itself) as a copy, since a safetensors
    file holds no tensor twice."""
    seen: set[int] = set()
    out = {}
    for k, v in peft_format.to_peft_keys(state).items():
        out[k] = v.detach().clone() if id(v) in seen else v
        seen.add(id(v))
    return out


register(peft_format.family_method("trainable_tokens", TrainableTokensConfig, apply, (OWN,), merge=merge,
                                   peft_type="TRAINABLE_TOKENS", to_peft_config=to_peft_config,
                                   from_peft_config=from_peft_config, to_peft_keys=to_peft_keys))
