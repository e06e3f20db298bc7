"""A distributed, resumable sampler: a seeded permutation per epoch, each rank taking its own slice; and the
fixed per-rank batches of a pass over a whole split (evaluation, cached scores)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator


def example_lengths(examples: list) -> list[int]:
    """Each example's real tokens as its batch counts them: prompt + chosen + prompt + rejected for a pair,
    prompt + completion for an unpaired row (what ``train.balance_ranks`` balances)."""
    if examples and hasattr(examples[0], "completion_ids"):
        return [len(ex.prompt_ids) + len(ex.completion_ids) for ex in examples]
    return [2 * len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.rejected_ids) for ex in examples]


class PairSampler:
    """Yields micro-batches of example indices for one rank, forever, epoch after epoch.

    Every rank draws the same permutation (seed + epoch) and takes the rows
    ``rank, rank + world, ...`` of it, then cuts them into micro-batches; the
    tail that does not fill a micro-batch on every rank is dropped, so all ranks
    take the same number of steps. The position (epoch, batch) is the state to
    save for an exact resume.

    With ``lengths`` (each example's real tokens; ``train.balance_ranks``) the ranks' micro-batch b still
    hold, together, exactly the pairs above (permutation positions ``[b·bs·world, (b+1)·bs·world)``), but
    which rank gets which of them is dealt by length: longest first, snake-wise (ranks 0..W-1, then
    W-1..0, ...), so every rank's forward and backward carry about the same tokens and no rank waits in
    the collectives for a longer one. Deterministic, and the same state resumes it.
    """

    def __init__(self, n_examples: int, micro_batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool = True,
                 lengths: list[int] | None = None):
        self.n, self.bs, self.rank, self.world, self.seed, self.shuffle = n_examples, micro_batch_size, rank, world_size, seed, shuffle
        self.lengths = lengths if lengths is not None and world_size > 1 else None
        self.batches_per_epoch = n_examples // (micro_batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {n_examples} usable pairs, fewer than one step needs "
                f"(train.micro_batch_size={micro_batch_size} x {world_size} ranks); lower the batch size or add data"
            )
        self.epoch, self.batch = 0, 0

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def examples_of(self, first_batch: int, n_batches: int) -> set[int]:
        """The examples every rank together takes in micro-batches ``first_batch .. first_batch + n_batches - 1``
        (counted from the start of epoch 0; one per rank per micro-step): what a run of that many micro-steps
        will see, whichever rank each is dealt to."""
        group, out, permutations = self.bs * self.world, set(), {}
        for b in range(first_batch, first_batch + n_batches):
            epoch, k = divmod(b, self.batches_per_epoch)
            order = permutations.setdefault(epoch, self._permutation(epoch))
            out.update(order[k * group:(k + 1) * group])
            if len(out) == self.n:
                break
        return out

    def _epoch_order(self, epoch: int) -> list[int]:
        order = self._permutation(epoch)
        if self.lengths is None:
            return order[self.rank::self.world][: self.batches_per_epoch * self.bs]
        group = self.bs * self.world
        return [i for b in range(self.batches_per_epoch) for i in self._deal(order[b * group:(b + 1) * group])]

    def _deal(self, group: list[int]) -> list[int]:
        """This rank's share of one micro-step's pairs, dealt longest first, snake-wise over the ranks."""
        ranked = sorted(range(len(group)), key=lambda k: (-self.lengths[group[k]], k))
        turn = [r for j in range(self.bs) for r in (range(self.world) if j % 2 == 0 else reversed(range(self.world)))]
        return [group[k] for k, r in zip(ranked, turn) if r == self.rank]

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


def shard_batches(examples: list, batch_size: int, rank: int, world: int) -> list[tuple[list, int]]:
    """This rank's batches and how many of each are real. Every rank gets the same number of
    batches (ZeRO-3 forwards are collective), the short ones padded by repeating an example."""
    shard = examples[rank::world]
    per_rank = math.ceil(len(examples) / world)
    n_batches = math.ceil(per_rank / batch_size)
    out = []
    for b in range(n_batches):
        real = shard[b * batch_size:(b + 1) * batch_size]
        filler = [examples[0]] * (batch_size - len(real)) if len(real) < batch_size else []
        out.append((real + filler, len(real)))
    return out
