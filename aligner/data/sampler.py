"""A distributed, resumable sampler: a seeded permutation per epoch, each rank taking its own slice."""

from __future__ import annotations

import random
from collections.abc import Iterator


class PairSampler:
    """Yields micro-batches of example indices for one rank, forever, epoch after epoch.

    Every rank draws the same permutation (seed + epoch) and takes the rows
    ``rank, rank + world, ...`` of it, then cuts them into micro-batches; the
    tail that does not fill a micro-batch on every rank is dropped, so all ranks
    take the same number of steps. The position (epoch, batch) is the state to
    save for an exact resume.
    """

    def __init__(self, n_examples: int, micro_batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.n, self.bs, self.rank, self.world, self.seed, self.shuffle = n_examples, micro_batch_size, rank, world_size, seed, shuffle
        self.batches_per_epoch = n_examples // (micro_batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {n_examples} usable pairs, fewer than one step needs "
                f"(train.micro_batch_size={micro_batch_size} x {world_size} ranks); lower the batch size or add data"
            )
        self.epoch, self.batch = 0, 0

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order[self.rank::self.world][: self.batches_per_epoch * self.bs]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            order = self._epoch_order(self.epoch)
            while self.batch < self.batches_per_epoch:
                start = self.batch * self.bs
                self.batch += 1
                yield order[start:start + self.bs]
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
