"""Metrics against independent float64 references (scipy sqrtm FID, loop SSIM, closed-form PSNR)."""
import numpy as np
import pytest
import scipy.linalg

from trdq_jax.eval import (class_match_accuracy, digits_fid, feature_stats, frechet_distance,
                           noise_prediction_mse, psnr, ssim)


def _scipy_fid(feats_a, feats_b):
    mu1, mu2 = feats_a.mean(0), feats_b.mean(0)
    c1, c2 = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean = scipy.linalg.sqrtm(c1 @ c2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


def _features(seed, n, dim, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim))
    return rng.normal(size=(n, dim)) @ mixing + shift


def test_feature_stats_match_explicit_sums():
    feats = _features(0, 40, 5)
    mu, cov = feature_stats(feats)
    ref_mu = np.array([sum(row[j] for row in feats) / 40 for j in range(5)])
    ref_cov = np.zeros((5, 5))
    for row in feats:
        ref_cov += np.outer(row - ref_mu, row - ref_mu)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(cov, ref_cov / 39, rtol=1e-10)


@pytest.mark.parametrize("dim, n", [(4, 200), (16, 300), (32, 20)])  # last one: rank-deficient
def test_frechet_distance_matches_scipy_sqrtm(dim, n):
    a, b = _features(1, n, dim), _features(2, n, dim, shift=0.3)
    ours = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert ours == pytest.approx(_scipy_fid(a, b), rel=1e-6, abs=1e-6)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = 1 + 4 + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-12)


def test_digits_fid_batches_feature_extraction_and_matches_scipy():
    rng = np.random.default_rng(3)
    images_a = rng.uniform(-1, 1, size=(70, 4, 4, 1))
    images_b = np.clip(rng.uniform(-1, 1, size=(50, 4, 4, 1)) * 0.7 + 0.2, -1, 1)
    projection = rng.normal(size=(16, 6))
    calls = []

    def feature_fn(x):
        calls.append(x.shape[0])
        assert x.dtype == np.float32
        return np.tanh(x.reshape(len(x), -1) @ projection)

    score = digits_fid(images_a, images_b, feature_fn, batch_size=16)
    assert max(calls) <= 16 and sum(calls) == 120
    feats = lambda x: np.tanh(x.astype(np.float32).reshape(len(x), -1).astype(np.float64) @ projection)
    assert score == pytest.approx(_scipy_fid(feats(images_a), feats(images_b)), rel=1e-5)
    # videos: every frame is a sample
    videos = images_a[:60].reshape(10, 6, 4, 4, 1)
    assert digits_fid(videos, images_b, feature_fn) == pytest.approx(
        _scipy_fid(feats(images_a[:60]), feats(images_b)), rel=1e-5)


def test_class_match_accuracy_counts_frames_and_videos():
    # a "classifier" that predicts round(mean pixel * 4) + 4, so we control every frame's prediction
    classify = lambda x: np.rint(x.mean(axis=(1, 2, 3)) * 4 + 4).astype(np.int32)
    preds = np.array([[3, 3, 3], [3, 5, 3], [1, 2, 1], [7, 7, 7]])       # [N=4, F=3]
    labels = np.array([3, 3, 1, 0])
    videos = np.broadcast_to(((preds - 4) / 4.0)[..., None, None, None], (4, 3, 2, 2, 1))
    result = class_match_accuracy(videos, labels, classify, batch_size=5)
    assert result["frame_accuracy"] == pytest.approx(7 / 12)
    assert result["video_accuracy"] == pytest.approx(1 / 4) == result["accuracy"]
    logits_fn = lambda x: np.eye(9)[classify(x)]
    images = videos[:, 0]
    assert class_match_accuracy(images, labels, logits_fn) == {"accuracy": pytest.approx(3 / 4)}


def test_psnr_closed_form_and_known_mse():
    rng = np.random.default_rng(4)
    a = rng.uniform(-0.9, 0.9, size=(3, 8, 8, 1))
    b = a + np.array([0.1, -0.05, 0.0])[:, None, None, None]   # MSE 0.01, 0.0025, 0
    values, mean = psnr(a, b)
    np.testing.assert_allclose(values[:2], [10 * np.log10(4 / 0.01), 10 * np.log10(4 / 0.0025)],
                               rtol=1e-12)
    assert values[2] == np.inf
    noisy = np.clip(a + rng.normal(0, 0.1, size=a.shape), -1, 1)
    values, mean = psnr(a, noisy, data_range=2.0)
    ref = [10 * np.log10(4.0 / np.mean((a[i] - noisy[i]) ** 2)) for i in range(3)]
    np.testing.assert_allclose(values, ref, rtol=1e-12)
    assert mean == pytest.approx(np.mean(ref))
    video_values, _ = psnr(a.reshape(1, 3, 8, 8, 1), noisy.reshape(1, 3, 8, 8, 1))
    np.testing.assert_allclose(video_values, [ref], rtol=1e-12)


