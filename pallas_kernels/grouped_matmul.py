"""Group-wise integer matmul: a scale (and zero point) per group of ``g`` input channels, the
format of GPTQ-g128 weights and SVDQuant's INT4 (weights and activations in groups of 64).

    acc[g][m, n] = sum_{k in group g} x_q[m, k] * w_q[(s,) k, n]                     exact int32
    y[m, n]      = sum_g (acc[g] - x_zero[m, g] * w_colsum[s, g, n])
                         * x_scale[m, g] * w_scale[s, g, n]  + bias[n]

K blocks hold whole groups (``group_block_k``: as few as fill whole 128-lane tiles, as Mosaic
requires), and each group's integer product, which has a single scale per row and per column,
is corrected, scaled and added to a float32 accumulator: the only difference from
``w8a8_matmul``, whose one scale per row / column lets the whole K sum stay integer. Either
side may be per channel instead: per-token activation scales ``[M, 1]`` and per-channel weight
scales ``[S, N]`` are broadcast over the groups. The same two variants as ``w8a8_matmul``:
``"grid_k"`` (grid ``(M/bm, N/bn, K/bk)``, a float32 scratch accumulator, the segment read by the
index maps through scalar prefetch; TPU / Mosaic and interpret mode) and ``"loop_k"`` (grid
``(M/bm, N/bn)``, a loop over the groups in the kernel; GPU / Triton). Per-group operands are
laid out group-major (``[G, M, 1]``, ``[S, G, 1, N]``) so that every block's last two dimensions
are whole axes or lane-aligned, as Mosaic requires. As for ``w8a8_matmul``, only interpret mode
has run; TPU / GPU lowering is checked from CPU with ``jax.export``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import platform
from pallas_kernels._int8_kernels import _pad_to, _round_up, _tile_product, loop_k_call
from pallas_kernels.int8_matmul import (_as_array, _check_activations, _check_bias_and_out_dtype,
                                        _check_segment, _check_variant, _check_weights,
                                        _check_zero_point)

__all__ = ["grouped_matmul", "supports"]


def _scaled(part, x_scale, x_zero, w_scale, w_colsum):
    """float32 ``[bm, bn]``: one group's integer product corrected and scaled."""
    if x_zero is not None:
        part = part - x_zero * w_colsum
    return part.astype(jnp.float32) * x_scale * w_scale


def _grid_k_kernel(seg_ref, refs, out_ref, acc_ref, *, packed, group_rows, groups_per_block):
    del seg_ref  # only the index maps read it
    kb = pl.program_id(2)

    @pl.when(kb == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x_names = ("xe", "xo") if packed else ("x",)
    acc = acc_ref[...]
    for t in range(groups_per_block):  # static: lane offsets known at compile time
        cols = slice(t * group_rows, (t + 1) * group_rows)
        part = _tile_product(tuple(refs[name][:, cols] for name in x_names),
                             refs["w"][cols, :], packed)
        acc += _scaled(part, refs["x_scale"][t], refs["x_zero"][t] if "x_zero" in refs else None,
                       refs["w_scale"][t], refs["w_colsum"][t] if "w_colsum" in refs else None)
    acc_ref[...] = acc

    @pl.when(kb == pl.num_programs(2) - 1)
    def _finish():
        y = acc_ref[...]
        if "bias" in refs:
            y = y + refs["bias"][...]
        out_ref[...] = y.astype(out_ref.dtype)


def _loop_k_kernel(refs, out_ref, *, packed, bm, bn, group_rows, groups, w_per_segment):
    i, j = pl.program_id(0), pl.program_id(1)
    seg = refs["segment"][0]
    w_seg = seg if w_per_segment else 0
    rows, cols = pl.ds(i * bm, bm), pl.ds(j * bn, bn)

    def step(t, acc):
        kk = pl.ds(t * group_rows, group_rows)
        x_parts = (refs["xe"][rows, kk], refs["xo"][rows, kk]) if packed else (refs["x"][rows, kk],)
        part = _tile_product(x_parts, refs["w"][w_seg, kk, cols], packed)
        return acc + _scaled(part, refs["x_scale"][t, rows, :],
                             refs["x_zero"][t, rows, :] if "x_zero" in refs else None,
                             refs["w_scale"][seg, t, :, cols],
                             refs["w_colsum"][seg, t, :, cols] if "w_colsum" in refs else None)

    y = jax.lax.fori_loop(0, groups, step, jnp.zeros((bm, bn), jnp.float32))
    if "bias" in refs:
        y = y + refs["bias"][:, cols]
    out_ref[...] = y.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("group_size", "packed", "blocks", "out_dtype",
                                             "interpret", "variant"))
