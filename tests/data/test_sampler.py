import itertools
import random

import pytest

from aligner.data import PairSampler


def test_ranks_take_disjoint_slices_and_same_number_of_batches():
    a = PairSampler(103, 4, rank=0, world_size=2, seed=1)
    b = PairSampler(103, 4, rank=1, world_size=2, seed=1)
    first_a = list(itertools.islice(iter(a), a.batches_per_epoch))
    first_b = list(itertools.islice(iter(b), b.batches_per_epoch))
    flat_a, flat_b = sum(first_a, []), sum(first_b, [])
    assert len(first_a) == len(first_b) == 12
    assert not set(flat_a) & set(flat_b)


def test_resuming_from_state_continues_the_same_sequence():
    full = PairSampler(40, 3, 0, 2, seed=7)
    expected = list(itertools.islice(iter(full), 20))
    first = PairSampler(40, 3, 0, 2, seed=7)
    head = list(itertools.islice(iter(first), 9))
    resumed = PairSampler(40, 3, 0, 2, seed=7)
    resumed.load_state_dict(first.state_dict())
    assert head + list(itertools.islice(iter(resumed), 11)) == expected


def test_too_little_data_for_one_step_is_explained():
    with pytest.raises(ValueError, match="fewer than one step needs"):
        PairSampler(3, 4, 0, 2, seed=0)


def _steps(world, lengths, n_steps, **kw):
    samplers = [PairSampler(len(lengths), 4, r, world, seed=3, lengths=lengths, **kw) for r in range(world)]
    iters = [iter(s) for s in samplers]
    return [[next(it) for it in iters] for _ in range(n_steps)]  # step -> rank -> indices


def test_balanced_ranks_keep_every_steps_pairs_and_even_out_the_tokens():
    """train.balance_ranks: the same pairs per micro-step, dealt by length; max/mean real tokens per rank drops."""
    lengths = [random.Random(i).randint(10, 400) for i in range(203)]
    plain_iters = [iter(PairSampler(203, 4, r, 2, seed=3)) for r in range(2)]
    plain = [[next(it) for it in plain_iters] for _ in range(50)]
    balanced = _steps(2, lengths, 50)

    def imbalance(steps):
        ratios = [max(tok) / (sum(tok) / len(tok)) for tok in ([sum(lengths[i] for i in b) for b in step] for step in steps)]
        return max(ratios), sum(ratios) / len(ratios)

    for p, b in zip(plain, balanced):
        assert sorted(sum(p, [])) == sorted(sum(b, [])) and all(len(x) == 4 for x in b)
    before, after = imbalance(plain), imbalance(balanced)
    assert after[0] < 1.2 and after[1] < before[1] and after[0] < before[0], (before, after)


def test_balanced_ranks_are_deterministic_and_resume_exactly():
    lengths = [(7 * i) % 53 + 1 for i in range(40)]
    full = list(itertools.islice(iter(PairSampler(40, 3, 1, 2, seed=7, lengths=lengths)), 20))
    first = PairSampler(40, 3, 1, 2, seed=7, lengths=lengths)
    head = list(itertools.islice(iter(first), 9))
    resumed = PairSampler(40, 3, 1, 2, seed=7, lengths=lengths)
    resumed.load_state_dict(first.state_dict())
    assert head + list(itertools.islice(iter(resumed), 11)) == full


@pytest.mark.parametrize("lengths", [None, [(5 * i) % 31 + 1 for i in range(50)]])
def test_examples_of_a_span_of_micro_steps_are_what_every_rank_draws(lengths):
    """The static pre-pass scores only these (aligner/recipes/train.py): the union of all ranks' micro-batches, across epochs."""
    samplers = [PairSampler(50, 3, r, 2, seed=4, lengths=lengths) for r in range(2)]
    drawn = [list(itertools.islice(iter(s), 20)) for s in samplers]  # 20 micro-steps: 8 per epoch, into epoch 2
    assert samplers[0].examples_of(5, 12) == {i for rank in drawn for batch in rank[5:17] for i in batch}
    assert samplers[0].examples_of(0, 10**6) == set(range(50))
