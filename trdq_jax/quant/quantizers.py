"""Uniform integer quantizers: pure jnp, jit-friendly with `bits`, `symmetric`, `group_size` static.

Code convention: a b-bit code q is a signed integer stored as int8.
  * symmetric:  q in [-(2^(b-1) - 1), 2^(b-1) - 1], zero = None,          x ~ scale * q
  * asymmetric: q in [-2^(b-1), 2^(b-1) - 1], integer zero in that range,  x ~ scale * (q - zero)
Asymmetric ranges are widened to contain 0 first (as ViDiT-Q / TR-DQ do), so 0 is exactly
representable. Scales are float32 and strictly positive; zero points are int32.

FP8 (``Recipe.fp8``): a code is a float8 e4m3 number (``jnp.float8_e4m3fn``, 1 byte, largest
finite value 448), symmetric, ``x ~ scale * float(q)``; rounding is round-to-nearest-even of
``x / scale`` clipped to [-448, 448] (e4m3fn has no infinity: an unclipped overflow is NaN).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Smallest range used for a scale, so an all-zero tensor gets a tiny positive scale, not 0.
_RANGE_EPS = 1e-8
DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))


def check_bits(bits, name: str = "bits") -> int:
    """Return `bits` as int if it is an integer in 2..8, else raise ValueError naming `name`."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"{name}: expected an integer bit width in 2..8, got {bits!r}")
    return int(bits)


def _code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if symmetric else -qmax - 1), qmax


def scale_zero_from_range(x_min, x_max, bits: int, symmetric: bool):
    """(scale float32, zero int32 or None) mapping [x_min, x_max] onto the b-bit code range.

    Symmetric: scale = max(|x_min|, |x_max|) / (2^(b-1) - 1). Asymmetric: the range is widened
    to contain 0, scale = (x_max - x_min) / (2^b - 1), zero = round(qmin - x_min / scale).
    Shapes follow the broadcast of x_min and x_max.
    """
    bits = check_bits(bits)
    x_min = jnp.asarray(x_min, jnp.float32)
    x_max = jnp.asarray(x_max, jnp.float32)
    qmin, qmax = _code_range(bits, symmetric)
    if symmetric:
        absmax = jnp.maximum(jnp.abs(x_min), jnp.abs(x_max))
        return jnp.maximum(absmax, _RANGE_EPS) / qmax, None
    x_min = jnp.minimum(x_min, 0.0)
    x_max = jnp.maximum(x_max, 0.0)
    scale = jnp.maximum(x_max - x_min, _RANGE_EPS) / (qmax - qmin)
    zero = jnp.clip(jnp.round(qmin - x_min / scale), qmin, qmax).astype(jnp.int32)
    return scale, zero


def quantize(x, scale, zero, bits: int):
    """Round-to-nearest codes int8 = clip(round(x / scale) + zero); symmetric when zero is None."""
    bits = check_bits(bits)
    qmin, qmax = _code_range(bits, zero is None)
    q = jnp.round(jnp.asarray(x, jnp.float32) / scale)
    if zero is not None:
        q = q + zero
    return jnp.clip(q, qmin, qmax).astype(jnp.int8)


FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8 e4m3fn


