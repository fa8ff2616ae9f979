"""The order of the training data: which images each step sees, a function of the seed alone (for exact resume)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochBatches"]


class EpochBatches(Sampler):
    """The training run's distributed batch sampler: batches of one epoch, in an order fixed by
    ``(seed, epoch)``, from batch ``start`` on, sharded over ``world`` processes by ``rank``.

    Yields lists of ``(index, sample_seed)`` keys (see :class:`vitcourse.data.ImageTensorDataset`):
    the permutation and every image's augmentation seed come from ``seed`` and ``epoch`` alone.
    With ``world > 1`` each global batch of ``batch_size`` images is cut into ``world`` equal
    parts and process ``rank`` gets its part. Incomplete final batches are dropped.

    It does the job of ``torch.utils.data.DistributedSampler(shuffle=True, drop_last=True)``
    with ``set_epoch(epoch)`` inside a ``BatchSampler``: every process sees a disjoint
    ``1/world`` of each epoch's shuffled data. It is written out instead for exact resume:
    it can start at batch ``start`` of an epoch (where a killed run stopped), it carries each
    image's augmentation seed, and it shards each *global* batch rather than the whole epoch,
    so the images of step ``k`` are the same for any number of processes and a DDP run
    matches a one-process run.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.start = n, batch_size, start
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed * 100_003 + epoch)

    def __len__(self) -> int:
        return self.n // self.batch_size - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.generator.initial_seed())
        order = torch.randperm(self.n, generator=g)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        part = self.batch_size // self.world
        for b in range(self.start, self.n // self.batch_size):
            chunk = order[b * self.batch_size : (b + 1) * self.batch_size][self.rank * part : (self.rank + 1) * part]
            yield [(int(i), int(seeds[i])) for i in chunk]
