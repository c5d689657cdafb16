"""The quantized linear layer: a pytree of integers and scales, and its execution backends.

For a float layer ``y = x W + b`` (Flax kernel ``W [K, N]``) TR-DQ computes, per time segment k,

    x̃ = T_k(x) = ((x / s_k) R1_k)[perm_k] R2_k      (or a Hadamard, or nothing)
    W̃_k = M_k⁻¹ W, folded offline (M_k is T_k as a matrix), so that x̃ W̃_k = x W
    y ≈ dequant(Q_a(x̃)) dequant(Q_w(W̃ - L1 L2)) + x̃ L1 L2 + b

where ``L1 L2`` is an optional float low-rank branch (``Recipe.low_rank``; absent: 0).

Backends, which agree to float tolerance:
  ``fake``: simulated quantization in float32 (the reference);
  ``xla``: int8 x int8 -> int32 ``dot_general``, scales (and the asymmetric zero-point correction
    ``z_x * colsum(W_q)``) applied after the dot; int8 is never converted to float before the dot;
    group-wise layers take one int32 dot per group, each scaled by its group's scales;
  ``pallas``: the kernels of ``pallas_kernels`` (integer matmul with the epilogue fused, dynamic
    activation quantization in a kernel; group-wise layers ``grouped_matmul``, K blocks aligned
    to the groups; interpreted on CPU); fp8 layers run the ``xla`` path;
  ``auto``: ``pallas`` on TPU / GPU where ``pallas_kernels.auto_backend`` says the layer fits,
    else ``xla``.
Everything that varies with the time segment has a leading axis ``[S, ...]`` selected with the
traced segment index; ``S == 1`` is selected statically and costs nothing.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
import jax.numpy as jnp
from flax import struct

from trdq_jax.quant import duquant, hadamard, quantizers

BACKENDS = ("fake", "xla", "pallas", "auto")


@struct.dataclass
class QLinear:
    """One quantized ``Dense`` or ``Conv``. Shapes: K inputs, N outputs, Sw weight copies, S
    segments. A convolution with ``kernel_size = (kh, kw)`` is the linear map of its im2col
    patches: its codes have ``K = kh * kw * C`` rows (tap-major, as the HWIO kernel reshaped),
    and every activation-side array (smoothing, rotation) acts on the C input channels of each
    tap (``in_features = C``); see ``trdq_jax.quant.qconv``.

    w_q: int8 ``[Sw, K, N]``, or uint8 ``[Sw, ceil(K/2), N]`` holding two int4 codes per byte,
      or float8_e4m3fn ``[Sw, K, N]`` (``fp8``) (float32 folded weights when ``w_bits == 16``:
      quantization disabled).
    w_scale: float32 ``[Sw, N]`` symmetric per-output-channel weight scales, or ``[Sw, G, N]``
      one per group of ``w_group_size`` input rows (``G = K / w_group_size``).
    w_colsum: int32 ``[Sw, N]`` (``[Sw, G, N]`` with groups) column sums of the codes
      (asymmetric-activation correction; zeros for fp8 codes, whose activations are symmetric).
    bias: float32 ``[N]`` or None.
    smooth: float32 ``[S, K]`` smoothing divisors, or None.
    signs: float32 ``[K or block]`` Hadamard signs (rotation "hadamard"/"block_hadamard"), or None.
    r1, r2: float32 ``[S, B, B]``; perm: int32 ``[S, K]`` (rotation "duquant"), or None.
    a_scale, a_zero: float32 / int32 ``[S]`` static activation quantization, or None.
    a_clip: float32 ``[S]`` dynamic per-token clipping ratios, or None.
    lr_down, lr_up: bfloat16 ``[Sl, K, r]`` and ``[Sl, r, N]``: the float low-rank branch
      ``x̃ lr_down lr_up`` added to the quantized product (Sl = 1, or S with a branch per
      segment), or None. Computed in float32 from the stored bf16 values.
    """

    w_q: jax.Array
    w_scale: jax.Array
    w_colsum: jax.Array
    bias: Any = None
    smooth: Any = None
    signs: Any = None
    r1: Any = None
    perm: Any = None
    r2: Any = None
    a_scale: Any = None
    a_zero: Any = None
    a_clip: Any = None
    lr_down: Any = None
    lr_up: Any = None
    in_features: int = struct.field(pytree_node=False, default=0)
    w_bits: int = struct.field(pytree_node=False, default=8)
    a_bits: int = struct.field(pytree_node=False, default=8)
    a_mode: str = struct.field(pytree_node=False, default="dynamic")
    a_symmetric: bool = struct.field(pytree_node=False, default=False)
    rotation: str = struct.field(pytree_node=False, default="none")
    rotation_block: int = struct.field(pytree_node=False, default=0)
    kernel_size: tuple = struct.field(pytree_node=False, default=())
    fp8: bool = struct.field(pytree_node=False, default=False)
    w_group_size: int = struct.field(pytree_node=False, default=0)
    a_group_size: int = struct.field(pytree_node=False, default=0)

    @property
    def taps(self) -> int:
        """Kernel taps of a convolution (``kh * kw``); 1 for a Dense."""
        taps = 1
        for size in self.kernel_size:
            taps *= int(size)
        return taps

    @property
    def code_rows(self) -> int:
        """Rows K of the weight codes: ``taps * in_features``."""
        return self.taps * self.in_features

    @property
    def packed(self) -> bool:
        return self.w_q.dtype == jnp.uint8

    @property
    def num_weight_copies(self) -> int:
        return int(self.w_q.shape[0])

    @property
    def rank(self) -> int:
        """Rank r of the low-rank branch (0: none)."""
        return 0 if self.lr_down is None else int(self.lr_down.shape[-1])


def _select(arr, segment):
    """``arr[segment]`` along the leading axis; static ``arr[0]`` when there is one entry."""
    if arr.shape[0] == 1:
        return arr[0]
    return jnp.take(arr, segment, axis=0, mode="clip")


def transform_activation(q: QLinear, x: jax.Array, segment) -> jax.Array:
    """``x [..., K]`` -> ``x̃ [..., K]`` float32 (smoothing, then rotation/permutation)."""
    x = x.astype(jnp.float32)
    if q.smooth is not None:
        x = x / _select(q.smooth, segment)
    if q.rotation == "hadamard":
        x = hadamard.hadamard_transform(x, q.signs)
    elif q.rotation == "block_hadamard":
        x = hadamard.block_hadamard_transform(x, q.rotation_block, q.signs)
    elif q.rotation == "duquant":
        x = duquant.apply_duquant(x, _select(q.r1, segment), _select(q.perm, segment),
                                  _select(q.r2, segment))
    return x


def token_min_max(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token ``(min, max)`` of ``x [..., K]``, each ``[..., 1]``, in one variadic reduction
    (one pass over x instead of two)."""
    lo, hi = jax.lax.reduce((x, x), (jnp.array(jnp.inf, x.dtype), jnp.array(-jnp.inf, x.dtype)),
                            lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])),
                            (x.ndim - 1,))
    return lo[..., None], hi[..., None]


