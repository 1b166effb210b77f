"""``data.streaming``: train on a corpus bigger than RAM, one window of examples in memory.

``TrainStream`` is the training set as the loop sees it — ``len()`` and ``stream[i]`` — backed
by ``stream_examples`` (records read, parsed and encoded one at a time). ``stream[i]`` is served
from the window of ``window`` consecutive examples that holds ``i``; the sampler visits the
indices window by window (shuffled inside each window, ``packing.window_batches``), so one
epoch reads the corpus once and memory stays at one window. An index behind the current window
(a new epoch, or a resumed run's first batch) re-reads the stream up to its window: resuming is
exact because the sampler's position is saved in checkpoints as for in-memory data.

``len()`` costs one counting pass over the corpus (constant memory), which also fills the
run's data summary. Eval data comes from ``data.eval_path`` (in memory).

With ``data.packing`` the stream packs as it reads: every run of ``window`` consecutive examples is
packed by best-fit-decreasing (``packing.pack_examples``) into rows of ``data.max_length``, and the
stream's items are those rows. A corpus of at most one window packs exactly as in memory; a larger
one packs window by window (rows never mix examples of two windows), so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice

from ..errors import DataError
from .packing import pack_examples
from .tokenize import Example

WINDOW = 2048  # examples held in memory while streaming


def packed_stream(examples: Iterator[Example], capacity: int, window: int,
                  counted: list[int] | None = None) -> Iterator[Example]:
    """``examples`` packed into rows of ``capacity`` tokens, ``window`` examples at a time
    (``counted``, when given, receives the number of examples read)."""
    while True:
        chunk = list(islice(examples, window))
        if not chunk:
            return
        if counted is not None:
            counted[0] += len(chunk)
        yield from pack_examples(chunk, capacity)


class TrainStream:
    """Streamed training examples, indexable window by window."""

    def __init__(self, open_stream: Callable[[], Iterator[Example]], length: int, window: int | None = None):
        self.open_stream, self.length, self.window = open_stream, length, window or WINDOW
        self._it: Iterator[Example] | None = None
        self._read = 0  # examples taken from self._it so far
        self._start, self._rows = -1, []  # the window in memory

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Example:
        if not 0 <= i < self.length:
            raise IndexError(f"example {i} of a stream of {self.length}")
        start = i - i % self.window
        if start != self._start:
            if self._it is None or start < self._read:  # behind us: read again from the start
                self._it, self._read = self.open_stream(), 0
            for _ in islice(self._it, start - self._read):
                pass
            self._rows = list(islice(self._it, self.window))
            self._read, self._start = start + len(self._rows), start
            if len(self._rows) < min(self.window, self.length - start):
                raise DataError("the streamed data changed while training (fewer examples than counted); "
                                "do not edit the data files during a run")
        return self._rows[i - start]
