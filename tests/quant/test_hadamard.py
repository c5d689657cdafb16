"""Hadamard construction checked exactly in integers; fast transform against dense float64."""
import math

import jax
import numpy as np
import pytest

from trdq_jax.quant.hadamard import (SUPPORTED_CORES, block_hadamard_transform, hadamard_matrix,
                                     hadamard_rotation, hadamard_transform, random_signs,
                                     supported_factorization)

MAX_N = 8192
REQUIRED = [72, 192, 320, 384, 640, 1152, 1280, 4608, 5120] + [2 ** i for i in range(14)]


def _sizes(core):
    n, out = core, []
    while n <= MAX_N:
        out.append(n)
        n *= 2
    return out


def _assert_hadamard_exact(h, n):
    """H H^T == n I, decided with exact integer arithmetic.

    n <= 1024: the full Gram matrix (entries are +-1, so every partial sum is an integer below
    2^11 that float64 BLAS holds exactly). Larger n: with E = H H^T - n I (symmetric, integer),
    check v^T E v == 0, i.e. |H^T v|^2 == n |v|^2, for 6 random integer vectors v in
    [-1024, 1024]^n; by Schwartz-Zippel E != 0 passes with probability < (2/2049)^6 < 2^-59.
    |H^T v| entries stay below 2^24 (exact in float64), their squares are summed in int64.
    """
    assert h.dtype == np.int64 and h.shape == (n, n)
    assert np.count_nonzero((h == 1) | (h == -1)) == n * n
    if n <= 1024:
        hf = h.astype(np.float64)
        np.testing.assert_array_equal((hf @ hf.T).astype(np.int64), n * np.eye(n, dtype=np.int64))
        return
    v = np.random.default_rng(n).integers(-1024, 1025, size=(n, 6))
    ht_v = np.zeros(v.shape)
    for i in range(0, n, 512):  # convert 512 rows at a time instead of a second n x n copy
        ht_v += h[i:i + 512].astype(np.float64).T @ v[i:i + 512]
    ht_v = ht_v.astype(np.int64)
    np.testing.assert_array_equal((ht_v * ht_v).sum(0), n * (v * v).sum(0))


def test_supported_cores_are_the_k_equal_4_mod_8_family():
    assert SUPPORTED_CORES[0] == 1
    assert all(k % 8 == 4 for k in SUPPORTED_CORES[1:])
    assert {12, 20, 28, 36, 44, 60}.issubset(SUPPORTED_CORES)


@pytest.mark.parametrize("core", SUPPORTED_CORES)
def test_every_supported_size_up_to_8192_is_exactly_hadamard(core):
    for n in _sizes(core):
        k, m = supported_factorization(n)
        assert (k, k * 2 ** m) == (core, n)
        _assert_hadamard_exact(hadamard_matrix(n), n)


def test_enumeration_covers_all_supported_sizes():
    expected = {n for core in SUPPORTED_CORES for n in _sizes(core)}
    found = set()
    for n in range(1, MAX_N + 1):
        try:
            supported_factorization(n)
        except ValueError:
            continue
        found.add(n)
    assert found == expected
    assert set(REQUIRED) <= found


def test_small_matrices_by_hand():
    np.testing.assert_array_equal(hadamard_matrix(1), [[1]])
    np.testing.assert_array_equal(hadamard_matrix(2), [[1, 1], [1, -1]])
    h24 = hadamard_matrix(24)  # H_12 (x) H_2: the outer factor is the 12-core
    np.testing.assert_array_equal(h24[::2, ::2], hadamard_matrix(12))
    np.testing.assert_array_equal(h24[1::2, 1::2], -hadamard_matrix(12))


@pytest.mark.parametrize("n", [100, 6, 172 * 2, 52 * 4, 2 * 9])
def test_unsupported_size_error_lists_supported_k(n):
    with pytest.raises(ValueError, match=r"^n: .*supported sizes are K\*2\^m with K in "
                                         r"\{1, 12, 20, 28, 36, 44"):
        hadamard_matrix(n)


