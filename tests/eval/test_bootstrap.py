"""Bootstrap intervals of class match and digits-FID against brute force, and their spread
against the real spread of independent draws."""
import numpy as np
import pytest

from trdq_jax.eval.metrics import (bootstrap_class_match, bootstrap_fid, bootstrap_indices,
                                   class_match_from_hits, digits_fid, fid_from_features,
                                   frame_features, percentile_interval)


def test_bootstrap_fid_is_the_brute_force_one():
    rng = np.random.default_rng(0)
    feats, ref = rng.normal(size=(25, 4)) + 0.3, rng.normal(size=(40, 4))
    got = bootstrap_fid(feats, ref, resamples=64, seed=5)
    idx = bootstrap_indices(25, 64, 5)
    values = np.array([fid_from_features(feats[i], ref) for i in idx])
    point = fid_from_features(feats, ref)
    np.testing.assert_allclose(got, percentile_interval(values - (values.mean() - point)),
                               rtol=1e-9)
    assert got[0] < point < got[1]


def test_bootstrap_fid_resamples_videos_whole():
    rng = np.random.default_rng(1)
    feats, ref = rng.normal(size=(12, 3, 4)), rng.normal(size=(30, 4)) + 0.2  # 12 videos
    got = bootstrap_fid(feats, ref, resamples=40, seed=2)
    idx = bootstrap_indices(12, 40, 2)
    values = np.array([fid_from_features(feats[i], ref) for i in idx])
    point = fid_from_features(feats, ref)
    np.testing.assert_allclose(got, percentile_interval(values - (values.mean() - point)),
                               rtol=1e-9)


def test_bootstrap_class_match_is_the_brute_force_one():
    rng = np.random.default_rng(2)
    hits = rng.random(30) < 0.8
    idx = bootstrap_indices(30, 100, 0)
    got = bootstrap_class_match(hits, 100, 0)
    assert got == {"accuracy": percentile_interval([hits[i].mean() for i in idx])}
    videos = rng.random((20, 5)) < 0.9
    idx = bootstrap_indices(20, 100, 0)
    got = bootstrap_class_match(videos, 100, 0)
    want = [class_match_from_hits(videos[i]) for i in idx]
    for key in ("frame_accuracy", "video_accuracy", "accuracy"):
        np.testing.assert_allclose(got[key], percentile_interval([w[key] for w in want]))


def test_fid_from_frame_features_is_digits_fid():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(-1, 1, (9, 2, 4, 4, 1)), rng.uniform(-1, 1, (7, 4, 4, 1))

    def feature_fn(x):
        return np.asarray(x).reshape(len(x), -1)[:, :5] ** 2

    fa = frame_features(a, feature_fn, batch_size=4)
    assert fa.shape == (9, 2, 5)
    assert fid_from_features(fa, frame_features(b, feature_fn)) == digits_fid(a, b, feature_fn)


def test_fid_interval_has_the_spread_of_independent_draws():
    """Re-centred on the estimate, the interval is about as wide as the distance really
    varies between independent draws of N samples (a loose check: a factor of 2)."""
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(400, 3))
    draws = [fid_from_features(rng.normal(size=(60, 3)) * 1.2 + 0.3, ref) for _ in range(300)]
    lo, hi = percentile_interval(draws)
    one = rng.normal(size=(60, 3)) * 1.2 + 0.3
    got = bootstrap_fid(one, ref, resamples=500, seed=0)
    assert 0.5 < (got[1] - got[0]) / (hi - lo) < 2.0
    assert got[0] < np.median(draws) < got[1]


def test_bootstrap_arguments_are_checked():
    with pytest.raises(ValueError, match="resamples: expected a positive int"):
        bootstrap_indices(5, 0, 0)
    with pytest.raises(ValueError, match="level: expected a number in"):
        percentile_interval([1.0, 2.0], level=1.5)
    with pytest.raises(ValueError, match="digits-FID needs at least 2 frames"):
        bootstrap_fid(np.ones((1, 3)), np.ones((4, 3)))


def test_many_samples_take_the_row_by_row_path(monkeypatch):
    import trdq_jax.eval.metrics as metrics
    rng = np.random.default_rng(5)
    feats, ref = rng.normal(size=(15, 2, 4)), rng.normal(size=(30, 4))
    fast = bootstrap_fid(feats, ref, resamples=30, seed=1)
    monkeypatch.setattr(metrics, "_OUTER_LIMIT", 0)
    np.testing.assert_allclose(bootstrap_fid(feats, ref, resamples=30, seed=1), fast, rtol=1e-9)