def _grouped_call(x_q, w_q, x_scale, x_zero, w_scale, w_colsum, bias, segment, *, group_size,
                  packed, blocks, out_dtype, interpret, variant):
    """Validated operands: x_q [M, K] int8, w_q [Sw, K or K/2, N], x_scale [G, M, 1] f32,
    x_zero [G, M, 1] i32 | None, w_scale [S, G, N] f32, w_colsum [S, G, N] i32 | None,
    bias [N] f32 | None, segment int32 scalar."""
    bm, bn, bk = blocks
    m, n = x_q.shape[0], w_q.shape[-1]
    s, groups = w_scale.shape[0], w_scale.shape[1]
    mp, np_ = _round_up(m, bm), _round_up(n, bn)
    segment = jnp.clip(jnp.asarray(segment, jnp.int32), 0, s - 1).reshape(1)
    ops = {}
    if packed:  # even / odd K columns meet the low / high nibbles; a group is g/2 packed rows
        ops["xe"], ops["xo"] = _pad_to(x_q[:, 0::2], (mp, x_q.shape[1] // 2)), _pad_to(
            x_q[:, 1::2], (mp, x_q.shape[1] // 2))
        ops["w"] = _pad_to(jax.lax.bitcast_convert_type(w_q, jnp.int8), w_q.shape[:2] + (np_,))
        group_rows = group_size // 2
    else:
        ops["x"] = _pad_to(x_q, (mp, x_q.shape[1]))
        ops["w"] = _pad_to(w_q, w_q.shape[:2] + (np_,))
        group_rows = group_size
    ops["x_scale"] = _pad_to(x_scale, (groups, mp, 1))
    ops["w_scale"] = _pad_to(w_scale, (s, groups, np_))[:, :, None, :]
    if x_zero is not None:
        ops["x_zero"] = _pad_to(x_zero, (groups, mp, 1))
        ops["w_colsum"] = _pad_to(w_colsum, (s, groups, np_))[:, :, None, :]
    if bias is not None:
        ops["bias"] = _pad_to(bias, (np_,))[None, :]
    out_shape = jax.ShapeDtypeStruct((mp, np_), out_dtype)
    w_per_segment = w_q.shape[0] > 1
    if variant == "grid_k":
        out = _grid_k_call(ops, segment, out_shape, bm, bn, group_rows, bk // group_size,
                           groups, packed, w_per_segment, interpret)
    else:
        kernel = functools.partial(_loop_k_kernel, packed=packed, bm=bm, bn=bn,
                                   group_rows=group_rows, groups=groups,
                                   w_per_segment=w_per_segment)
        ops["segment"] = segment
        out = loop_k_call(kernel, ops, out_shape, bm, bn, interpret, "grouped_matmul_loop_k")
    return out[:m, :n]


def _grid_k_call(ops, segment, out_shape, bm, bn, group_rows, groups_per_block, groups, packed,
                 w_per_segment, interpret):
    from jax.experimental.pallas import tpu as pltpu
    rows = group_rows * groups_per_block  # x columns / weight rows of one K block
    x_block = pl.BlockSpec((bm, rows), lambda i, j, kb, seg: (i, kb))
    group_row_block = pl.BlockSpec((groups_per_block, bm, 1), lambda i, j, kb, seg: (kb, i, 0))
    group_col_block = pl.BlockSpec((None, groups_per_block, 1, bn),
                                   lambda i, j, kb, seg: (seg[0], kb, 0, j))
    specs = {
        "x": x_block, "xe": x_block, "xo": x_block,
        "w": pl.BlockSpec((None, rows, bn), (lambda i, j, kb, seg: (seg[0], kb, j))
                          if w_per_segment else (lambda i, j, kb, seg: (0, kb, j))),
        "x_scale": group_row_block, "x_zero": group_row_block,
        "w_scale": group_col_block, "w_colsum": group_col_block,
        "bias": pl.BlockSpec((1, bn), lambda i, j, kb, seg: (0, j)),
    }
    params = None if interpret else pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary"))
    grid = (out_shape.shape[0] // bm, out_shape.shape[1] // bn, groups // groups_per_block)
    return pl.pallas_call(
        functools.partial(_grid_k_kernel, packed=packed, group_rows=group_rows,
                          groups_per_block=groups_per_block),
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=[{name: specs[name] for name in ops}],
            out_specs=pl.BlockSpec((bm, bn), lambda i, j, kb, seg: (i, j)),
            scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)]),
        compiler_params=params, interpret=interpret, name="grouped_matmul_grid_k")(segment, ops)


# ----------------------------------------------------------------------------- validation


def _check_group_size(group_size, k: int, packed: bool) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) \
            or group_size < 1 or k % group_size:
        raise ValueError(f"group_size: expected a positive int dividing K={k}, got {group_size!r}")
    if packed and group_size % 2:
        raise ValueError(f"group_size: must be even for packed int4 weights (two K rows per "
                         f"byte), got {group_size}")
    return int(group_size)


