"""Packing, pre-training blocks, length-grouped batches, and what padding costs.

Packing puts several examples into one row of at most ``capacity`` tokens, chosen by
best-fit-decreasing: examples from longest to shortest, each into the open row with the
least room left that still fits it (a new row if none does). Rows keep the lengths of their
sequences; ``collate`` turns them into per-sequence position ids and a block-diagonal causal
mask, so no token attends across sequences and the loss equals the unpacked loss.

Pre-training joins documents (each ending in EOS) into one stream and cuts it into blocks of
``block_size`` tokens, labels = input ids; the incomplete last block is dropped (counted).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from ..errors import ConfigError
from .sampler import epoch_order
from .tokenize import Example


class _FreeSpace:
    """Open rows by remaining room (a Fenwick tree over room sizes): O(log capacity) best fit."""

    def __init__(self, capacity: int):
        self.n = capacity
        self.tree = [0] * (capacity + 1)
        self.rows: list[list[int]] = [[] for _ in range(capacity + 1)]  # room -> row ids

    def _add(self, room: int, delta: int) -> None:
        while room <= self.n:
            self.tree[room] += delta
            room += room & -room

    def _count_below(self, room: int) -> int:  # rows with room < ``room``
        total, i = 0, room - 1
        while i > 0:
            total += self.tree[i]
            i -= i & -i
        return total

    def put(self, room: int, row: int) -> None:
        if room > 0:
            self.rows[room].append(row)
            self._add(room, 1)

    def take_best(self, need: int) -> tuple[int, int] | None:
        """(room, row) of the row with the least room >= need, removed; None if none fits."""
        k = self._count_below(need) + 1  # the k-th smallest room is the best fit
        pos, step = 0, 1 << self.n.bit_length()
        while step:
            nxt = pos + step
            if nxt <= self.n and self.tree[nxt] < k:
                pos, k = nxt, k - self.tree[nxt]
            step >>= 1
        room = pos + 1
        if room > self.n:
            return None
        self._add(room, -1)
        return room, self.rows[room].pop()


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of total length <= capacity (each row in placement order)."""
    if capacity < 1:
        raise ConfigError(f"packing capacity must be >= 1, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free = _FreeSpace(capacity)
    rows: list[list[int]] = []
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ConfigError(f"an example of {need} tokens does not fit a packed row of {capacity}")
        best = free.take_best(need) if need > 0 else None
        if best is None:
            rows.append([i])
            free.put(capacity - need, len(rows) - 1)
        else:
            room, row = best
            rows[row].append(i)
            free.put(room - need, row)
    return rows


def pack_examples(examples: list[Example], capacity: int) -> list[Example]:
    """Packed rows (``seq_lens`` set) by best-fit-decreasing; every token of every example kept."""
    rows = []
    for group in best_fit_decreasing([len(e) for e in examples], capacity):
        parts = [examples[i] for i in group]
        weighted = any(p.weights is not None for p in parts)
        rows.append(Example(
            input_ids=[t for p in parts for t in p.input_ids],
            labels=[t for p in parts for t in p.labels],
            source="; ".join(p.source for p in parts),
            truncated=any(p.truncated for p in parts),
            weights=[w for p in parts for w in (p.weights or [1.0] * len(p))] if weighted else None,
            seq_lens=tuple(len(p) for p in parts),
            types=tuple(t for p in parts for t in p.types) if all(p.types for p in parts) else (),
        ))
    return rows


def chunk_blocks(documents: Iterable[list[int]], block_size: int, source: str = "") -> Iterator[Example]:
    """Documents (ids ending in EOS) joined and cut into ``block_size`` blocks, labels = ids.

    Constant memory: at most one block plus one document is held. The incomplete tail is dropped.
    """
    if block_size < 2:
        raise ConfigError(f"data.block_size must be >= 2, got {block_size}")
    buf: list[int] = []
    index = 0
    for doc in documents:
        buf.extend(doc)
        while len(buf) >= block_size:
            block, buf = buf[:block_size], buf[block_size:]
            yield Example(block, list(block), f"{source} block {index}")
            index += 1


# ---------------------------------------------------------------------------- batches


def padding_waste(lengths: list[int], batches: list[list[int]]) -> tuple[int, int]:
    """(padding tokens, all tokens) when each batch is padded to its longest row."""
    pad = total = 0
    for batch in batches:
        width = max(lengths[i] for i in batch)
        total += width * len(batch)
        pad += sum(width - lengths[i] for i in batch)
    return pad, total


def grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                    group: int = 50) -> list[list[int]]:
    """Batches of similar length: the epoch's order cut into groups of ``group`` batches, each
    group sorted by length and cut into batches, then the batches shuffled (ragged tail dropped)."""
    order = epoch_order(len(lengths), seed, epoch, shuffle)
    full = (len(order) // batch_size) * batch_size
    order, size = order[:full], batch_size * group
    batches = []
    for start in range(0, full, size):
        chunk = sorted(order[start:start + size], key=lambda i: -lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch + 1_000_003)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def window_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                   window: int = 2048) -> list[list[int]]:
    """Batches for a stream: indices shuffled only within consecutive windows of ``window``
    examples (windows in order), so a reader holding one window serves them all."""
    order = []
    for start in range(0, n, window):
        idx = list(range(start, min(start + window, n)))
        if shuffle:
            g = torch.Generator().manual_seed(seed + epoch * 1_000_003 + start)
            idx = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
        order += idx
    full = (n // batch_size) * batch_size
    return [order[i:i + batch_size] for i in range(0, full, batch_size)]