@pytest.mark.parametrize("bad", [0, -4, 2.0, True])
def test_invalid_size_type(bad):
    with pytest.raises(ValueError, match="^n: "):
        supported_factorization(bad)


def test_random_signs_deterministic_pm_one():
    a, b, c = random_signs(1152, 3), random_signs(1152, 3), random_signs(1152, 4)
    assert a.dtype == np.float32 and a.shape == (1152,)
    assert set(np.unique(a)) == {-1.0, 1.0}
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)


@pytest.mark.parametrize("n", [72, 1152, 4608, 1024])
def test_fast_transform_matches_dense(n):
    x = np.random.default_rng(n).standard_normal((3, 2, n)).astype(np.float32)
    signs = random_signs(n, 11)
    h = hadamard_matrix(n).astype(np.float64)
    expected = ((x * signs).astype(np.float64) @ h) / math.sqrt(n)  # x @ diag(signs) H / sqrt(n)
    fast = np.asarray(jax.jit(hadamard_transform)(x, signs))
    assert fast.dtype == np.float32 and fast.shape == x.shape
    np.testing.assert_allclose(fast, expected, rtol=0, atol=1e-5)
    unsigned = np.asarray(hadamard_transform(x))
    np.testing.assert_allclose(unsigned, (x.astype(np.float64) @ h) / math.sqrt(n), rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("n", [72, 1152])
def test_dense_rotation_is_signed_normalised_hadamard(n):
    signs = random_signs(n, 11).astype(np.float64)
    dense = signs[:, None] * hadamard_matrix(n) / math.sqrt(n)
    np.testing.assert_allclose(hadamard_rotation(n, 11), dense, rtol=0, atol=1e-15)
    np.testing.assert_allclose(hadamard_rotation(n), hadamard_matrix(n) / math.sqrt(n), rtol=0,
                               atol=1e-15)


@pytest.mark.parametrize("n", [12, 72, 640])
def test_rotation_is_orthogonal(n):
    r = hadamard_rotation(n, 0)
    np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-12)
    x = np.random.default_rng(1).standard_normal((4, n)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(hadamard_transform(x, random_signs(n, 0))),
                                              axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_outlier_is_spread():
    x = np.zeros(1152, np.float32)
    x[517] = 100.0
    for signs in (None, random_signs(1152, 0)):
        y = np.asarray(hadamard_transform(x, signs))
        assert np.abs(y).max() < 10.0
        np.testing.assert_allclose(np.abs(y), 100 / math.sqrt(1152), rtol=1e-5)


def test_fast_transform_never_holds_the_dense_matrix():
    jaxpr = jax.make_jaxpr(hadamard_transform)(np.zeros((2, 4608), np.float32))
    sizes = [np.size(c) for c in jaxpr.consts]
    sizes += [np.size(v.val) for e in jaxpr.jaxpr.eqns for v in e.invars if hasattr(v, "val")]
    assert max(sizes, default=0) <= 128 * 128


@pytest.mark.parametrize("per_channel", [False, True])
def test_block_transform_matches_block_diagonal_dense(per_channel):
    n, block = 1152, 128
    x = np.random.default_rng(2).standard_normal((5, n)).astype(np.float32)
    signs = random_signs(n if per_channel else block, 5)
    full_signs = signs if per_channel else np.tile(signs, n // block)
    h = hadamard_matrix(block) / math.sqrt(block)
    dense = full_signs.astype(np.float64)[:, None] * np.kron(np.eye(n // block), h)
    got = np.asarray(block_hadamard_transform(x, block, signs))
    np.testing.assert_allclose(got, x.astype(np.float64) @ dense, rtol=0, atol=1e-5)


def test_block_transform_rejects_bad_block_and_signs():
    x = np.zeros((2, 1152), np.float32)
    with pytest.raises(ValueError, match="^block"):
        block_hadamard_transform(x, 100)
    with pytest.raises(ValueError, match="^n: 9"):
        block_hadamard_transform(x, 9)
    with pytest.raises(ValueError, match="^signs"):
        block_hadamard_transform(x, 128, np.ones(64))
    with pytest.raises(ValueError, match="^signs"):
        hadamard_transform(x, np.ones(64))