def quantize_activation(q: QLinear, x: jax.Array, segment):
    """Transformed activations ``x [..., K]`` -> ``(codes int8 or float8 [..., K], scale, zero
    or None)``: scale/zero per tensor, per token ``[..., 1]``, or per token and group of
    ``a_group_size`` channels ``[..., K / a_group_size, 1]``."""
    if q.a_mode == "static":
        scale, zero = _select(q.a_scale, segment), (
            None if q.a_symmetric else _select(q.a_zero, segment))
        if q.fp8:
            return quantizers.quantize_fp8(x, scale), scale, None
        return quantizers.quantize(x, scale, zero, q.a_bits), scale, zero
    clip = 1.0 if q.a_clip is None else _select(q.a_clip, segment)
    if q.a_group_size:  # each group of channels of each token its own range
        xg = x.reshape(x.shape[:-1] + (-1, q.a_group_size))
        lo, hi = token_min_max(xg)
        scale, zero = quantizers.scale_zero_from_range(lo * clip, hi * clip, q.a_bits,
                                                       q.a_symmetric)
        return quantizers.quantize(xg, scale, zero, q.a_bits).reshape(x.shape), scale, zero
    lo, hi = token_min_max(x)
    if q.fp8:
        scale = quantizers.fp8_scale(jnp.maximum(-lo, hi) * clip)
        return quantizers.quantize_fp8(x, scale), scale, None
    scale, zero = quantizers.scale_zero_from_range(lo * clip, hi * clip, q.a_bits, q.a_symmetric)
    return quantizers.quantize(x, scale, zero, q.a_bits), scale, zero


