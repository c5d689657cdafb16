"""Kernel bodies and ``pallas_call`` set-up behind ``int8_matmul`` (operands already validated).

Two variants share ``_tile_product`` (int8 dot, or int4 nibble unpack + two half-depth dots) and
``_epilogue`` (dequantisation applied once per output tile); ``int8_matmul`` documents both.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

VARIANTS = ("grid_k", "loop_k")


# ----------------------------------------------------------------------------- shared kernel body


def _sign_extended_nibbles(packed_tile):
    """int8 tile of packed bytes -> (low, high) int8 codes in [-8, 7] (arithmetic shifts)."""
    v = packed_tile.astype(jnp.int32)
    low = jnp.right_shift(jnp.left_shift(v, 28), 28)
    high = jnp.right_shift(jnp.left_shift(v, 24), 28)
    return low.astype(jnp.int8), high.astype(jnp.int8)


def _int_dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


def _tile_product(x_parts, w_tile, packed: bool):
    """int32 ``[bm, bn]`` partial sum of one K tile.

    ``x_parts``: ``(x,)`` int8 ``[bm, bk]``, or ``(x_even, x_odd)`` int8 ``[bm, bk/2]`` each
    with ``w_tile`` the int8-viewed packed bytes ``[bk/2, bn]``.
    """
    if not packed:
        return _int_dot(x_parts[0], w_tile)
    low, high = _sign_extended_nibbles(w_tile)
    return _int_dot(x_parts[0], low) + _int_dot(x_parts[1], high)


def _epilogue(acc, x_scale, x_zero, w_scale, w_colsum, bias, out_dtype):
    """Dequantise once: ``(acc - z_x colsum) * s_x * s_w + b``; scales broadcast [bm,1]x[1,bn]."""
    if x_zero is not None:
        acc = acc - x_zero * w_colsum
    y = acc.astype(jnp.float32) * x_scale * w_scale
    if bias is not None:
        y = y + bias
    return y.astype(out_dtype)


def _grid_k_kernel(seg_ref, refs, out_ref, acc_ref, *, packed, acc_only):
    del seg_ref  # only the index maps read it
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x_parts = (refs["xe"][...], refs["xo"][...]) if packed else (refs["x"][...],)
    acc_ref[...] += _tile_product(x_parts, refs["w"][...], packed)

    @pl.when(k == pl.num_programs(2) - 1)
    def _finish():
        if acc_only:
            out_ref[...] = acc_ref[...]
        else:
            out_ref[...] = _epilogue(acc_ref[...], refs["x_scale"][...], _read(refs, "x_zero"),
                                     refs["w_scale"][...], _read(refs, "w_colsum"),
                                     _read(refs, "bias"), out_ref.dtype)


def _read(refs, name):
    return refs[name][...] if name in refs else None


def _loop_k_kernel(refs, out_ref, *, packed, acc_only, bm, bn, bk_rows, nk, w_per_segment):
    i, j = pl.program_id(0), pl.program_id(1)
    seg = refs["segment"][0]
    w_seg = seg if w_per_segment else 0
    rows, cols = pl.ds(i * bm, bm), pl.ds(j * bn, bn)

    def step(t, acc):
        kk = pl.ds(t * bk_rows, bk_rows)  # packed: bk_rows = bk / 2 (x halves and packed rows)
        x_parts = (refs["xe"][rows, kk], refs["xo"][rows, kk]) if packed else (refs["x"][rows, kk],)
        return acc + _tile_product(x_parts, refs["w"][w_seg, kk, cols], packed)

    acc = jax.lax.fori_loop(0, nk, step, jnp.zeros((bm, bn), jnp.int32))
    if acc_only:
        out_ref[...] = acc
        return
    out_ref[...] = _epilogue(
        acc, refs["x_scale"][rows, :],
        refs["x_zero"][rows, :] if "x_zero" in refs else None,
        refs["w_scale"][seg, :, cols],
        refs["w_colsum"][seg, :, cols] if "w_colsum" in refs else None,
        refs["bias"][:, cols] if "bias" in refs else None, out_ref.dtype)


# ----------------------------------------------------------------------------- pallas_call


def _pad_to(a, shape):
    return jnp.pad(a, [(0, t - s) for s, t in zip(a.shape, shape)])


def _round_up(v, m):
    return -(-v // m) * m


@functools.partial(jax.jit, static_argnames=("k", "packed", "blocks", "out_dtype", "interpret",
                                             "variant", "acc_only"))
def integer_matmul(x_q, w_q, x_scale, x_zero, w_scale, w_colsum, bias, segment, *, k, packed,
                   blocks, out_dtype, interpret, variant, acc_only):
    """Validated operands: x_q [M, K] int8, w_q [Sw, K or R, N] (uint8 if packed),
    x_scale [M, 1] f32, x_zero [M, 1] i32 | None, w_scale [S, N] f32, w_colsum [S, N] i32 | None,
    bias [N] f32 | None, segment int32 scalar."""
    bm, bn, bk = blocks
    m, n = x_q.shape[0], w_q.shape[-1]
    s, sw = w_scale.shape[0], w_q.shape[0]
    mp, np_ = _round_up(m, bm), _round_up(n, bn)
    segment = jnp.clip(jnp.asarray(segment, jnp.int32), 0, s - 1).reshape(1)
    ops = {}
    if packed:  # even / odd K columns meet the low / high nibbles of one packed row
        rows = w_q.shape[1]
        rp = _round_up(rows, bk // 2)
        x = _pad_to(x_q, (m, 2 * rows))
        ops["xe"] = _pad_to(x[:, 0::2], (mp, rp))
        ops["xo"] = _pad_to(x[:, 1::2], (mp, rp))
        ops["w"] = _pad_to(jax.lax.bitcast_convert_type(w_q, jnp.int8), (sw, rp, np_))
        bk_rows, nk = bk // 2, rp // (bk // 2)
    else:
        kp = _round_up(k, bk)
        ops["x"] = _pad_to(x_q, (mp, kp))
        ops["w"] = _pad_to(w_q, (sw, kp, np_))
        bk_rows, nk = bk, kp // bk
    if not acc_only:
        ops["x_scale"] = _pad_to(x_scale, (mp, 1))
        ops["w_scale"] = _pad_to(w_scale, (s, np_))[:, None, :]
        if x_zero is not None:
            ops["x_zero"] = _pad_to(x_zero, (mp, 1))
            ops["w_colsum"] = _pad_to(w_colsum, (s, np_))[:, None, :]
        if bias is not None:
            ops["bias"] = _pad_to(bias, (np_,))[None, :]
    out_shape = jax.ShapeDtypeStruct((mp, np_), jnp.int32 if acc_only else out_dtype)
    w_per_segment = sw > 1
    if variant == "grid_k":
        out = _grid_k_call(ops, segment, out_shape, bm, bn, bk_rows, nk, packed, acc_only,
                           w_per_segment, interpret)
    else:
        kernel = functools.partial(_loop_k_kernel, packed=packed, acc_only=acc_only, bm=bm, bn=bn,
                                   bk_rows=bk_rows, nk=nk, w_per_segment=w_per_segment)
        ops["segment"] = segment
        out = loop_k_call(kernel, ops, out_shape, bm, bn, interpret, "w8a8_matmul_loop_k")
    return out[:m, :n]


def loop_k_call(kernel, ops: dict, out_shape, bm: int, bn: int, interpret: bool, name: str):
    """The ``loop_k`` (Triton) ``pallas_call``: grid ``(M/bm, N/bn)``, every operand whole
    (the kernel slices its rows / columns / K steps), one ``[bm, bn]`` output block."""
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton
        params = pl_triton.CompilerParams(num_warps=4 if bm * bn <= 64 * 64 else 8,
                                          num_stages=3)
    return pl.pallas_call(
        kernel, out_shape=out_shape,
        grid=(out_shape.shape[0] // bm, out_shape.shape[1] // bn),
        in_specs=[{name: pl.BlockSpec() for name in ops}],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=params, interpret=interpret, name=name)(ops)


def _grid_k_call(ops, segment, out_shape, bm, bn, bk_rows, nk, packed, acc_only, w_per_segment,
                 interpret):
    from jax.experimental.pallas import tpu as pltpu
    x_block = pl.BlockSpec((bm, bk_rows), lambda i, j, k, seg: (i, k))
    row_block = pl.BlockSpec((bm, 1), lambda i, j, k, seg: (i, 0))
    seg_row_block = pl.BlockSpec((None, 1, bn), lambda i, j, k, seg: (seg[0], 0, j))
    specs = {
        "x": x_block, "xe": x_block, "xo": x_block,
        "w": pl.BlockSpec((None, bk_rows, bn), (lambda i, j, k, seg: (seg[0], k, j))
                          if w_per_segment else (lambda i, j, k, seg: (0, k, j))),
        "x_scale": row_block, "x_zero": row_block,
        "w_scale": seg_row_block, "w_colsum": seg_row_block,
        "bias": pl.BlockSpec((1, bn), lambda i, j, k, seg: (0, j)),
    }
    grid = (out_shape.shape[0] // bm, out_shape.shape[1] // bn, nk)
    params = None if interpret else pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary"))
    return pl.pallas_call(
        functools.partial(_grid_k_kernel, packed=packed, acc_only=acc_only),
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=[{name: specs[name] for name in ops}],
            out_specs=pl.BlockSpec((bm, bn), lambda i, j, k, seg: (i, j)),
            scratch_shapes=[pltpu.VMEM((bm, bn), jnp.int32)]),
        compiler_params=params, interpret=interpret, name="w8a8_matmul_grid_k")(segment, ops)
