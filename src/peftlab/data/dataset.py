"""From ``data.*`` settings to tokenised train and eval rows.

    sources (data.train names via data.registry, or data.path)     catalog, sources, formats
      -> records, {{placeholders}} filled, exact duplicates removed (counted)
      -> a deterministic train/eval split (seeded permutation) or data.eval_path
      -> data.mix: each dataset's share of the training set (sampling ratios)
      -> sft: encode with the template (tokenize); pretrain: documents -> fixed blocks (packing);
         preference (pairs, KTO records): prompt once + answers (data/preference.py)
      -> data.packing: best-fit-decreasing rows; or data.group_by_length batches
      -> Datasets: .train / .eval rows, .collate(rows) -> tensors, .sampler(...) -> batch order

``stream_examples`` is the same pipeline one record at a time (constant memory, no split or
mixing): it yields the same tokens as in-memory loading in the same order.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import ConfigError, DataError
from . import preference, stream
from .catalog import DatasetSpec, resolve
from .collate import collate
from .formats import BadRecords, Conversation, LabeledAnswer, PreferencePair, fill_placeholders, read_records
from .packing import chunk_blocks, grouped_batches, pack_examples, window_batches
from .sample_types import KEY, TypeLabelError, TypeLabels
from .sampler import BatchSampler, EpochSampler
from .tokenize import Encoder, Example

OBJECTIVES = ("auto", "sft", "pretrain", "preference")


@dataclass
class DataStats:
    records: int = 0
    train: int = 0
    eval: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    dropped_overlong: int = 0
    duplicates: int = 0
    repeated: int = 0  # extra copies drawn by data.mix to reach a dataset's share
    unfilled_placeholders: int = 0  # records still holding {{name}}/{{author}}
    packed_from: int = 0  # examples packed into the train rows (0: no packing)
    objective: str = "sft"
    per_dataset: dict = field(default_factory=dict)  # name -> records read
    bad: BadRecords = field(default_factory=BadRecords)

    def summary(self) -> str:
        parts = [f"{self.records} records", f"{self.train} train", f"{self.eval} eval"]
        if self.objective == "pretrain":
            parts[1:] = [f"{self.train} train blocks", f"{self.eval} eval blocks"]
        if self.packed_from:
            parts[1] = f"{self.train} train rows packed from {self.packed_from} examples"
        counts = [("truncated", self.truncated), ("duplicates removed", self.duplicates),
                  ("dropped (over data.max_length)", self.dropped_overlong),
                  ("dropped (nothing left to learn after truncation)", self.dropped_no_labels),
                  ("repeated by data.mix", self.repeated),
                  ("with unfilled {{name}}/{{author}} (set data.placeholders)", self.unfilled_placeholders),
                  ("bad records skipped", self.bad.count)]
        parts += [f"{n} {what}" for what, n in counts if n]
        return ", ".join(parts)


# ---------------------------------------------------------------------------- records


def dataset_specs(data_cfg) -> list[DatasetSpec]:
    if data_cfg.train and data_cfg.path:
        raise ConfigError("set either data.path (one file) or data.train (a list of datasets), not both")
    items = list(data_cfg.train) or [data_cfg.path or "builtin:tasks"]
    return resolve(items, data_cfg)


def iter_spec(spec: DatasetSpec, data_cfg, bad: BadRecords | None, stats: DataStats | None = None,
              types: TypeLabels | None = None) -> Iterator:
    """Parsed records of one dataset, placeholders filled, the first ``num_samples`` only (with
    ``types``: each one's type label, data/sample_types.py)."""
    if spec.path.startswith("builtin:"):
        from .builtin import builtin_conversations

        records = iter(builtin_conversations(spec.path.split(":", 1)[1]))
        if types is not None:
            raise TypeLabelError(f"{spec.path}: built-in data has no {types.field!r} column to read type labels "
                                 "from; unset peft.type_field or train on your own records")
    else:
        records = read_records(spec.path, spec.format, spec.columns, bad, spec.split, types)
    values = {**dict(data_cfg.placeholders), **spec.placeholders}
    for n, rec in enumerate(records):
        if spec.num_samples is not None and n >= spec.num_samples:
            return
        if fill_placeholders(rec, values) and stats is not None:
            stats.unfilled_placeholders += 1
        yield rec


def record_key(rec) -> bytes:
    """A digest of a record's content (for exact-duplicate removal)."""
    if isinstance(rec, PreferencePair):
        body = [rec.prompt, rec.chosen, rec.rejected, rec.tools]
    elif isinstance(rec, LabeledAnswer):
        body = [rec.prompt, rec.completion, rec.label, rec.tools]
    else:
        body = [rec.messages, rec.tools] + ([rec.extra[KEY]] if KEY in rec.extra else [])  # a type label
    return hashlib.blake2b(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass"),
                           digest_size=16).digest()


def unique(records: Iterator, seen: set | None, stats: DataStats) -> Iterator:
    """``records`` without exact repeats of anything in ``seen`` (counted); ``seen=None`` keeps all."""
    for rec in records:
        if seen is not None:
            key = record_key(rec)
            if key in seen:
                stats.duplicates += 1
                continue
            seen.add(key)
        yield rec


def _read_all(specs: list[DatasetSpec], data_cfg, stats: DataStats, bad, seen: set | None,
              types: TypeLabels | None = None) -> list[tuple[int, object]]:
    out = []
    for d, spec in enumerate(specs):
        records = list(iter_spec(spec, data_cfg, bad, stats, types))
        if not records:
            raise DataError(f"{spec.path}: no usable records" + (f" ({bad.count} bad records skipped)"
                                                                    if bad is not None and bad.count else ""))
        stats.per_dataset[spec.name] = stats.per_dataset.get(spec.name, 0) + len(records)
        out += [(d, rec) for rec in unique(records, seen, stats)]
    return out


def split_count(n: int, eval_split: float) -> int:
    if eval_split <= 0:
        return 0
    k = int(eval_split) if eval_split >= 1 else max(1, round(n * eval_split))
    if k >= n:
        raise DataError(f"data.eval_split={eval_split} leaves no training records out of {n}")
    return k


def mix(records: list[tuple[int, object]], specs: list[DatasetSpec], weights: dict, size: int | None,
        seed: int, stats: DataStats) -> list[tuple[int, object]]:
    """Each dataset's share of ``size`` (default: all training records) by ``weights`` (name -> w):
    drawn without replacement in a seeded order, repeating (counted) only to reach a larger share."""
    names = [s.name for s in specs]
    unknown = [k for k in weights if k not in names]
    missing = [n for n in names if n not in weights]
    if unknown or missing:
        raise ConfigError(f"data.mix must give a weight for every dataset of data.train ({', '.join(names)}); "
                          + (f"unknown: {', '.join(unknown)}" if unknown else f"missing: {', '.join(missing)}"))
    if any(not isinstance(w, (int, float)) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ConfigError(f"data.mix weights must be numbers >= 0 with a positive sum, got {weights}")
    total_w = float(sum(weights.values()))
    size = len(records) if size is None else size
    rng = random.Random(seed)
    out = []
    for d, name in enumerate(names):
        pool = [r for r in records if r[0] == d]
        want = round(size * weights[name] / total_w)
        if want and not pool:
            raise DataError(f"data.mix: dataset {name!r} has no training records left to sample")
        drawn: list = []
        while len(drawn) < want:
            order = pool[:]
            rng.shuffle(order)
            drawn += order[: want - len(drawn)]
        stats.repeated += max(0, want - len(pool))
        out += drawn
    return out


# ---------------------------------------------------------------------------- encoding


def make_encoder(data_cfg, tokenizer) -> Encoder:
    return Encoder(tokenizer, data_cfg.template, data_cfg.max_length, data_cfg.system, data_cfg.train_on_prompt,
                   source_length=data_cfg.source_length, target_length=data_cfg.target_length,
                   overlong=data_cfg.overlong)


def encode_one(rec, encoder: Encoder, stats: DataStats) -> Example | None:
    """An example, or None when it is dropped (counted)."""
    if isinstance(rec, (PreferencePair, LabeledAnswer)):
        raise DataError(f"{rec.source}: a preference record (prompt/chosen/rejected, or KTO's prompt/completion/label) "
                        "cannot be used for supervised fine-tuning; train it with train.objective=dpo (or orpo, "
                        "simpo, kto, reward)")
    ex = encoder.encode(rec)
    if ex.dropped:
        stats.dropped_overlong += 1
        return None
    stats.truncated += ex.truncated
    if ex.n_labels == 0:
        stats.dropped_no_labels += 1
        return None
    if KEY in rec.extra:  # its type label (data/sample_types.py)
        ex.types = (rec.extra[KEY],)
    return ex


def encode_all(convs: list[Conversation], encoder: Encoder, stats: DataStats) -> list[Example]:
    return [ex for ex in (encode_one(c, encoder, stats) for c in convs) if ex is not None]


def refuse_types(types: TypeLabels | None, objective: str) -> None:
    if types is not None and objective != "sft":
        raise ConfigError(f"peft.type_field={types.field!r} labels supervised examples (data.objective=sft); "
                          f"this data is {objective} (pre-training blocks cut across documents), so unset it")


def resolve_objective(data_cfg, records: list) -> str:
    if data_cfg.objective not in OBJECTIVES:
        raise ConfigError(f"data.objective {data_cfg.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if data_cfg.objective != "auto":
        return data_cfg.objective
    if records and all(isinstance(r, (PreferencePair, LabeledAnswer)) for r in records):
        return "preference"
    texts = [isinstance(r, Conversation) and r.is_text for r in records]
    return "pretrain" if texts and all(texts) else "sft"


def document(rec, encoder: Encoder) -> list[int]:
    """A text record's ids for pre-training (conversations are refused)."""
    if not (isinstance(rec, Conversation) and rec.is_text):
        raise DataError(f"{rec.source}: data.objective=pretrain needs text records ({{\"text\": ...}} or .txt "
                        "lines); this one is a conversation — use data.objective=sft")
    return encoder.document_ids(rec.text)


def pretrain_blocks(records: list, encoder: Encoder, block_size: int, name: str) -> list[Example]:
    return list(chunk_blocks((document(r, encoder) for r in records), block_size, name))


@dataclass
class Datasets:
    train: list[Example]
    eval: list[Example]
    stats: DataStats
    encoder: Encoder
    eval_records: list[Conversation]  # the conversations behind ``eval``, in the same order (sft)
    pad_id: int = 0
    packing: bool = False
    group_by_length: bool = False

    def collate(self, examples: list[Example]) -> dict:
        """Examples -> one micro-batch of tensors (the loop never builds batches itself)."""
        if examples and preference.is_preference(examples[0]):
            return preference.collate_preference(examples, self.pad_id)
        return collate(examples, self.pad_id, packed=self.packing)

    def sampler(self, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        """The order of training micro-batches: random; length-grouped (``data.group_by_length``);
        or, for a stream, shuffled within the stream's windows."""
        n = len(self.train)
        if n < batch_size * world_size:
            raise ConfigError(f"train.batch_size={batch_size} x {world_size} process(es) is larger than the "
                              f"{n} training examples; lower train.batch_size or add data")
        if self.group_by_length:
            lengths = [len(e) for e in self.train]
            return EpochSampler(lambda e: grouped_batches(lengths, batch_size, seed, e, shuffle), rank, world_size)
        window = getattr(self.train, "window", None)  # a stream (data.streaming) is read window by window
        if window is not None:
            return EpochSampler(lambda e: window_batches(n, batch_size, seed, e, shuffle, window), rank, world_size)
        return BatchSampler(n, batch_size, seed, shuffle, rank, world_size)


def build_datasets(data_cfg, tokenizer, seed: int, types: TypeLabels | None = None) -> Datasets:
    """Train and eval rows, counts and the encoder for a DataConfig; with ``types`` every
    example carries its record's type label (data/sample_types.py)."""
    if data_cfg.streaming:
        return build_stream_datasets(data_cfg, tokenizer, seed, types)
    stats = DataStats()
    bad = stats.bad if data_cfg.skip_bad_records else None
    specs = dataset_specs(data_cfg)
    encoder = make_encoder(data_cfg, tokenizer)
    seen: set | None = set() if data_cfg.dedup else None
    eval_pairs: list[tuple[int, object]] = []
    if data_cfg.eval_path:  # read first, so a training record that repeats an eval record is the one removed
        eval_pairs = _read_all(resolve([data_cfg.eval_path], data_cfg, "data.eval_path"), data_cfg, stats, bad, seen,
                               types)
    pairs = _read_all(specs, data_cfg, stats, bad, seen, types)
    stats.records = len(pairs) + len(eval_pairs)
    if not data_cfg.eval_path:
        order = list(range(len(pairs)))
        random.Random(seed).shuffle(order)
        eval_idx = set(order[: split_count(len(pairs), data_cfg.eval_split)])
        eval_pairs = [p for i, p in enumerate(pairs) if i in eval_idx]
        pairs = [p for i, p in enumerate(pairs) if i not in eval_idx]
    if data_cfg.mix:
        pairs = mix(pairs, specs, data_cfg.mix, data_cfg.mix_size, seed, stats)
    elif data_cfg.mix_size is not None:
        raise ConfigError("data.mix_size needs data.mix (the weight of each dataset)")
    train_recs, eval_recs = [r for _, r in pairs], [r for _, r in eval_pairs]
    stats.objective = resolve_objective(data_cfg, train_recs + eval_recs)
    refuse_types(types, stats.objective)
    name = ", ".join(s.name for s in specs)
    if stats.objective == "pretrain":
        block = data_cfg.block_size or data_cfg.max_length
        train = pretrain_blocks(train_recs, encoder, block, name)
        evals = pretrain_blocks(eval_recs, encoder, block, f"{name} eval")
        eval_records = []
        if not train:
            raise DataError(f"{name}: the training documents hold fewer than data.block_size={block} tokens")
    elif stats.objective == "preference":
        if data_cfg.packing:
            raise ConfigError("data.packing does not combine with preference data yet (the two answers of a pair "
                              "share one batch as concatenated rows); set data.packing=false")
        train = preference.encode_records(train_recs, encoder, data_cfg, stats)
        evals, eval_records = [], []
        for rec in eval_recs:  # kept in step: the records give the held-out prompts for generation
            ex = preference.encode_records([rec], encoder, data_cfg, stats)
            evals += ex
            eval_records += [rec] if ex else []
        if not train:
            raise DataError(f"{name}: no preference record is left after truncation (check data.max_length)")
    else:
        train = encode_all(train_recs, encoder, stats)
        evals, eval_records = [], []
        for rec in eval_recs:
            ex = encode_one(rec, encoder, stats)
            if ex is not None:
                evals.append(ex)
                eval_records.append(rec)
        if not train:
            raise DataError(f"{name}: no training example has a token to learn (check data.max_length and "
                            "data.overlong)")
        if data_cfg.packing:
            stats.packed_from = len(train)
            train = pack_examples(train, data_cfg.max_length)
    stats.train, stats.eval = len(train), len(evals)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if data_cfg.packing and data_cfg.group_by_length:
        raise ConfigError("data.packing and data.group_by_length are alternatives; set one of them")
    return Datasets(train, evals, stats, encoder, eval_records, pad_id, packing=bool(data_cfg.packing),
                    group_by_length=bool(data_cfg.group_by_length))


# ---------------------------------------------------------------------------- streaming


def stream_examples(data_cfg, tokenizer, stats: DataStats | None = None,
                    types: TypeLabels | None = None) -> Iterator[Example]:
    """Training examples (sft) or blocks (pretrain) read, parsed and encoded one record at a time.

    Memory stays constant in the corpus size (with ``data.dedup`` a 16-byte digest per record is
    kept). No eval split, mixing or packing: the order is the files' order, and the tokens equal
    ``build_datasets`` with ``eval_split=0`` and no mixing or packing.
    """
    stats = stats if stats is not None else DataStats()
    bad = stats.bad if data_cfg.skip_bad_records else None
    encoder = make_encoder(data_cfg, tokenizer)
    seen: set | None = set() if data_cfg.dedup else None

    def records():
        for spec in dataset_specs(data_cfg):
            for rec in unique(iter_spec(spec, data_cfg, bad, stats, types), seen, stats):
                stats.records += 1
                yield rec

    objective = data_cfg.objective
    if objective == "auto":
        raise ConfigError("streaming cannot look at every record first: set data.objective to sft or pretrain")
    refuse_types(types, objective)
    if objective == "pretrain":
        docs = (document(r, encoder) for r in records())
        yield from chunk_blocks(docs, data_cfg.block_size or data_cfg.max_length, "stream")
        return
    for rec in records():
        ex = encode_one(rec, encoder, stats)
        if ex is not None:
            yield ex


def build_stream_datasets(data_cfg, tokenizer, seed: int, types: TypeLabels | None = None):
    """Datasets whose ``train`` is a ``TrainStream`` (eval from ``data.eval_path``, in memory)."""
    for key in ("group_by_length", "mix"):
        if getattr(data_cfg, key):
            raise ConfigError(f"data.streaming does not combine with data.{key} yet; turn one of them off")
    if data_cfg.eval_split and not data_cfg.eval_path:
        raise ConfigError("data.streaming reads the corpus in order and cannot hold out a random split; give an "
                          "eval file with data.eval_path, or set data.eval_split=0")
    stats = DataStats(objective=data_cfg.objective)
    window = stream.WINDOW  # read at call time (tests shrink it)

    def open_stream(stats=None, counted=None):
        examples = stream_examples(data_cfg, tokenizer, stats, types)
        return stream.packed_stream(examples, data_cfg.max_length, window, counted) if data_cfg.packing else examples

    counted = [0]
    length = sum(1 for _ in open_stream(stats, counted))  # also fills the counts
    if length == 0:
        raise DataError("the streamed training data holds no example with a token to learn")
    if data_cfg.packing:
        stats.packed_from = counted[0]
    train = stream.TrainStream(open_stream, length, window)
    encoder = make_encoder(data_cfg, tokenizer)
    evals, eval_records = [], []
    if data_cfg.eval_path:
        records = [r for _, r in _read_all(resolve([data_cfg.eval_path], data_cfg, "data.eval_path"), data_cfg,
                                           stats, stats.bad if data_cfg.skip_bad_records else None, None, types)]
        if stats.objective == "pretrain":
            evals = pretrain_blocks(records, encoder, data_cfg.block_size or data_cfg.max_length, "eval")
        else:
            for rec in records:
                ex = encode_one(rec, encoder, stats)
                if ex is not None:
                    evals.append(ex)
                    eval_records.append(rec)
    stats.train, stats.eval = length, len(evals)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Datasets(train, evals, stats, encoder, eval_records, pad_id, packing=bool(data_cfg.packing))
