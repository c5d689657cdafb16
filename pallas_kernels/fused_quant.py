"""Dynamic per-token activation quantization in a kernel (the front end of ``w8a8_matmul``).

From a per-token range ``[x_min, x_max]`` (computed beforehand, e.g. an XLA min/max reduction
times a clipping ratio), each ``(bm, bk)`` tile of float activations is turned into int8 codes,
and each row's scale / zero point is produced alongside, with exactly the arithmetic of
``trdq_jax.quant.quantizers.scale_zero_from_range`` + ``quantize``:

  symmetric:  scale = max(|lo|, |hi|, eps) / qmax,              code = clip(round(x / scale))
  asymmetric: lo, hi widened to contain 0, scale = max(hi - lo, eps) / (2^b - 1),
              zero = clip(round(qmin - lo / scale)),            code = clip(round(x / scale) + zero)

Grid ``(M/bm, K/bk)``; the scale / zero outputs are per row block and rewritten (same values) at
every K step, so the K axis is sequential ("arbitrary") on TPU. Backend notes as for
``int8_matmul``: interpret mode is tested here; TPU (Mosaic) and GPU (Triton) lowering is
checked from CPU, nothing was run on an accelerator. On TPU the float division is the one
Mosaic emits; bit-exactness with XLA's division there is expected but unverified.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import platform

__all__ = ["per_token_quantize"]

_RANGE_EPS = 1e-8  # same floor as trdq_jax.quant.quantizers: an all-zero row gets a tiny scale


def _round_half_even(v):
    """``jnp.round`` (ties to even) from floor: Triton has no round primitive.

    ``d = v - floor(v)`` is exact for float32 (Sterbenz) except for v in (-1, 0), where the
    only rounding that reaches 0.5 comes from v = -(0.5 - 2^-25), whose correct result (0) the
    tie rule also gives.
    """
    f = jnp.floor(v)
    d = v - f
    f_odd = (f - 2.0 * jnp.floor(0.5 * f)) != 0.0
    return jnp.where((d > 0.5) | ((d == 0.5) & f_odd), f + 1.0, f)


def _scale_zero(lo, hi, qmin: int, qmax: int, symmetric: bool):
    if symmetric:
        return jnp.maximum(jnp.maximum(jnp.abs(lo), jnp.abs(hi)), _RANGE_EPS) / qmax, None
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    scale = jnp.maximum(hi - lo, _RANGE_EPS) / (qmax - qmin)
    return scale, jnp.clip(_round_half_even(qmin - lo / scale), qmin, qmax)


def _quantize_kernel(min_ref, max_ref, x_ref, codes_ref, scale_ref, *zero_ref, qmin, qmax,
                     symmetric):
    scale, zero = _scale_zero(min_ref[...], max_ref[...], qmin, qmax, symmetric)
    q = _round_half_even(x_ref[...].astype(jnp.float32) / scale)
    if zero is not None:
        q = q + zero
        zero_ref[0][...] = zero.astype(jnp.int32)
    codes_ref[...] = jnp.clip(q, qmin, qmax).astype(jnp.int8)
    scale_ref[...] = scale


def _compiler_params(target: str):
    if target == "gpu":
        from jax.experimental.pallas import triton as pl_triton
        return pl_triton.CompilerParams(num_warps=4, num_stages=1)
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


@functools.partial(jax.jit, static_argnames=("bits", "symmetric", "blocks", "interpret", "target"))
def _quantize(x, x_min, x_max, *, bits, symmetric, blocks, interpret, target):
    bm, bk = blocks
    m, k = x.shape
    mp, kp = -(-m // bm) * bm, -(-k // bk) * bk
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax if symmetric else -qmax - 1
    pad = lambda a, shape: jnp.pad(a, [(0, t - s) for s, t in zip(a.shape, shape)])
    row = pl.BlockSpec((bm, 1), lambda i, j: (i, 0))
    out_shape = [jax.ShapeDtypeStruct((mp, kp), jnp.int8),
                 jax.ShapeDtypeStruct((mp, 1), jnp.float32)]
    out_specs = [pl.BlockSpec((bm, bk), lambda i, j: (i, j)), row]
    if not symmetric:
        out_shape.append(jax.ShapeDtypeStruct((mp, 1), jnp.int32))
        out_specs.append(row)
    params = None if interpret else _compiler_params(target)
    outs = pl.pallas_call(
        functools.partial(_quantize_kernel, qmin=qmin, qmax=qmax, symmetric=symmetric),
        out_shape=out_shape, grid=(mp // bm, kp // bk),
        in_specs=[row, row, pl.BlockSpec((bm, bk), lambda i, j: (i, j))], out_specs=out_specs,
        compiler_params=params, interpret=interpret, name="per_token_quantize",
    )(pad(x_min, (mp, 1)), pad(x_max, (mp, 1)), pad(x, (mp, kp)))
    codes, scale = outs[0][:m, :k], outs[1][:m]
    return codes, scale, None if symmetric else outs[2][:m]


def _default_blocks(m: int, k: int) -> tuple[int, int]:
    bm, _, bk = platform.default_block_sizes(m, 1, k)
    if platform.backend_name() == "gpu":  # elementwise: wider K tiles, still powers of two
        bk = min(max(bk, 256), int(2 ** np.ceil(np.log2(max(k, 16)))))
    return bm, bk


def per_token_quantize(x, x_min, x_max, *, bits: int = 8, symmetric: bool = False,
                       block_sizes=None, interpret=None, target: str | None = None):
    """Quantize float ``x [M, K]`` per token from its range ``x_min, x_max [M, 1]`` (or ``[M]``).

    Returns ``(codes int8 [M, K], scale float32 [M, 1], zero int32 [M, 1] or None)``, ready for
    ``w8a8_matmul(codes, w_q, scale, zero, ...)``. ``bits`` in 2..8; ``block_sizes`` ``(bm, bk)``
    or None (table defaults); ``interpret`` None = interpret exactly on CPU; ``target`` "tpu"
    (Mosaic) or "gpu" (Triton) picks the compiler when not interpreting (None: the backend).
    """
    x = jnp.asarray(x)
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x: expected float activations [M, K], got {x.dtype} {x.shape}")
    m, k = x.shape
    ranges = []
    for name, value in (("x_min", x_min), ("x_max", x_max)):
        value = jnp.asarray(value)
        if value.shape not in ((m,), (m, 1)):
            raise ValueError(f"{name}: expected [M] or [M, 1] with M={m}, got {value.shape}")
        ranges.append(value.reshape(m, 1).astype(jnp.float32))
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"bits: expected an integer bit width in 2..8, got {bits!r}")
    if block_sizes is None:
        blocks = _default_blocks(m, k)
    else:
        ok = isinstance(block_sizes, (tuple, list)) and len(block_sizes) == 2 and all(
            isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b > 0
            for b in block_sizes)
        if not ok:
            raise ValueError(f"block_sizes: expected (bm, bk) positive ints, got {block_sizes!r}")
        blocks = tuple(int(b) for b in block_sizes)
    target = ("gpu" if platform.backend_name() == "gpu" else "tpu") if target is None else target
    if target not in ("tpu", "gpu"):
        raise ValueError(f"target: expected None, 'tpu' or 'gpu', got {target!r}")
    return _quantize(x, *ranges, bits=int(bits), symmetric=bool(symmetric), blocks=blocks,
                     interpret=platform.resolve_interpret(interpret), target=target)