def supports(group_size: int, packed: bool, backend: str | None = None) -> bool:
    """Whether the kernel takes groups of ``group_size`` rows on ``backend`` (default: this
    machine's): packed int4 needs an even group (two rows per byte); Triton (GPU) needs each
    group's rows (half of them when packed) a power of two of at least 16. Elsewhere a layer
    runs XLA's per-group dots."""
    backend = platform.backend_name() if backend is None else backend
    rows = group_size // 2 if packed else group_size
    if packed and group_size % 2:
        return False
    return backend != "gpu" or (rows >= 16 and rows & (rows - 1) == 0)


def group_block_k(k: int, group_size: int, packed: bool, lane: int = 128) -> int:
    """The K block of ``grid_k``: the fewest whole groups whose activation columns (half of
    them for packed int4: the even / odd halves) fill whole lane tiles and divide K, else all
    of K (a block equal to the axis is always allowed)."""
    groups = k // group_size
    cols = group_size // 2 if packed else group_size
    for d in range(1, groups + 1):
        if groups % d == 0 and (cols * d) % lane == 0:
            return group_size * d
    return k


def _check_blocks(block_sizes, m, n, k, group_size, packed) -> tuple[int, int, int]:
    """``(bm, bn, bk)``: the platform table's bm / bn and ``group_block_k``, or the user's, bk
    a multiple of the group size dividing K."""
    if block_sizes is None:
        bm, bn, _ = platform.default_block_sizes(m, n, group_size, packed=packed)
        return bm, bn, group_block_k(k, group_size, packed)
    bm, bn, bk = platform.check_block_sizes(block_sizes, even_k=False)
    if bk % group_size or k % bk:
        raise ValueError(f"block_sizes: bk must hold whole groups ({group_size} rows) and "
                         f"divide K={k}, got {bk}")
    return bm, bn, bk


def _activation_side(value, m: int, groups: int, name: str, dtype):
    """Scalar, ``[M]``, ``[M, 1]`` (per token) or ``[M, G]`` (per token and group) ->
    ``[G, M, 1]`` of ``dtype``."""
    value = _as_array(value, name)
    if value.size == 1:
        value = jnp.broadcast_to(value.reshape(1, 1), (m, groups))
    elif value.shape in ((m,), (m, 1)):
        value = jnp.broadcast_to(value.reshape(m, 1), (m, groups))
    elif value.shape != (m, groups):
        raise ValueError(f"{name}: expected a scalar, [M], [M, 1] or [M, G] with M={m}, "
                         f"G={groups}, got {value.shape}")
    return value.T[:, :, None].astype(dtype)