def dequantize_activation(q: QLinear, codes, scale, zero) -> jax.Array:
    """float32 ``[..., K]``: the activation codes of ``quantize_activation`` as values."""
    if not q.a_group_size:
        return quantizers.dequantize(codes, scale, zero)
    grouped = codes.reshape(codes.shape[:-1] + (-1, q.a_group_size))
    return quantizers.dequantize(grouped, scale, zero).reshape(codes.shape)


def _tie_packed(q: QLinear, x: jax.Array) -> QLinear:
    """``q`` unchanged in value, its packed int4 (or float8) codes made data-dependent on the
    activation ``x [..., K]`` that meets them (int8 or float weights: ``q`` itself). Float8:
    XLA:CPU converts float8 dot operands to float, which it would otherwise hoist as well.

    In a sampler's ``lax.scan`` the weights are loop-invariant: XLA hoists every layer's
    int4 -> int8 unpacking out of the loop (behind an ``optimization_barrier``, which the CPU
    pipeline drops before scheduling, it runs them all at the top of the loop body) and keeps
    every layer's unpacked codes alive at once, twice the packed bytes. Selecting ``w_q``
    through ``min(x_row) > max(x_row)``, False for every row (NaN included) but not foldable by
    XLA, makes the unpacking wait for the layer's own activation: one layer's codes at a time.
    The select fuses into the unpacking; it reads one row of ``x``.
    """
    if not (q.packed or q.fp8) or x.size == 0:  # float8: XLA:CPU upcasts it before the dot
        return q
    row = x.reshape(-1, x.shape[-1])[0]
    never = jnp.min(row) > jnp.max(row)
    return q.replace(w_q=jnp.where(never, jnp.zeros_like(q.w_q), q.w_q))


def weight_codes(q: QLinear, segment) -> jax.Array:
    """int8 ``[K, N]`` codes of the segment's weight copy (unpacking int4 if needed)."""
    w = _select(q.w_q, segment)
    return quantizers.unpack_int4(w, q.code_rows) if q.packed else w  # float if w_bits == 16


def dequantized_weight(q: QLinear, segment) -> jax.Array:
    """float32 ``[K, N]``: the transformed weight W̃ as the quantizer represents it."""
    if q.w_bits == 16:
        return _select(q.w_q, segment)
    codes, scale = weight_codes(q, segment), _select(q.w_scale, segment)
    if q.w_group_size:  # [G, N] scales: each group of rows its own
        scale = jnp.repeat(scale, q.w_group_size, axis=0)
    return quantizers.dequantize(codes, scale, None)


def _grouped_int_dot(q: QLinear, codes, a_scale, a_zero, segment) -> jax.Array:
    """float32 ``[..., N]`` of int activation codes ``[..., K]`` in groups of ``g`` rows
    (``a_group_size`` or ``w_group_size``, equal when both are set): one int32 dot per group,
    ``Σ_g s_a[g] s_w[g] (codes_g · W_g - z_g colsum_g)``, where activation scales / zero points
    per group (``[..., G, 1]``) or per token (``[..., 1]``), and weight scales per group
    (``[G, N]``) or per channel (``[N]``)."""
    g = q.a_group_size or q.w_group_size
    w = weight_codes(q, segment)                                    # [K, N]
    groups = w.shape[0] // g
    w = w.reshape(groups, g, -1)                                    # [G, g, N]
    lhs = codes.reshape(codes.shape[:-1] + (groups, g))             # [..., G, g]
    acc = jax.lax.dot_general(lhs, w, (((lhs.ndim - 1,), (1,)), ((lhs.ndim - 2,), (0,))),
                              preferred_element_type=jnp.int32)    # [G, ..., N]
    lead = (groups,) + (1,) * (acc.ndim - 2) + (-1,)                # a [G, N] array's shape

    def by_group(a):  # activation side [..., G, 1] -> [G, ..., 1]; per token: as it is
        return jnp.moveaxis(a, -2, 0) if q.a_group_size else a

    if a_zero is not None:
        colsum = (_select(q.w_colsum, segment) if q.w_group_size
                  else jnp.sum(w, axis=1, dtype=jnp.int32))         # [G, N]
        acc = acc - by_group(a_zero) * colsum.reshape(lead)
    w_scale = _select(q.w_scale, segment)
    w_scale = w_scale.reshape(lead) if q.w_group_size else w_scale
    return jnp.sum(acc.astype(jnp.float32) * by_group(a_scale) * w_scale, axis=0)


