"""W8A8 / W4A8 integer matmul with fused dequantisation and segment-indexed scales.

    acc[m, n] = sum_k x_q[m, k] * w_q[(s,) k, n]          int8 x int8 -> exact int32
    y[m, n]   = (acc - x_zero[m] * w_colsum[s, n]) * x_scale[m] * w_scale[s, n] + bias[n]

``s`` is the time segment (a traced int32 scalar: changing it never recompiles). Two kernel
variants share the tile product and the epilogue (``pallas_kernels/_int8_kernels.py``):

``"grid_k"`` (TPU / Mosaic, and the default in interpret mode): grid ``(M/bm, N/bn, K/bk)``, an
  int32 accumulator in scratch zeroed at ``k == 0`` and finalised at the last ``k`` under
  ``pl.when``; the segment is a scalar-prefetch operand read by the BlockSpec index maps, so only
  the segment's scale row (and weight copy, when there is one per segment) is fetched.
  Expected on TPU: int8 x int8 -> int32 on the MXU, the fast path of v5e / v5p / v6e (v4 and older
  have no int8 speed-up). NOT verified on a TPU (written on a CPU-only machine): it runs in
  interpret mode and lowers to Mosaic through ``jax.export(..., platforms=["tpu"])``; Mosaic's
  compile, correctness on the chip and speed are unverified.
``"loop_k"`` (GPU / Triton, which supports neither scratch buffers nor scalar prefetch): grid
  ``(M/bm, N/bn)``, the K loop inside the kernel with the accumulator as a loop carry; the
  segment is an ordinary int32 operand indexing the scale rows / weight copy in the kernel.
  Expected on GPU: Triton's int8 dot with int32 accumulation (sm80+). It runs in interpret mode
  and lowers to Triton IR from CPU; compiling and running on a GPU is unverified.

int4 (``w_bits=4``): weights are ``trdq_jax.quant.quantizers.pack_int4`` bytes (even K row in
the low nibble). The kernel sign-extends both nibbles of a packed tile and takes two half-depth
dots against the even and odd activation columns (split once outside the kernel), so nothing is
interleaved in the kernel. Ragged M / N / K are zero-padded to block multiples (exact for the
integer dot) and the result is sliced.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import platform
from pallas_kernels._int8_kernels import VARIANTS, integer_matmul

__all__ = ["VARIANTS", "int8_matmul_acc", "w8a8_matmul"]


def _as_array(value, name: str):
    try:
        return jnp.asarray(value)
    except TypeError:
        raise ValueError(f"{name}: expected an array, got {type(value).__name__}") from None


def _check_activations(x_q):
    x_q = _as_array(x_q, "x_q")
    if x_q.ndim != 2 or x_q.dtype != jnp.int8:
        raise ValueError(f"x_q: expected int8 codes [M, K], got {x_q.dtype} {x_q.shape}")
    return x_q


def _check_weights(w_q, k: int, w_bits) -> tuple[jax.Array, bool]:
    """-> (w_q as [Sw, K or ceil(K/2), N], packed)."""
    if w_bits not in (4, 8) or isinstance(w_bits, bool):
        raise ValueError(f"w_bits: expected 8 (int8 codes) or 4 (packed int4 bytes), "
                         f"got {w_bits!r}")
    w_q = _as_array(w_q, "w_q")
    packed = w_bits == 4
    want = (jnp.uint8, "uint8 [ceil(K/2), N] or [S, ceil(K/2), N]") if packed else (
        jnp.int8, "int8 [K, N] or [S, K, N]")
    if w_q.ndim not in (2, 3) or w_q.dtype != want[0]:
        raise ValueError(f"w_q: expected {want[1]} for w_bits={w_bits}, "
                         f"got {w_q.dtype} {w_q.shape}")
    w_q = w_q if w_q.ndim == 3 else w_q[None]
    rows = w_q.shape[1]
    if (packed and not 2 * rows - 1 <= k <= 2 * rows) or (not packed and rows != k):
        raise ValueError(f"w_q: {rows} rows do not match x_q's K={k} "
                         f"({'ceil(K/2)' if packed else 'K'} rows expected)")
    return w_q, packed


def _check_block_sizes(block_sizes, m, n, k, packed):
    if block_sizes is None:
        return platform.default_block_sizes(m, n, k, packed=packed)
    return platform.check_block_sizes(block_sizes, even_k=packed)


def _check_segment(segment):
    segment = _as_array(segment, "segment")
    if segment.ndim != 0 or not jnp.issubdtype(segment.dtype, jnp.integer):
        raise ValueError(f"segment: expected an integer scalar, "
                         f"got {segment.dtype} {segment.shape}")
    return segment.astype(jnp.int32)


def _check_variant(variant, interpret: bool) -> str:
    if variant is None:
        return "loop_k" if (platform.backend_name() == "gpu" and not interpret) else "grid_k"
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected None or one of {VARIANTS}, got {variant!r}")
    return variant


def _per_token(value, m: int, name: str, dtype):
    """Scalar, ``[M]`` or ``[M, 1]`` -> ``[M, 1]`` of ``dtype``."""
    value = _as_array(value, name)
    if value.size == 1:
        return jnp.broadcast_to(value.reshape(1, 1).astype(dtype), (m, 1))
    if value.shape not in ((m,), (m, 1)):
        raise ValueError(f"{name}: expected a scalar, [M] or [M, 1] with M={m}, got {value.shape}")
    return value.reshape(m, 1).astype(dtype)


def _per_segment(value, n: int, name: str, dtype):
    """``[N]`` or ``[S, N]`` -> ``[S, N]`` of ``dtype``."""
    value = _as_array(value, name)
    if value.ndim not in (1, 2) or value.shape[-1] != n:
        raise ValueError(f"{name}: expected [N] or [S, N] with N={n}, got {value.shape}")
    return (value if value.ndim == 2 else value[None]).astype(dtype)


def _check_zero_point(x_zero, w_colsum, w_scale, shape_zero, shape_colsum):
    """-> ``(x_zero, w_colsum)`` shaped by ``shape_zero`` / ``shape_colsum`` (which check them),
    or ``(None, None)`` for symmetric activations; the column sums are required with a zero
    point and need one row per segment of ``w_scale``."""
    if x_zero is None:
        return None, None
    x_zero = shape_zero(x_zero)
    if w_colsum is None:
        raise ValueError("w_colsum: required when x_zero is given (zero-point correction)")
    w_colsum = shape_colsum(w_colsum)
    if w_colsum.shape[0] != w_scale.shape[0]:
        raise ValueError(f"w_colsum: expected {w_scale.shape[0]} segment rows like w_scale, "
                         f"got {w_colsum.shape}")
    return x_zero, w_colsum


def _check_bias_and_out_dtype(bias, n: int, out_dtype):
    """-> bias as float32 ``[N]`` or None; ValueError for a bad bias or a non-float out_dtype."""
    if bias is not None:
        bias = _as_array(bias, "bias")
        if bias.shape != (n,):
            raise ValueError(f"bias: expected None or [N] with N={n}, got {bias.shape}")
        bias = bias.astype(jnp.float32)
    if not jnp.issubdtype(jnp.dtype(out_dtype), jnp.floating):
        raise ValueError(f"out_dtype: expected a floating dtype, got {out_dtype!r}")
    return bias


def w8a8_matmul(x_q, w_q, x_scale, x_zero, w_scale, w_colsum, bias=None, segment=0, *,
                w_bits: int = 8, out_dtype=jnp.float32, block_sizes=None, interpret=None,
                variant: str | None = None) -> jax.Array:
    """Integer matmul with the dequantisation epilogue fused in; returns ``[M, N]`` ``out_dtype``.

    Args:
      x_q: int8 ``[M, K]`` activation codes.
      w_q: int8 ``[K, N]`` codes (``w_bits=8``; any width <= 8 stored as int8), or uint8
        ``[ceil(K/2), N]`` packed int4 (``w_bits=4``); a leading axis ``[S, ...]`` holds one
        weight copy per segment (then S must match ``w_scale``).
      x_scale: float32 ``[M, 1]`` / ``[M]`` per-token scales, or a scalar.
      x_zero: int32 ``[M, 1]`` / ``[M]`` / scalar activation zero points, or None (symmetric).
      w_scale: float32 ``[S, N]`` (or ``[N]``) per-channel weight scales, one row per segment.
      w_colsum: int32 ``[S, N]`` (or ``[N]``) column sums of the codes; unused when x_zero is None.
      bias: float32 ``[N]`` or None.
      segment: int32 scalar (may be traced) selecting the scale row (clipped to [0, S-1]).
      block_sizes: ``(bm, bn, bk)`` or None for ``platform.default_block_sizes``.
      interpret: None = interpret exactly on CPU.
      variant: ``"grid_k"`` / ``"loop_k"`` or None (``loop_k`` on GPU, else ``grid_k``).
    """
    x_q = _check_activations(x_q)
    m, k = x_q.shape
    w_q, packed = _check_weights(w_q, k, w_bits)
    n = w_q.shape[-1]
    w_scale = _per_segment(w_scale, n, "w_scale", jnp.float32)
    if w_q.shape[0] not in (1, w_scale.shape[0]):
        raise ValueError(f"w_q: {w_q.shape[0]} weight copies but w_scale has "
                         f"{w_scale.shape[0]} segment rows (expected 1 copy or one per row)")
    x_scale = _per_token(x_scale, m, "x_scale", jnp.float32)
    x_zero, w_colsum = _check_zero_point(
        x_zero, w_colsum, w_scale, lambda z: _per_token(z, m, "x_zero", jnp.int32),
        lambda c: _per_segment(c, n, "w_colsum", jnp.int32))
    bias = _check_bias_and_out_dtype(bias, n, out_dtype)
    interpret = platform.resolve_interpret(interpret)
    return integer_matmul(
        x_q, w_q, x_scale, x_zero, w_scale, w_colsum, bias, _check_segment(segment), k=k,
        packed=packed, blocks=_check_block_sizes(block_sizes, m, n, k, packed),
        out_dtype=np.dtype(out_dtype), interpret=interpret,
        variant=_check_variant(variant, interpret), acc_only=False)


def int8_matmul_acc(x_q, w_q, segment=0, *, w_bits: int = 8, block_sizes=None, interpret=None,
                    variant: str | None = None) -> jax.Array:
    """The raw int32 accumulator ``x_q @ w_q[segment]`` ``[M, N]`` of the same kernels (no
    epilogue): exact integer arithmetic, for testing and for callers that dequantise themselves.
    Arguments as in ``w8a8_matmul``; the segment selects the weight copy of a ``[S, ...]`` w_q."""
    x_q = _check_activations(x_q)
    m, k = x_q.shape
    w_q, packed = _check_weights(w_q, k, w_bits)
    n = w_q.shape[-1]
    interpret = platform.resolve_interpret(interpret)
    dummy_scale = jnp.zeros((w_q.shape[0], n), jnp.float32)  # sets S for the segment clip
    return integer_matmul(
        x_q, w_q, None, None, dummy_scale, None, None, _check_segment(segment), k=k,
        packed=packed, blocks=_check_block_sizes(block_sizes, m, n, k, packed),
        out_dtype=np.dtype(np.int32), interpret=interpret,
        variant=_check_variant(variant, interpret), acc_only=True)