def _weight_side(value, groups: int, n: int, name: str, dtype, per_channel: bool = True):
    """``[N]`` / ``[S, N]`` (per channel, ``per_channel``) or ``[S, G, N]`` (per group) ->
    ``[S, G, N]`` of ``dtype``."""
    value = _as_array(value, name)
    if per_channel and value.ndim in (1, 2) and value.shape[-1] == n:
        value = value.reshape(-1, 1, n)
        return jnp.broadcast_to(value, (value.shape[0], groups, n)).astype(dtype)
    if value.ndim != 3 or value.shape[1:] != (groups, n):
        shapes = "[N], [S, N] or [S, G, N]" if per_channel else "[S, G, N]"
        raise ValueError(f"{name}: expected {shapes} with G={groups}, N={n}, got {value.shape}")
    return value.astype(dtype)


def grouped_matmul(x_q, w_q, x_scale, x_zero, w_scale, w_colsum, bias=None, segment=0, *,
                   group_size: int, w_bits: int = 8, out_dtype=jnp.float32, block_sizes=None,
                   interpret=None, variant: str | None = None) -> jax.Array:
    """Group-wise integer matmul with its dequantisation fused in; ``[M, N]`` ``out_dtype``.

    Args:
      x_q: int8 ``[M, K]`` activation codes; ``group_size`` divides K (G = K / group_size).
      w_q: int8 ``[K, N]`` / uint8 packed int4 ``[K/2, N]`` (``w_bits=4``: group_size even), a
        leading axis ``[S, ...]`` for one weight copy per segment.
      x_scale: float32 ``[M, G]`` per token and group, or ``[M, 1]`` / ``[M]`` per token, or a
        scalar.
      x_zero: int32 of x_scale's shapes, or None (symmetric activations).
      w_scale: float32 ``[S, G, N]`` per group, or ``[S, N]`` / ``[N]`` per output channel.
      w_colsum: int32 ``[S, G, N]``: each group's column sums of the codes (required with
        x_zero; per group even for per-channel scales, since a group's zero point meets only
        its own rows).
      bias: float32 ``[N]`` or None. segment: int32 scalar (may be traced), clipped to the
        rows of w_scale.
      block_sizes: ``(bm, bn, bk)``, bk whole groups dividing K (``grid_k``: each K block's
        groups are taken one by one inside the kernel; ``loop_k`` steps group by group and
        ignores bk), or None: the platform table's bm / bn and ``group_block_k``.
      interpret / variant: as ``w8a8_matmul``.
    """
    x_q = _check_activations(x_q)
    m, k = x_q.shape
    w_q, packed = _check_weights(w_q, k, w_bits)
    group_size = _check_group_size(group_size, k, packed)
    n, groups = w_q.shape[-1], k // group_size
    w_scale = _weight_side(w_scale, groups, n, "w_scale", jnp.float32)
    if w_q.shape[0] not in (1, w_scale.shape[0]):
        raise ValueError(f"w_q: {w_q.shape[0]} weight copies but w_scale has "
                         f"{w_scale.shape[0]} segment rows (expected 1 copy or one per row)")
    x_scale = _activation_side(x_scale, m, groups, "x_scale", jnp.float32)
    x_zero, w_colsum = _check_zero_point(
        x_zero, w_colsum, w_scale,
        lambda z: _activation_side(z, m, groups, "x_zero", jnp.int32),
        lambda c: _weight_side(c, groups, n, "w_colsum", jnp.int32, per_channel=False))
    bias = _check_bias_and_out_dtype(bias, n, out_dtype)
    blocks = _check_blocks(block_sizes, m, n, k, group_size, packed)
    interpret = platform.resolve_interpret(interpret)
    return _grouped_call(x_q, w_q, x_scale, x_zero, w_scale, w_colsum, bias,
                         _check_segment(segment), group_size=group_size, packed=packed,
                         blocks=blocks, out_dtype=np.dtype(out_dtype), interpret=interpret,
                         variant=_check_variant(variant, interpret))
