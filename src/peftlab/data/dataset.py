"""From ``data.*`` settings to tokenised train and eval examples.

Steps: read records (``formats``) -> encode with the template (``tokenize``) -> drop examples
with nothing to learn (counted) -> a deterministic train/eval split (seeded permutation).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..errors import DataError
from .collate import collate
from .formats import BadRecords, Conversation, load_conversations
from .tokenize import Encoder, Example


@dataclass
class DataStats:
    records: int = 0
    train: int = 0
    eval: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    bad: BadRecords = field(default_factory=BadRecords)

    def summary(self) -> str:
        parts = [f"{self.records} records", f"{self.train} train", f"{self.eval} eval"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.dropped_no_labels:
            parts.append(f"{self.dropped_no_labels} dropped (nothing left to learn after truncation)")
        if self.bad.count:
            parts.append(f"{self.bad.count} bad records skipped")
        return ", ".join(parts)


def read_conversations(path: str, fmt: str, bad: BadRecords | None) -> list[Conversation]:
    if path.startswith("builtin:"):
        from .builtin import builtin_conversations

        return builtin_conversations(path.split(":", 1)[1])
    return load_conversations(path, fmt, bad)


def split_count(n: int, eval_split: float) -> int:
    if eval_split <= 0:
        return 0
    k = int(eval_split) if eval_split >= 1 else max(1, round(n * eval_split))
    if k >= n:
        raise DataError(f"data.eval_split={eval_split} leaves no training records out of {n}")
    return k


def encode_all(convs: list[Conversation], encoder: Encoder, stats: DataStats) -> list[Example]:
    out = []
    for conv in convs:
        ex = encoder.encode(conv)
        stats.truncated += ex.truncated
        if ex.n_labels == 0:
            stats.dropped_no_labels += 1
            continue
        out.append(ex)
    return out


@dataclass
class Datasets:
    train: list[Example]
    eval: list[Example]
    stats: DataStats
    encoder: Encoder
    eval_records: list[Conversation]  # the conversations behind ``eval``, in the same order
    pad_id: int = 0

    def collate(self, examples: list[Example]) -> dict:
        """Examples -> one micro-batch of tensors (the loop never builds batches itself)."""
        return collate(examples, self.pad_id)


def _encode_pairs(convs: list[Conversation], encoder: Encoder, stats: DataStats):
    examples, kept = [], []
    for conv in convs:
        ex = encode_all([conv], encoder, stats)
        if ex:
            examples.append(ex[0])
            kept.append(conv)
    return examples, kept


def build_datasets(data_cfg, tokenizer, seed: int) -> Datasets:
    """Train and eval examples, counts and the encoder for a DataConfig."""
    stats = DataStats()
    bad = stats.bad if data_cfg.skip_bad_records else None
    path = data_cfg.path or "builtin:tasks"
    convs = read_conversations(path, data_cfg.format, bad)
    encoder = Encoder(tokenizer, data_cfg.template, data_cfg.max_length, data_cfg.system, data_cfg.train_on_prompt)
    if data_cfg.eval_path:
        train_convs = convs
        eval_convs = read_conversations(data_cfg.eval_path, data_cfg.format, bad)
    else:
        order = list(range(len(convs)))
        random.Random(seed).shuffle(order)
        k = split_count(len(convs), data_cfg.eval_split)
        eval_idx = set(order[:k])
        eval_convs = [c for i, c in enumerate(convs) if i in eval_idx]
        train_convs = [c for i, c in enumerate(convs) if i not in eval_idx]
    stats.records = len(convs)
    train = encode_all(train_convs, encoder, stats)
    evals, eval_records = _encode_pairs(eval_convs, encoder, stats)
    if not train:
        raise DataError(f"{path}: no training example has a token to learn (check data.max_length)")
    stats.train, stats.eval = len(train), len(evals)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Datasets(train, evals, stats, encoder, eval_records, pad_id)
