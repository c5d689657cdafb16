"""DuQuant rotation / permutation: orthogonality, hand-checked zigzag, dense equivalence."""
import jax
import numpy as np
import pytest
from scipy.linalg import block_diag

from trdq_jax.quant.duquant import (apply_duquant, calibrate_duquant, duquant_matrix,
                                    greedy_block_rotation, zigzag_permutation)

K, BLOCK = 256, 64


def _activations(rows=96, k=K, seed=0):
    """Gaussian activations with a few planted outlier channels (as in DiT activations)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[:, 5] *= 40.0
    x[:, 70] = 25.0 + x[:, 70]  # an outlier channel with an offset
    x[:, 200] *= 15.0
    return x


@pytest.fixture(scope="module")
def calibrated():
    x = _activations()
    return x, calibrate_duquant(x, BLOCK, steps=64, seed=3)


def _reference_matrix(k, r1, perm, r2):
    """blockdiag(r1) @ P @ blockdiag(r2) with P[perm[i], i] = 1, built by hand."""
    p = np.zeros((k, k))
    p[perm, np.arange(k)] = 1.0
    n = k // r1.shape[0]
    return block_diag(*[r1] * n) @ p @ block_diag(*[r2] * n)


def test_rotations_orthogonal_and_perm_bijective(calibrated):
    _, (r1, perm, r2) = calibrated
    for r in (r1, r2):
        assert r.dtype == np.float64 and r.shape == (BLOCK, BLOCK)
        np.testing.assert_allclose(r @ r.T, np.eye(BLOCK), rtol=0, atol=1e-10)
    assert perm.dtype == np.int32 and perm.shape == (K,)
    np.testing.assert_array_equal(np.sort(perm), np.arange(K))


def test_calibration_reduces_the_activation_peak(calibrated):
    x, (r1, perm, r2) = calibrated
    x_tilde = x.astype(np.float64) @ _reference_matrix(K, r1, perm, r2)
    assert np.abs(x_tilde).max() < 0.5 * np.abs(x).max()


def test_calibration_is_deterministic(calibrated):
    x, (r1, perm, r2) = calibrated
    again = calibrate_duquant(x, BLOCK, steps=64, seed=3)
    np.testing.assert_array_equal(again[0], r1)
    np.testing.assert_array_equal(again[1], perm)
    np.testing.assert_array_equal(again[2], r2)


def test_apply_equals_dense_matrix(calibrated):
    x, (r1, perm, r2) = calibrated
    m = duquant_matrix(K, r1, perm, r2)
    assert m.dtype == np.float64 and m.shape == (K, K)
    np.testing.assert_allclose(m, _reference_matrix(K, r1, perm, r2), rtol=0, atol=1e-12)
    xs = x.reshape(4, 24, K)
    got = np.asarray(jax.jit(apply_duquant)(xs, r1, perm, r2))
    assert got.dtype == np.float32 and got.shape == xs.shape
    expected = xs.astype(np.float64) @ m
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_weight_fold_preserves_the_product(calibrated):
    x, (r1, perm, r2) = calibrated
    w = np.random.default_rng(1).standard_normal((K, 48))
    m = duquant_matrix(K, r1, perm, r2)
    folded = np.asarray(apply_duquant(x, r1, perm, r2), np.float64) @ (m.T @ w)
    expected = x.astype(np.float64) @ w
    assert np.linalg.norm(folded - expected) <= 1e-5 * np.linalg.norm(expected)


def test_zigzag_hand_examples():
    # ranks: ch4 (8), ch2 (7), ch0 (5), ch3 (3), ch5 (2), ch1 (1); snake over 3 blocks: 0,1,2,2,1,0
    np.testing.assert_array_equal(zigzag_permutation([5, 1, 7, 3, 8, 2], 2), [4, 1, 2, 5, 0, 3])
    # channel i has rank i; 4 blocks of 3 get ranks (0,7,8), (1,6,9), (2,5,10), (3,4,11)
    perm = zigzag_permutation(12.0 - np.arange(12), 3)
    np.testing.assert_array_equal(perm, [0, 7, 8, 1, 6, 9, 2, 5, 10, 3, 4, 11])
    assert perm.dtype == np.int32
    # a single block is just the ranking (ties keep channel order)
    np.testing.assert_array_equal(zigzag_permutation([1, 3, 3, 2], 4), [1, 2, 3, 0])


def test_zigzag_gives_each_block_one_channel_per_rank_group():
    absmax = np.abs(np.random.default_rng(2).standard_t(2, size=512))
    perm = zigzag_permutation(absmax, 64)
    rank = np.empty(512, int)
    rank[np.argsort(-absmax)] = np.arange(512)
    for block in rank[perm].reshape(8, 64):  # ranks 8j..8j+7 are spread over the 8 blocks
        np.testing.assert_array_equal(np.sort(block // 8), np.arange(64))
        assert np.all(np.diff(block) > 0)  # inside a block, channels stay in descending order


def test_greedy_rotation_spreads_a_planted_outlier_channel():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((200, 32)).astype(np.float32)
    x[:, 9] *= 30.0
    r = greedy_block_rotation(x, steps=32, seed=0)
    np.testing.assert_allclose(r @ r.T, np.eye(32), rtol=0, atol=1e-10)
    rotated = x.astype(np.float64) @ r
    assert np.abs(rotated).max() < 0.5 * np.abs(x).max()
    assert np.ptp(rotated) <= np.ptp(x)


def test_one_greedy_step_swaps_the_uniform_column_onto_the_outlier_channel():
    # base rotation Q has first column 1/sqrt(B); exchanging row/col 0 with channel c gives a
    # rotation whose column c is uniform, and the spread 10 -> 10 * (max - min of a unit row)
    x = np.zeros((2, 16), np.float32)
    x[1, 11] = -10.0
    r = greedy_block_rotation(x, steps=1, seed=7)
    np.testing.assert_allclose(r[:, 11], np.full(16, 0.25), rtol=0, atol=1e-12)
    np.testing.assert_allclose(r[11, :] @ r[11, :], 1.0, atol=1e-12)
    assert not np.allclose(r, np.eye(16))
    other = greedy_block_rotation(x, steps=1, seed=8)
    assert not np.allclose(r, other)  # the seed drives the random part of the base rotation


def test_greedy_rotation_is_identity_when_no_step_helps():
    # every row equal to the constant vector: each rotation moves mass into one channel
    np.testing.assert_array_equal(greedy_block_rotation(np.ones((3, 8)), steps=8), np.eye(8))
    np.testing.assert_array_equal(greedy_block_rotation(np.ones((3, 8)), steps=0), np.eye(8))


def test_invalid_inputs_raise_clear_errors():
    x = np.random.default_rng(5).standard_normal((4, 100)).astype(np.float32)
    with pytest.raises(ValueError, match="^block"):
        calibrate_duquant(x, 64)
    with pytest.raises(ValueError, match="^x"):
        calibrate_duquant(x[0], 4)
    with pytest.raises(ValueError, match="^block"):
        zigzag_permutation(np.ones(100), 64)
    with pytest.raises(ValueError, match="^steps"):
        greedy_block_rotation(x[:, :4], steps=-1)
    with pytest.raises(ValueError, match="^perm"):
        duquant_matrix(8, np.eye(4), np.array([0, 1, 2, 3, 4, 5, 6, 6]), np.eye(4))
    with pytest.raises(ValueError, match="^x"):
        apply_duquant(np.ones((2, 10)), np.eye(4), np.arange(10), np.eye(4))
