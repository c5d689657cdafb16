"""Time-segment tables: uniform split (paper numbers), exact DP split vs brute force."""
import itertools

import numpy as np
import pytest

from trdq_jax.quant import segments
from trdq_jax.quant.capture import LayerStats
from trdq_jax.sampling import solvers


def _stats(absmax_by_path):
    out = {}
    for path, absmax in absmax_by_path.items():
        s, k = absmax.shape
        out[path] = LayerStats(absmax=np.asarray(absmax, np.float32), tensor_min=np.zeros(s),
                               tensor_max=np.zeros(s), rows=np.zeros((s, 2, k)),
                               weight_absmax=np.ones(k))
    return out


def _features(absmax_by_path):
    """log abs-max per channel, each layer scaled by 1/sqrt(K), layers in path order."""
    return np.concatenate([np.log(absmax_by_path[p].astype(np.float32).astype(np.float64))
                           / np.sqrt(absmax_by_path[p].shape[1]) for p in sorted(absmax_by_path)],
                          axis=1)


def _partition_cost(features, table):
    return sum(((features[table == s] - features[table == s].mean(0)) ** 2).sum()
               for s in np.unique(table))


def _brute_force(features, num_segments, min_length=1):
    n, best = features.shape[0], None
    for cuts in itertools.combinations(range(1, n), num_segments - 1):
        if min(np.diff((0, *cuts, n))) < min_length:
            continue
        table = np.zeros(n, np.int32)
        for c in cuts:
            table[c:] += 1
        cost = _partition_cost(features, table)
        if best is None or cost < best[0] - 1e-12:
            best = (cost, table)
    return best


def test_uniform_segments_reproduce_the_released_opensora_split():
    # IDDPM 20-step timesteps, 20 uniform intervals of width 50: every step its own interval
    visited = np.array([0, 53, 105, 158, 210, 263, 315, 368, 421, 473, 526, 578, 631, 684, 736,
                        789, 841, 894, 946, 999])[::-1]
    # the released split, numbered in sampling order (segment 0 = the first, noisiest steps)
    np.testing.assert_array_equal(segments.uniform_segments(visited, 20, 1000), np.arange(20))
    two = segments.uniform_segments(visited, 2, 1000)  # ViDiT-Q's [500, 1000) / [0, 500)
    np.testing.assert_array_equal(two, (visited < 500).astype(np.int32))
    assert two.dtype == np.int32
    assert segments.uniform_segment_table is solvers.uniform_segment_table
    for bad, match in [((visited, 0, 1000), "num_segments"), ((visited, 2, 999), "train_timesteps"),
                       ((visited * 1.0, 2, 1000), "train_timesteps"),
                       ((visited, True, 1000), "num_segments")]:
        with pytest.raises(ValueError, match=match):
            segments.uniform_segments(*bad)


@pytest.mark.parametrize("trial", range(6))
def test_dp_split_equals_brute_force(trial):
    rng = np.random.default_rng(trial)
    n = int(rng.integers(3, 9))
    absmax = {"b/fc": np.exp(rng.normal(size=(n, 5))), "a/qkv": np.exp(rng.normal(size=(n, 3)))}
    stats = _stats(absmax)
    features = _features(absmax)
    for num_segments in range(1, n + 1):
        table = segments.similarity_segments(stats, num_segments)
        cost, want = _brute_force(features, num_segments)
        assert table.dtype == np.int32 and table.shape == (n,)
        assert table[0] == 0 and np.all(np.diff(table) >= 0) and np.all(np.diff(table) <= 1)
        assert table[-1] == num_segments - 1
        np.testing.assert_allclose(_partition_cost(features, table), cost, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(table, want)


@pytest.mark.parametrize("trial", range(4))
def test_dp_split_with_a_minimum_length_equals_brute_force(trial):
    rng = np.random.default_rng(100 + trial)
    n = int(rng.integers(6, 11))
    absmax = {"l": np.exp(rng.normal(size=(n, 4)) * rng.choice([0.2, 3.0], size=(n, 1)))}
    features = _features(absmax)
    for num_segments in range(1, 4):
        for min_length in range(1, n // num_segments + 1):
            table = segments.similarity_segments(_stats(absmax), num_segments, min_length)
            cost, want = _brute_force(features, num_segments, min_length)
            assert np.bincount(table).min() >= min_length
            np.testing.assert_allclose(_partition_cost(features, table), cost, rtol=1e-9,
                                       atol=1e-12)
            np.testing.assert_array_equal(table, want)


def test_a_minimum_length_the_steps_cannot_hold_is_refused():
    stats = _stats({"l": np.ones((7, 2))})
    with pytest.raises(ValueError, match=r"min_length: 4 segments of at least 2 steps need 8 "
                                         r"steps, the trajectory has 7"):
        segments.similarity_segments(stats, 4, 2)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="min_length"):
            segments.similarity_segments(stats, 2, bad)


def test_regimes_are_recovered_and_layer_width_does_not_dominate():
    """A 4-channel layer separates regimes 1 and 2; a 512-channel layer only drifts slowly inside
    regime 3. Without the 1/sqrt(K) weighting the wide layer's drift would win the third cut."""
    rng = np.random.default_rng(0)
    lengths = [2, 3, 4]
    narrow = np.concatenate([np.full((m, 4), v) for m, v in zip(lengths, [1.0, 8.0, 2.5])])
    wide_log = np.concatenate([np.full(5, np.log(3.0)), np.log(0.5) + 0.15 * np.arange(4)])
    wide = np.exp(np.repeat(wide_log[:, None], 512, axis=1))
    absmax = {"narrow": narrow * np.exp(0.01 * rng.normal(size=narrow.shape)),
              "wide": wide * np.exp(0.01 * rng.normal(size=wide.shape))}
    table = segments.similarity_segments(_stats(absmax), 3)
    np.testing.assert_array_equal(table, np.repeat(np.arange(3), lengths))
    raw = np.concatenate([np.log(absmax[p]) for p in sorted(absmax)], axis=1)
    assert not np.array_equal(_brute_force(raw, 3)[1], table)  # unweighted features disagree


def test_similarity_segments_rejects_bad_counts_and_stats():
    stats = _stats({"l": np.ones((4, 2))})
    for bad in (0, 5, 1.5, True):
        with pytest.raises(ValueError, match="num_segments"):
            segments.similarity_segments(stats, bad)
    with pytest.raises(ValueError, match="stats"):
        segments.similarity_segments({}, 1)
    with pytest.raises(ValueError, match="stats"):
        segments.similarity_segments({**stats, **_stats({"m": np.ones((3, 2))})}, 2)
    with pytest.raises(ValueError, match="'l'"):
        segments.similarity_segments(_stats({"l": np.full((4, 2), np.nan)}), 2)


def test_check_segments_names_empty_segments():
    np.testing.assert_array_equal(segments.check_segments([2, 2, 1, 0], 3), [2, 2, 1, 0])
    with pytest.raises(ValueError, match=r"segments \[1, 3\]"):
        segments.check_segments(np.array([0, 0, 2, 2, 4]), 5)
    with pytest.raises(ValueError, match="table"):
        segments.check_segments(np.array([0, 3]), 2)
    with pytest.raises(ValueError, match="num_segments"):
        segments.check_segments(np.array([0, 1]), 3)
