"""Deterministic, resumable order of micro-batches.

Epoch ``e`` visits the examples in ``randperm(n, seed + e)`` order (or in file order without
shuffling) and cuts it into micro-batches. The whole position is two integers (epoch, index of
the next micro-batch), saved in every checkpoint, so a resumed run sees exactly the batches
the uninterrupted run would have seen. With ``world_size > 1`` each rank takes every
``world_size``-th micro-batch of the same global order.
"""

from __future__ import annotations

import torch


class BatchSampler:
    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, lengths: list[int] | None = None):
        if n < batch_size * world_size:
            from ..errors import ConfigError

            raise ConfigError(
                f"train.batch_size={batch_size} x {world_size} process(es) is larger than the "
                f"{n} training examples; lower train.batch_size or add data"
            )
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.lengths = lengths
        self.epoch = 0
        self.position = 0  # index of the next global micro-batch within the epoch
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        full = (self.n // self.batch_size) * self.batch_size  # drop the ragged tail
        return [order[i:i + self.batch_size] for i in range(0, full, self.batch_size)]

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches) // self.world_size

    def next(self) -> list[int]:
        """Indices of this rank's next micro-batch."""
        if self.position + self.world_size > len(self._batches):
            self.epoch += 1
            self.position = 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.position + self.rank]
        self.position += self.world_size
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = self._epoch_batches(self.epoch)