def _grouped_pallas(pk, q: QLinear, rows, segment) -> jax.Array:
    """float32 ``[M, N]`` (bias included) of ``rows [M, K]`` through ``pk.grouped_matmul``:
    the same activation codes as the ``xla`` path; per-channel weight scales and, without
    weight groups, each group's column sums of the codes (every weight copy) built here."""
    g = q.a_group_size or q.w_group_size
    groups = q.code_rows // g
    codes, a_scale, a_zero = quantize_activation(q, rows, segment)
    if q.a_group_size:  # [M, G, 1] -> [M, G]
        a_scale = a_scale.reshape(rows.shape[0], groups)
        a_zero = None if a_zero is None else a_zero.reshape(rows.shape[0], groups)
    colsum = None
    if a_zero is not None:
        if q.w_group_size:
            colsum = q.w_colsum
        else:
            w = (jax.vmap(lambda c: quantizers.unpack_int4(c, q.code_rows))(q.w_q) if q.packed
                 else q.w_q)                                          # [Sw, K, N]
            colsum = jnp.sum(w.reshape(w.shape[0], groups, g, -1), axis=2, dtype=jnp.int32)
    return pk.grouped_matmul(codes, q.w_q, a_scale, a_zero, q.w_scale, colsum, q.bias, segment,
                             group_size=g, w_bits=4 if q.packed else 8)


ACTIVATION_SLICES = 3


