"""DuQuant-style activation transform as released with TR-DQ: block rotation R1, zigzag
permutation P, block rotation R2 (DuQuant, Lin et al. 2024, as the TR-DQ release uses it).

For activations x [..., K] and a Flax kernel W [K, N]:
    x_tilde = x @ M,   M = blockdiag(R1) @ P @ blockdiag(R2)   (one B x B block repeated K/B times)
    W_tilde = M^T @ W, so x_tilde @ W_tilde == x @ W because M is orthogonal.
Calibration runs offline on numpy / jitted jnp; applying runs online in jnp.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _base_rotation(block: int, seed) -> np.ndarray:
    """Seeded orthogonal float64 [B, B] whose first column is the uniform vector 1/sqrt(B).

    A Householder reflection maps e1 to the uniform vector; it is multiplied by a random
    orthogonal matrix acting on the other B - 1 coordinates (which keeps column 0).
    """
    uniform = np.full(block, block ** -0.5)
    direction = np.eye(block)[0] - uniform
    direction /= np.linalg.norm(direction)
    reflection = np.eye(block) - 2.0 * np.outer(direction, direction)
    gaussian = np.random.default_rng(seed).standard_normal((block - 1, block - 1))
    q, r = np.linalg.qr(gaussian)
    rest = np.eye(block)
    rest[1:, 1:] = q * np.sign(np.diag(r))  # sign fix makes q Haar-distributed
    return reflection @ rest


def _swap_first(base: np.ndarray, channel: int) -> np.ndarray:
    """The base rotation with row and column 0 exchanged with row and column `channel`."""
    order = np.arange(base.shape[0])
    order[[0, channel]] = order[[channel, 0]]
    return base[order][:, order]


@functools.partial(jax.jit, static_argnames="steps")
def _greedy_search(x, base, steps: int):
    """Greedy outlier spreading; returns (chosen channel per step [steps], spread [steps + 1])."""
    block = base.shape[0]

    def spread(data):
        return data.max() - data.min()

    def step(data, _):
        channel = jnp.argmax(jnp.abs(data)) % block
        order = jnp.arange(block).at[0].set(channel).at[channel].set(0)
        rotation = base[order][:, order]
        data = jnp.matmul(data, rotation, precision=lax.Precision.HIGHEST)
        return data, (channel, spread(data))

    _, (channels, spreads) = lax.scan(step, x, None, length=steps)
    return channels, jnp.concatenate([spread(x)[None], spreads])


def greedy_block_rotation(x, *, steps: int = 256, seed=0) -> np.ndarray:
    """Orthogonal float64 [B, B] spreading the outliers of x [R, B] (rows: pooled B-wide chunks).

    Each step exchanges channel 0 of a seeded base rotation (first column uniform) with the
    channel of the current largest |entry| and right-multiplies the data by it; the spread
    max - min is recorded. The product of the step prefix with the lowest spread is returned
    (identity when no step lowers it).
    """
    steps = _check_int(steps, "steps", 0)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 2:
        raise ValueError(f"x: expected a 2-D array [R, B] with R >= 1 and B >= 2, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x: expected finite values")
    block = x.shape[1]
    if steps == 0:
        return np.eye(block)
    base = _base_rotation(block, seed)
    search = _greedy_search(jnp.asarray(x), jnp.asarray(base, jnp.float32), steps)
    channels, spreads = jax.device_get(search)
    keep = int(np.argmin(spreads))  # first minimum: number of steps to keep
    rotation = np.eye(block)
    for channel in channels[:keep]:
        rotation = rotation @ _swap_first(base, int(channel))
    return rotation


def zigzag_permutation(channel_absmax, block: int) -> np.ndarray:
    """Permutation int32 [K] dealing channels (ranked by abs-max, descending) to the K/block blocks
    in snake order 0, 1, .., n-1, n-1, .., 0, 0, 1, ..; blocks are concatenated.

    Apply as x[..., perm]; every block then holds a similar mix of large and small channels.
    """
    absmax = np.asarray(channel_absmax, dtype=np.float64)
    if absmax.ndim != 1:
        raise ValueError(f"channel_absmax: expected a 1-D array [K], got shape {absmax.shape}")
    block = _check_int(block, "block", 1)
    if absmax.shape[0] % block:
        raise ValueError(f"block: expected a divisor of K={absmax.shape[0]}, got {block}")
    num_blocks = absmax.shape[0] // block
    ranked = np.argsort(-absmax, kind="stable")
    phase = np.arange(absmax.shape[0]) % (2 * num_blocks)
    block_of_rank = np.where(phase < num_blocks, phase, 2 * num_blocks - 1 - phase)
    return ranked[np.argsort(block_of_rank, kind="stable")].astype(np.int32)


def _block_matmul(x, rotation):
    """x [..., K] times blockdiag(rotation) (rotation [B, B], B | K)."""
    block = rotation.shape[0]
    blocks = x.reshape(x.shape[:-1] + (x.shape[-1] // block, block))
    return jnp.matmul(blocks, rotation, precision=lax.Precision.HIGHEST).reshape(x.shape)


def calibrate_duquant(x, block: int = 128, *, steps: int = 256, seed=0):
    """(r1 float64 [B, B], perm int32 [K], r2 float64 [B, B]) calibrated on activations x [R, K].

    r1 comes from x pooled as [-1, block] chunks; perm from the per-channel abs-max of
    x @ blockdiag(r1); r2 from the permuted data. K must be a multiple of `block`.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x: expected a 2-D activation matrix [R, K], got shape {x.shape}")
    block = _check_int(block, "block", 2)
    if x.shape[1] % block:
        raise ValueError(f"block: expected a divisor of K={x.shape[1]} (K must be a multiple of "
                         f"block), got {block}")
    seed_r1, seed_r2 = np.random.SeedSequence(seed).generate_state(2)
    r1 = greedy_block_rotation(x.reshape(-1, block), steps=steps, seed=seed_r1)
    rotated = _block_matmul(jnp.asarray(x), jnp.asarray(r1, jnp.float32))
    perm = zigzag_permutation(np.asarray(jnp.abs(rotated).max(axis=0)), block)
    permuted = np.asarray(rotated)[:, perm]
    r2 = greedy_block_rotation(permuted.reshape(-1, block), steps=steps, seed=seed_r2)
    return r1, perm, r2


