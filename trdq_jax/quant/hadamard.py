"""Hadamard matrices of order K * 2^m, built exactly in integers, and fast rotations with them.

Construction (numpy, int64, exact):
  * Sylvester doubling for powers of two: H_2n = [[H, H], [H, -H]].
  * Paley construction I for a prime q = 3 (mod 4): a Hadamard matrix of order q + 1.
  * Paley construction II for a prime q = 1 (mod 4): a Hadamard matrix of order 2 (q + 1).
  * Kronecker product H_n = H_K (x) H_{2^m} with the K x K "core" as the outer (most significant)
    factor, as QuaRot does.

Every order n is written uniquely as n = K * 2^m with K = 1 or K = 4 * odd (K = 4 mod 8), and
n is supported when a Paley construction with a prime gives that K exactly. Covered cores
(up to 256): 12, 20, 28, 36, 44, 60, 68, 76, 84, 108, 124, 132, 140, 148, 164, 180, 196, 204,
212, 220, 228, 252 (52, 92, 100, 116, 156, 172, 188, 236, 244 would need prime-power fields or
Williamson matrices and are not built). That includes every DiT / UNet width in use:
72 = 36*2, 1152 = 36*2^5, 4608 = 36*2^7, 320 = 20*2^4, 640, 1280, 5120 = 20*2^8, 192 = 12*2^4,
384, 3072 = 12*2^8.

The fast transform never builds the n x n matrix: the last axis is reshaped to
(K, 2^a, 2^b, ...) with factors of at most 128 and each factor is contracted with one small
einsum (the Kronecker-factored scheme of fedjax's walsh_hadamard, extended to K * 2^m).
"""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

_MAX_CORE = 256
_MAX_FACTOR = 128


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _core_construction(k: int) -> tuple[str, int] | None:
    """('paley1', q) or ('paley2', q) building a Hadamard matrix of order exactly k, else None."""
    if _is_prime(k - 1) and (k - 1) % 4 == 3:
        return "paley1", k - 1
    if k % 2 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return "paley2", k // 2 - 1
    return None


_CORES = {k: c for k in range(12, _MAX_CORE + 1, 8) if (c := _core_construction(k)) is not None}
SUPPORTED_CORES: tuple[int, ...] = (1,) + tuple(sorted(_CORES))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(j - i) over GF(q), q prime; chi is the quadratic character (chi(0) = 0)."""
    squares = np.zeros(q, dtype=np.int64)
    squares[(np.arange(1, q) ** 2) % q] = 1
    chi = np.where(squares == 1, 1, -1)
    chi[0] = 0
    idx = np.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley1(q: int) -> np.ndarray:
    """Order q + 1 for prime q = 3 mod 4: H = I + S with S = [[0, 1^T], [-1, Q]] skew-symmetric."""
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(q + 1, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1) for prime q = 1 mod 4, from the symmetric conference matrix C.

    Every 0 entry of C becomes [[1, -1], [-1, -1]] and every +-1 becomes +-[[1, 1], [1, -1]].
    """
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    zero_block = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    sign_block = np.array([[1, 1], [1, -1]], dtype=np.int64)
    return np.kron(np.eye(q + 1, dtype=np.int64), zero_block) + np.kron(c, sign_block)


@functools.lru_cache(maxsize=None)
def _core_matrix(k: int) -> np.ndarray:
    if k == 1:
        return np.ones((1, 1), dtype=np.int64)
    kind, q = _CORES[k]
    h = _paley1(q) if kind == "paley1" else _paley2(q)
    h.setflags(write=False)
    return h


def _sylvester(size: int) -> np.ndarray:
    """Sylvester Hadamard matrix of a power-of-two order (symmetric), int64, doubled in place."""
    h = np.empty((size, size), dtype=np.int64)
    h[0, 0] = 1
    half = 1
    while half < size:
        top_left = h[:half, :half]
        h[:half, half:2 * half] = top_left
        h[half:2 * half, :half] = top_left
        np.negative(top_left, out=h[half:2 * half, half:2 * half])
        half *= 2
    return h


def supported_factorization(n: int) -> tuple[int, int]:
    """(K, m) with n = K * 2^m, K in SUPPORTED_CORES; ValueError naming n if there is none."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive integer Hadamard size, got {n!r}")
    n = int(n)
    m = (n & -n).bit_length() - 1  # 2-adic valuation
    odd = n >> m
    if odd == 1:
        return 1, m
    k = 4 * odd
    if m >= 2 and k in _CORES:
        return k, m - 2
    raise ValueError(f"n: {n} has no Hadamard construction here; supported sizes are K*2^m with "
                     f"K in {{{', '.join(map(str, SUPPORTED_CORES))}}}")


def hadamard_matrix(n: int) -> np.ndarray:
    """Hadamard matrix H [n, n] int64 with entries +-1 and H H^T = n I, equal to H_K (x) H_{2^m}."""
    k, m = supported_factorization(n)
    if k == 1:
        return _sylvester(n)
    p = 2 ** m
    out = np.empty((k, p, k, p), dtype=np.int64)
    np.multiply(_core_matrix(k)[:, None, :, None], _sylvester(p)[None, :, None, :], out=out)
    return out.reshape(n, n)


def random_signs(n: int, seed: int) -> np.ndarray:
    """Deterministic vector of +-1, float32 [n], drawn with numpy's default_rng(seed)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    bits = np.random.default_rng(seed).integers(0, 2, size=int(n))
    return (2 * bits - 1).astype(np.float32)