def sliced_dot(x: jax.Array, codes: jax.Array, slices: int = ACTIVATION_SLICES) -> jax.Array:
    """``x [..., K]`` float32 times integer ``codes [K, N]`` -> float32 ``[..., N]`` without
    converting the codes to float: ``x ≈ Σ_j s_j q_j``, each slice ``q_j`` int8 with a
    per-token scale ``s_j`` (the rounding residual of the slices before it), each product an
    int8 x int8 -> int32 dot (the Ozaki scheme). Three slices leave a residual below
    ``2^-23`` of each token's largest entry: float32 precision, for a weight-only layer.

    Why: a float dot needs the float weight, and XLA hoists the loop-invariant dequantization
    of every weight-only layer out of a sampler's ``lax.scan``: at DiT-XL/2 the adaLN
    weights' float32 copies (~880 MiB) were all alive at once.
    """
    acc = None
    residual = x.astype(jnp.float32)
    for _ in range(slices):
        scale = jnp.max(jnp.abs(residual), axis=-1, keepdims=True) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero token: zero codes
        part = jnp.clip(jnp.round(residual / scale), -127, 127).astype(jnp.int8)
        residual = residual - part.astype(jnp.float32) * scale
        dot = jax.lax.dot_general(part, codes, (((part.ndim - 1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.int32).astype(jnp.float32) * scale
        acc = dot if acc is None else acc + dot
    return acc


def low_rank_branch(q: QLinear, segment) -> tuple[jax.Array, jax.Array]:
    """float32 ``(down [K, r], up [r, N])`` of the segment's branch (``q.rank > 0``)."""
    return (_select(q.lr_down, segment).astype(jnp.float32),
            _select(q.lr_up, segment).astype(jnp.float32))


def low_rank_output(q: QLinear, xt: jax.Array, segment) -> jax.Array | float:
    """``x̃ [..., K] -> x̃ L1 L2 [..., N]`` float32 (0.0 without a branch). ``xt`` is the
    transformed activation in float, never its quantized codes."""
    if q.lr_down is None:
        return 0.0
    down, up = low_rank_branch(q, segment)
    return (xt @ down) @ up


def qlinear_apply(q: QLinear, x: jax.Array, segment=0, backend: str = "xla") -> jax.Array:
    """Quantized ``x [..., K] -> y [..., N]`` float32 on the chosen backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if x.shape[-1] != q.in_features:
        raise ValueError(f"x: expected last axis {q.in_features}, got shape {x.shape}")
    if backend == "auto":  # Pallas on TPU/GPU for integer layers wide enough, else XLA
        from pallas_kernels import auto_backend
        backend = auto_backend(q.in_features, q.w_scale.shape[-1], q.w_bits, q.a_bits)
    segment = jnp.asarray(segment, jnp.int32)
    xt = transform_activation(q, x, segment)
    if q.a_bits == 16:  # weight-only quantization (or none: w_bits == 16)
        q = _tie_packed(q, xt)
        if backend == "fake" or q.w_bits == 16 or q.fp8 or q.w_group_size:
            y = xt @ dequantized_weight(q, segment)
        else:  # integer dots on the codes, scales after: no float copy of the weight
            y = sliced_dot(xt, weight_codes(q, segment)) * _select(q.w_scale, segment)
    elif backend == "pallas" and q.w_bits != 16 and not q.fp8:
        import pallas_kernels as pk  # imported on use: the kernels load only when asked for
        rows = xt.reshape(-1, q.in_features)
        if q.w_group_size or q.a_group_size:
            from pallas_kernels.grouped_matmul import supports
            if not supports(q.a_group_size or q.w_group_size, q.packed):  # xla's group dots
                return qlinear_apply(q, x, segment, "xla")
            y = _grouped_pallas(pk, q, rows, segment)
            return y.reshape(x.shape[:-1] + y.shape[-1:]) + low_rank_output(q, xt, segment)
        if q.a_mode == "dynamic":
            clip = 1.0 if q.a_clip is None else _select(q.a_clip, segment)
            lo, hi = token_min_max(rows)
            codes, a_scale, a_zero = pk.per_token_quantize(
                rows, lo * clip, hi * clip, bits=q.a_bits, symmetric=q.a_symmetric)
        else:
            codes, a_scale, a_zero = quantize_activation(q, rows, segment)
        y = pk.w8a8_matmul(codes, q.w_q, a_scale, a_zero, q.w_scale, q.w_colsum, q.bias, segment,
                           w_bits=4 if q.packed else 8)
        return y.reshape(x.shape[:-1] + y.shape[-1:]) + low_rank_output(q, xt, segment)
    else:
        codes, a_scale, a_zero = quantize_activation(q, xt, segment)
        q = _tie_packed(q, codes)
        if backend == "fake" or q.w_bits == 16:  # no integer dot with float weights
            y = dequantize_activation(q, codes, a_scale, a_zero) @ dequantized_weight(q, segment)
        elif q.w_group_size or q.a_group_size:
            y = _grouped_int_dot(q, codes, a_scale, a_zero, segment)
        else:
            # int8 x int8 -> int32, or float8 x float8 -> float32 (exact products, float sums)
            acc = jax.lax.dot_general(codes, weight_codes(q, segment),
                                      (((codes.ndim - 1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32 if q.fp8 else jnp.int32)
            if a_zero is not None:
                acc = acc - a_zero * _select(q.w_colsum, segment)
            y = acc.astype(jnp.float32) * a_scale * _select(q.w_scale, segment)
    y = y + low_rank_output(q, xt, segment)
    return y + q.bias if q.bias is not None else y


def segment_invariant(q: QLinear) -> bool:
    """Whether ``q`` computes the same in every time segment: each per-segment array (weight
    copies, smoothing, DuQuant rotations, activation scales and clips, low-rank branches) has
    one entry."""
    per_segment = (q.w_q, q.w_scale, q.smooth, q.r1, q.perm, q.r2, q.a_scale, q.a_zero, q.a_clip,
                   q.lr_down, q.lr_up)
    return all(a is None or int(np.shape(a)[0]) == 1 for a in per_segment)


def output_columns(q: QLinear, start: int, stop: int) -> QLinear:
    """The layer restricted to output channels ``[start, stop)`` (static ints): codes, weight
    scales, column sums and bias sliced; the activation side is unchanged, so the result
    equals columns ``start:stop`` of the full layer's output on every backend."""
    n = int(q.w_scale.shape[-1])
    if not 0 <= start < stop <= n:
        raise ValueError(f"output_columns: expected 0 <= start < stop <= {n}, "
                         f"got [{start}, {stop})")
    return q.replace(w_q=q.w_q[..., start:stop], w_scale=q.w_scale[..., start:stop],
                     w_colsum=q.w_colsum[..., start:stop],
                     bias=None if q.bias is None else q.bias[start:stop],
                     lr_up=None if q.lr_up is None else q.lr_up[..., start:stop])


def qlinear_bytes(q: QLinear) -> int:
    """Bytes held by every array of the layer (codes, scales, rotations, per-segment copies)."""
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(q)))