def _check_transform(k: int, r1, perm, r2) -> int:
    block = r1.shape[-1]
    if r1.shape != (block, block) or r2.shape != (block, block):
        raise ValueError(f"r1, r2: expected square [B, B] matrices of one size, got {r1.shape} "
                         f"and {r2.shape}")
    if k % block:
        raise ValueError(f"x: expected a last axis K that is a multiple of B={block}, got K={k}")
    if perm.shape != (k,):
        raise ValueError(f"perm: expected shape ({k},), got {perm.shape}")
    return block


def apply_duquant(x, r1, perm, r2):
    """x [..., K] -> float32 ((x @ blockdiag(r1))[..., perm]) @ blockdiag(r2); jit-able."""
    x = jnp.asarray(x, jnp.float32)
    r1 = jnp.asarray(r1, jnp.float32)
    r2 = jnp.asarray(r2, jnp.float32)
    perm = jnp.asarray(perm)
    _check_transform(x.shape[-1], r1, perm, r2)
    rotated = jnp.take(_block_matmul(x, r1), perm, axis=-1)
    return _block_matmul(rotated, r2)


def duquant_matrix(k: int, r1, perm, r2) -> np.ndarray:
    """Dense float64 [K, K] M with apply_duquant(x) == x @ M; fold a kernel W [K, N] as M.T @ W."""
    k = _check_int(k, "K", 1)
    r1 = np.asarray(r1, np.float64)
    r2 = np.asarray(r2, np.float64)
    perm = np.asarray(perm)
    block = _check_transform(k, r1, perm, r2)
    if not np.array_equal(np.sort(perm), np.arange(k)):
        raise ValueError(f"perm: expected a permutation of 0..{k - 1}")
    first = np.kron(np.eye(k // block), r1)[:, perm]  # blockdiag(r1) @ P
    return (first.reshape(k, k // block, block) @ r2).reshape(k, k)