def quantize_fp8(x, scale):
    """float8 e4m3 codes of ``x / scale`` (clipped to +-448, rounded to nearest even)."""
    return jnp.clip(jnp.asarray(x, jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


def fp8_scale(absmax):
    """Symmetric float8 scale float32 mapping ``absmax`` onto 448 (floored like the integer
    scales)."""
    return jnp.maximum(jnp.asarray(absmax, jnp.float32), _RANGE_EPS) / FP8_MAX


def dequantize(q, scale, zero=None):
    """float32 scale * (q - zero) (zero None means 0); float8 codes: scale * float(q)."""
    if jnp.issubdtype(jnp.asarray(q).dtype, jnp.floating):
        return jnp.asarray(q).astype(jnp.float32) * scale
    q = jnp.asarray(q, jnp.int32)
    if zero is not None:
        q = q - zero
    return q.astype(jnp.float32) * scale


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_clip_ratio(clip_ratio, scale_shape: tuple[int, ...]):
    ratio = jnp.asarray(clip_ratio, jnp.float32)
    try:
        np.broadcast_shapes(ratio.shape, scale_shape)
    except ValueError:
        raise ValueError(f"clip_ratio: expected a scalar or an array broadcastable to the scale "
                         f"shape {scale_shape}, got shape {ratio.shape}") from None
    if _is_concrete(ratio) and not bool(jnp.all((ratio > 0) & (ratio <= 1))):
        raise ValueError("clip_ratio: expected values in (0, 1]")
    return ratio


def _grouped(w, group_size):
    """w [K, N] -> [G, g, N] (G = 1, g = K for per-channel), validating group_size."""
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"w: expected a 2-D weight [K, N], got shape {w.shape}")
    k = w.shape[0]
    if group_size is None:
        return w[None]
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) \
            or group_size < 1 or k % group_size:
        raise ValueError(f"group_size: expected None or a positive divisor of K={k}, "
                         f"got {group_size!r}")
    return w.reshape(k // group_size, group_size, w.shape[1])


def quantize_weight(w, bits: int, *, symmetric: bool = True, group_size: int | None = None,
                    clip_ratio=1.0):
    """Quantize a Flax kernel w [K, N] per output channel (column) or per group of input rows.

    Returns (q int8 [K, N], scale float32, zero int32 or None) with scale/zero of shape [N]
    (group_size None) or [K // group_size, N]. `clip_ratio` (scalar, [N] or the scale shape, each
    in (0, 1]) shrinks the min/max range before the scale is computed.
    """
    bits = check_bits(bits)
    groups = _grouped(w, group_size)
    scale_shape = groups.shape[::2]
    ratio = _check_clip_ratio(clip_ratio, scale_shape)
    scale, zero = scale_zero_from_range(groups.min(axis=1) * ratio, groups.max(axis=1) * ratio,
                                        bits, symmetric)
    q = quantize(groups, scale[:, None], None if zero is None else zero[:, None], bits)
    q = q.reshape(groups.shape[0] * groups.shape[1], groups.shape[2])
    if group_size is None:
        return q, scale[0], None if zero is None else zero[0]
    return q, scale, zero


def dequantize_weight(q, scale, zero=None):
    """Inverse of quantize_weight: q int8 [K, N] with scale/zero [N] or [G, N] -> float32 [K, N]."""
    q = jnp.asarray(q)
    scale = jnp.asarray(scale, jnp.float32)
    if scale.ndim == 1:
        return dequantize(q, scale, zero)
    k, n = q.shape
    groups = q.reshape(scale.shape[0], k // scale.shape[0], n)
    zero_g = None if zero is None else jnp.asarray(zero)[:, None]
    return dequantize(groups, scale[:, None], zero_g).reshape(k, n)


def mse_clip_search(w, bits: int, *, symmetric: bool = True, group_size: int | None = None,
                    grid=DEFAULT_CLIP_GRID):
    """Best clip ratio per output channel, float32 [N]: argmin over `grid` of the column's
    reconstruction squared error sum_k (w - deq(q(w)))^2 (ties go to the earlier grid value)."""
    bits = check_bits(bits)
    grid = tuple(float(r) for r in grid)
    if not grid or not all(0.0 < r <= 1.0 for r in grid):
        raise ValueError(f"grid: expected a non-empty sequence of ratios in (0, 1], got {grid!r}")
    w = jnp.asarray(w, jnp.float32)
    errors = []
    for ratio in grid:
        q, scale, zero = quantize_weight(w, bits, symmetric=symmetric, group_size=group_size,
                                         clip_ratio=ratio)
        errors.append(jnp.sum((w - dequantize_weight(q, scale, zero)) ** 2, axis=0))
    best = jnp.argmin(jnp.stack(errors), axis=0)
    return jnp.asarray(grid, jnp.float32)[best]


def quantize_per_token(x, bits: int, *, symmetric: bool):
    """Dynamic per-token quantization of x [..., K] from each token's min/max over K.

    Returns (q int8 [..., K], scale float32 [..., 1], zero int32 [..., 1] or None).
    """
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 0:
        raise ValueError("x: expected an array of shape [..., K], got a scalar")
    scale, zero = scale_zero_from_range(x.min(axis=-1, keepdims=True),
                                        x.max(axis=-1, keepdims=True), bits, symmetric)
    return quantize(x, scale, zero, bits), scale, zero


def quantize_per_tensor(x, scale, zero, bits: int):
    """Static per-tensor quantization: int8 codes of x for a scalar scale and a scalar zero/None."""
    scale = jnp.asarray(scale, jnp.float32)
    if scale.size != 1:
        raise ValueError(f"scale: expected a scalar for per-tensor quantization, got shape "
                         f"{scale.shape}")
    if zero is not None:
        zero = jnp.asarray(zero)
        if zero.size != 1:
            raise ValueError(f"zero: expected a scalar or None, got shape {zero.shape}")
        zero = zero.reshape(()).astype(jnp.int32)
    return quantize(x, scale.reshape(()), zero, bits)


def pack_int4(q):
    """Pack 4-bit codes int8 [..., K, N] (values in [-8, 7]) into uint8 [..., ceil(K/2), N].

    Two codes per byte along K: even row in the low nibble, odd row in the high nibble. An odd
    K is padded with one zero row. Codes outside [-8, 7] keep only their low 4 bits.
    """
    q = jnp.asarray(q)
    if q.ndim < 2 or not jnp.issubdtype(q.dtype, jnp.integer):
        raise ValueError(f"q: expected an integer array [..., K, N], got {q.dtype} {q.shape}")
    if q.shape[-2] % 2:
        pad = [(0, 0)] * q.ndim
        pad[-2] = (0, 1)
        q = jnp.pad(q, pad)
    nibbles = (q.astype(jnp.int32) & 0xF).astype(jnp.uint8)
    return nibbles[..., 0::2, :] | (nibbles[..., 1::2, :] << 4)


def unpack_int4(packed, k: int):
    """Inverse of pack_int4: uint8 [..., ceil(k/2), N] -> sign-extended int8 codes [..., k, N]."""
    packed = jnp.asarray(packed)
    if packed.ndim < 2 or packed.dtype != jnp.uint8:
        raise ValueError(f"packed: expected uint8 [..., ceil(k/2), N], got {packed.dtype} "
                         f"{packed.shape}")
    rows = packed.shape[-2]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) \
            or not 2 * rows - 1 <= k <= 2 * rows:
        raise ValueError(f"k: expected {2 * rows - 1} or {2 * rows} rows for {rows} packed rows, "
                         f"got {k!r}")
    nibbles = jnp.stack([packed & 0xF, packed >> 4], axis=-2).astype(jnp.int32)  # [..., R, 2, N]
    codes = ((nibbles ^ 8) - 8).astype(jnp.int8)  # sign-extend 4 -> 8 bits
    codes = codes.reshape(packed.shape[:-2] + (2 * rows, packed.shape[-1]))
    return codes[..., :k, :]