def _ssim_reference(x, y, data_range, win, sigma=1.5):
    """Straightforward loops over valid window positions, one [H, W] channel at a time."""
    half = (win - 1) / 2
    w = np.array([[np.exp(-((i - half) ** 2 + (j - half) ** 2) / (2 * sigma ** 2))
                   for j in range(win)] for i in range(win)])
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    scores = []
    for ch in range(x.shape[-1]):
        for r in range(x.shape[0] - win + 1):
            for c in range(x.shape[1] - win + 1):
                px, py = x[r:r + win, c:c + win, ch], y[r:r + win, c:c + win, ch]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                scores.append((2 * mx * my + c1) * (2 * cxy + c2)
                              / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return np.mean(scores)


@pytest.mark.parametrize("shape, win", [((3, 8, 8, 1), 7), ((2, 16, 16, 2), 11), ((2, 12, 9, 1), 9)])
def test_ssim_matches_loop_reference(shape, win):
    rng = np.random.default_rng(5)
    a = rng.uniform(-1, 1, size=shape)
    b = np.clip(a + rng.normal(0, 0.3, size=shape), -1, 1)
    values, mean = ssim(a, b)
    ref = [_ssim_reference(a[i], b[i], 2.0, win) for i in range(shape[0])]
    np.testing.assert_allclose(values, ref, rtol=1e-10)
    assert mean == pytest.approx(np.mean(ref))
    assert np.all(values < 1.0)


def test_ssim_identities():
    rng = np.random.default_rng(6)
    a = rng.uniform(-1, 1, size=(2, 4, 8, 8, 1))                 # videos
    values, mean = ssim(a, a)
    assert values.shape == (2, 4)
    np.testing.assert_allclose(values, 1.0, rtol=1e-12)
    b = a[:, 0] * 0.5 + rng.normal(0, 0.2, size=a[:, 0].shape)
    np.testing.assert_allclose(ssim(a[:, 0], b)[0], ssim(b, a[:, 0])[0], rtol=1e-12)  # symmetric
    # flat images: no variance, so SSIM is the luminance term (2 m n + C1) / (m^2 + n^2 + C1)
    m, n, c1 = 0.3, -0.5, (0.01 * 2.0) ** 2
    flat_values, _ = ssim(np.full((1, 8, 8, 1), m), np.full((1, 8, 8, 1), n))
    np.testing.assert_allclose(flat_values, [(2 * m * n + c1) / (m * m + n * n + c1)], rtol=1e-12)


def test_noise_prediction_mse_per_step():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(5, 2, 3, 4)), rng.normal(size=(5, 2, 3, 4))
    expected = [np.sum((a[s] - b[s]) ** 2) / 24 for s in range(5)]
    np.testing.assert_allclose(noise_prediction_mse(a, b), expected, rtol=1e-12)


@pytest.mark.parametrize("call, name", [
    (lambda: psnr(np.zeros((2, 4, 4, 1)), np.zeros((2, 4, 4, 2))), "b"),
    (lambda: psnr(np.full((1, 4, 4, 1), np.nan), np.zeros((1, 4, 4, 1))), "a"),
    (lambda: ssim(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 4, 1)), data_range=0), "data_range"),
    (lambda: ssim(np.linspace(-2, 2, 16).reshape(1, 4, 4, 1), np.zeros((1, 4, 4, 1))), "a"),
    (lambda: psnr(np.zeros((4, 4)), np.zeros((4, 4))), "a"),
    (lambda: noise_prediction_mse(np.zeros((3, 2)), np.zeros((2, 2))), "eps_b"),
    (lambda: noise_prediction_mse(np.array([np.inf]), np.zeros(1)), "eps_a"),
    (lambda: feature_stats(np.zeros((1, 3))), "features"),
    (lambda: frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3)), "mu2"),
    (lambda: frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2)), "cov1"),
    (lambda: digits_fid(np.zeros((4, 4, 4, 1)), np.zeros((4, 5, 5, 1)), lambda x: x), "images_b"),
    (lambda: digits_fid(np.zeros((4, 4, 4, 1)), np.zeros((4, 4, 4, 1)), lambda x: x, 0), "batch_size"),
    (lambda: class_match_accuracy(np.zeros((4, 4, 4, 1)), np.zeros(3, int), lambda x: x), "labels"),
    (lambda: class_match_accuracy(np.zeros((4, 4, 4, 1)), np.zeros(4, int), lambda x: x), "classify_fn"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call()
