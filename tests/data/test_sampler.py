import itertools

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
