"""Deterministic, resumable order of micro-batches.

Epoch ``e`` visits the examples in ``randperm(n, seed + e)`` order (or in file order without
shuffling) and cuts it into micro-batches. The whole position is two integers (epoch, index of
the next micro-batch), saved in every checkpoint, so a resumed run sees exactly the batches
the uninterrupted run would have seen. With ``world_size > 1`` each rank takes every
``world_size``-th micro-batch of the same global order.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order of the ``n`` examples in epoch ``epoch``: ``randperm(n, seed + epoch)``, or file order."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


class EpochSampler:
    """The training loop's sampler interface (``next``, ``state_dict``, ``load_state_dict``) over
    any rule that cuts epoch ``e`` into batches. The position is (epoch, next batch), saved in
    checkpoints, so a resumed run continues exactly. Rank ``r`` of ``world_size`` takes every
    ``world_size``-th batch of the same global order."""

    def __init__(self, batches_for_epoch, rank: int = 0, world_size: int = 1):
        self.batches_for_epoch, self.rank, self.world_size = batches_for_epoch, rank, world_size
        self.epoch, self.position = 0, 0
        self._batches = batches_for_epoch(0)

    def next(self) -> list[int]:
        if self.position + self.world_size > len(self._batches):
            self.epoch += 1
            self.position = 0
            self._batches = self.batches_for_epoch(self.epoch)
        batch = self._batches[self.position + self.rank]
        self.position += self.world_size
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = self.batches_for_epoch(self.epoch)


class BatchSampler(EpochSampler):
    """Epoch ``e``: the examples in ``randperm(n, seed + e)`` order (or file order), cut into
    micro-batches of ``batch_size``; the ragged tail is dropped."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1):
        if n < batch_size * world_size:
            raise ConfigError(
                f"train.batch_size={batch_size} x {world_size} process(es) is larger than the "
                f"{n} training examples; lower train.batch_size or add data"
            )
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        super().__init__(self._epoch_batches, rank, world_size)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        order = epoch_order(self.n, self.seed, epoch, self.shuffle)
        full = (self.n // self.batch_size) * self.batch_size  # drop the ragged tail
        return [order[i:i + self.batch_size] for i in range(0, full, self.batch_size)]
