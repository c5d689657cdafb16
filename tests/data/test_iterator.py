"""batch_iterator: epoch permutations, alignment, resume equivalence."""
import itertools

import numpy as np
import pytest

from trdq_jax.data import batch_iterator


def _arrays(n=53):
    return (np.arange(n, dtype=np.int64) * 10, np.arange(n, dtype=np.int32)[:, None] + 0.5)


@pytest.mark.parametrize("start", [0, 1, 4, 5, 13, 27])
def test_resume_equals_skipping(start):
    arrays = _arrays()
    skipped = list(itertools.islice(batch_iterator(arrays, 10, seed=7), start, start + 12))
    resumed = list(itertools.islice(batch_iterator(arrays, 10, seed=7, start_step=start), 12))
    for a, b in zip(skipped, resumed):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_each_epoch_is_a_fresh_permutation_and_arrays_stay_aligned():
    arrays = _arrays()
    batches = list(itertools.islice(batch_iterator(arrays, 10, seed=0), 15))  # 5 per epoch, 3 epochs
    epochs = []
    for e in range(3):
        ids = np.concatenate([b[1][:, 0] - 0.5 for b in batches[5 * e:5 * e + 5]]).astype(int)
        assert len(set(ids)) == 50, "no example repeats inside an epoch"
        epochs.append(ids)
        for b in batches[5 * e:5 * e + 5]:
            np.testing.assert_array_equal(b[0], (b[1][:, 0] - 0.5).astype(np.int64) * 10)
            assert b[0].shape == (10,) and b[1].shape == (10, 1) and b[1].dtype == np.float64
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # the permutation really is reshuffled per epoch from the seed
    np.testing.assert_array_equal(epochs[1], np.random.default_rng((0, 1)).permutation(53)[:50])


def test_different_seeds_give_different_streams():
    arrays = _arrays()
    a = next(batch_iterator(arrays, 10, seed=0))[0]
    b = next(batch_iterator(arrays, 10, seed=1))[0]
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("args, name", [
    (((np.zeros(3), np.zeros(4)), 2, 0), "arrays"), (((), 2, 0), "arrays"),
    (((np.zeros(3),), 4, 0), "batch_size"), (((np.zeros(3),), 0, 0), "batch_size"),
    (((np.zeros(3),), 2, -1), "seed")])
def test_bad_arguments_name_the_argument(args, name):
    with pytest.raises(ValueError, match=name):
        batch_iterator(*args)
    with pytest.raises(ValueError, match="start_step"):
        batch_iterator((np.zeros(3),), 2, 0, start_step=-2)