def hadamard_rotation(n: int, seed: int | None = None) -> np.ndarray:
    """Dense orthogonal float64 [n, n] equal to diag(random_signs(n, seed)) H / sqrt(n).

    With seed None no sign flip is applied. ``x @ hadamard_rotation(n, s)`` equals
    ``hadamard_transform(x, random_signs(n, s))``.
    """
    h = hadamard_matrix(n).astype(np.float64) / math.sqrt(n)
    if seed is None:
        return h
    return random_signs(n, seed).astype(np.float64)[:, None] * h


@functools.lru_cache(maxsize=None)
def _factor_matrices(n: int) -> tuple[np.ndarray, ...]:
    """Small float32 factors whose Kronecker product (outer first) is H_n (unnormalised)."""
    k, m = supported_factorization(n)
    factors = [] if k == 1 else [_core_matrix(k)]
    if m:
        parts = -(-m // 7)  # number of power-of-two factors, each <= 2^7 = 128
        sizes = [m // parts + (i < m % parts) for i in range(parts)]
        factors += [_sylvester(2 ** s) for s in sizes]
    return tuple(f.astype(np.float32) for f in factors)


@functools.lru_cache(maxsize=None)
def _normalised_factor_matrices(n: int) -> tuple[np.ndarray, ...]:
    """``_factor_matrices(n)`` with 1/sqrt(n) folded into the last factor: the scale rides in a
    constant of the last contraction instead of costing one more pass over the activations."""
    factors = list(_factor_matrices(n))
    if factors:
        factors[-1] = (factors[-1].astype(np.float64) / math.sqrt(n)).astype(np.float32)
    return tuple(factors)


def _check_signs(signs, length: int, what: str):
    signs = jnp.asarray(signs, dtype=jnp.float32)
    if signs.shape != (length,):
        raise ValueError(f"signs: expected shape ({length},) {what}, got {signs.shape}")
    return signs


def hadamard_transform(x, signs=None):
    """x [..., n] -> x @ (diag(signs) H_n / sqrt(n)), float32 [..., n]; jit-able.

    Applies the Kronecker factors of H_n one axis at a time (O(n * sum of factor sizes)).
    """
    x = jnp.asarray(x, dtype=jnp.float32)
    if x.ndim == 0:
        raise ValueError("x: expected an array of shape [..., n], got a scalar")
    n = x.shape[-1]
    factors = _normalised_factor_matrices(n)
    if signs is not None:
        x = x * _check_signs(signs, n, "matching x's last axis")
    lead = x.shape[:-1]
    y = x.reshape(lead + tuple(f.shape[0] for f in factors))
    letters = "abcdefgh"[: len(factors)]
    # Last axis first: that contraction is a plain GEMM on x as laid out, so whatever produced x
    # (e.g. a GELU) is not fused into a transposing copy. Factors on different axes commute.
    for i in reversed(range(len(factors))):
        f = factors[i]
        out = letters[:i] + "z" + letters[i + 1:]
        y = jnp.einsum(f"...{letters},{letters[i]}z->...{out}", y, jnp.asarray(f),
                       precision=lax.Precision.HIGHEST)
    return y.reshape(lead + (n,))


def block_hadamard_transform(x, block: int, signs=None):
    """x [..., n] -> one Hadamard rotation of size `block` applied to each of the n/block blocks.

    Equals x @ blockdiag(diag(s) H_block / sqrt(block), ...). ``signs`` is float [n] (one sign per
    channel) or [block] (the same signs in every block). Returns float32 [..., n].
    """
    x = jnp.asarray(x, dtype=jnp.float32)
    if x.ndim == 0:
        raise ValueError("x: expected an array of shape [..., n], got a scalar")
    n = x.shape[-1]
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1 \
            or n % block:
        raise ValueError(f"block: expected a positive divisor of n={n}, got {block!r}")
    supported_factorization(int(block))
    block_signs = None
    if signs is not None:
        signs = jnp.asarray(signs, dtype=jnp.float32)
        if signs.shape == (n,):
            x = x * signs
        else:
            block_signs = _check_signs(signs, block, f"or ({n},)")
    blocks = x.reshape(x.shape[:-1] + (n // block, block))
    return hadamard_transform(blocks, block_signs).reshape(x.shape)
