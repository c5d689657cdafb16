"""The float low-rank branch of a quantized layer (``Recipe.low_rank``).

SVDQuant (Li et al., 2025) keeps the top singular part of the smoothed weight in 16 bits and
quantizes only the residual, whose range is much smaller. Here the split is made after the
layer's own transform (smoothing and / or rotation), and the branch is then refitted to what
the quantized residual really misses:

1. ``W̃ ≈ D0 U0``: the top-r singular part (``D0 = U_r sqrt(S_r)``, ``U0 = sqrt(S_r) V_rᵀ``,
   balanced so bf16 rounds both factors alike), stored as bf16;
2. the residual ``R = W̃ - D0 U0`` (of the rounded factors) is quantized (GPTQ, clip search);
3. the branch that best corrects the rounding in the layer's output metric,
   ``argmin_{rank r} ||X̃ (W̃ - deq(R_q) - D U)||²``: with ``Cᵀ C = X̃ᵀ X̃ + damp I`` (the damped
   Gram GPTQ uses), ``D U = C⁻¹ SVD_r(C (W̃ - deq(R_q)))``. It replaces the first branch only when
   its (bf16) output error is lower, so the refit can never hurt on the calibration rows.

With a branch per time segment (``Recipe.low_rank_per_segment``) step 3 runs once per segment
on that segment's Gram, around the one shared quantized residual.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from trdq_jax.quant.gptq import damped_hessian

BRANCH_DTYPE = ml_dtypes.bfloat16


def check_rank(rank: int, k: int, n: int, path: str) -> None:
    """A rank the layer can hold: ``rank <= min(K, N)`` (ValueError naming the layer)."""
    if rank > min(k, n):
        raise ValueError(f"Recipe.low_rank: rank {rank} exceeds min(K, N) = {min(k, n)} of "
                         f"layer {path} (kernel [{k}, {n}]); choose a rank <= {min(k, n)}")


def _rounded(down: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The factors as stored (bf16), returned as float32 values."""
    return (down.astype(BRANCH_DTYPE).astype(np.float32),
            up.astype(BRANCH_DTYPE).astype(np.float32))


def top_singular(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(down [K, r], up [r, N])`` of the best rank-r approximation of ``w [K, N]``,
    rounded to bf16 values."""
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return _rounded(u[:, :rank] * root, root[:, None] * vt[:rank])


def _cholesky_upper(gram) -> np.ndarray:
    """``C`` float64 ``[K, K]`` upper triangular with ``Cᵀ C`` = the damped Gram."""
    h = np.asarray(damped_hessian(jnp.asarray(gram, jnp.float32)), np.float64)
    return np.linalg.cholesky(h).T


def output_error(delta: np.ndarray, c: np.ndarray) -> float:
    """``||C delta||²``: the output error of a weight error ``delta [K, N]`` over the rows whose
    damped Gram is ``Cᵀ C``."""
    return float(np.sum((c @ np.asarray(delta, np.float64)) ** 2))


def weighted_fit(error: np.ndarray, c: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(down, up)`` (bf16 values): the rank-r ``D U`` minimising
    ``||C (error - D U)||_F`` (Eckart-Young in the metric of ``Cᵀ C``)."""
    u, s, vt = np.linalg.svd(c @ np.asarray(error, np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    down = np.linalg.solve(c, u[:, :rank] * root)  # C is triangular and well conditioned (damped)
    return _rounded(down, root[:, None] * vt[:rank])


def refit(w: np.ndarray, deq_residual: np.ndarray, first: tuple, grams: list,
          rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Branches ``(down [L, K, r], up [L, r, N])`` bf16, one per Gram of ``grams`` (``L``
    Grams of the transformed rows ``[K, K]``): each the better, on its own rows, of ``first``
    (the top-r split the residual was made from) and the weighted fit to ``w - deq_residual``.

    The branch corrects the weight's rounding only: a fit that also absorbed the activation
    codes' error on the calibration rows (a reduced-rank regression onto the quantized
    layer's output error) lowered every layer's error and cost 3.2 dB end to end on
    digits-dit W4A4 r=8 (31.1 -> 27.9 dB): per-token rounding noise is not low-rank, and
    fitting it overfits the calibration rows.
    """
    error = np.asarray(w, np.float64) - np.asarray(deq_residual, np.float64)
    downs, ups = [], []
    for gram in grams:
        c = _cholesky_upper(gram)
        candidate = weighted_fit(error, c, rank)
        before = output_error(error - first[0].astype(np.float64) @ first[1], c)
        after = output_error(error - candidate[0].astype(np.float64) @ candidate[1], c)
        down, up = candidate if after < before else first
        downs.append(down)
        ups.append(up)
    return (np.stack(downs).astype(BRANCH_DTYPE), np.stack(ups).astype(BRANCH_DTYPE))
