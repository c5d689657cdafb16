"""Quantized 2-D convolutions: a ``QLinear`` whose codes are the HWIO kernel's im2col matrix.

Layout: ``x [B, H, W, C]`` (NHWC), kernel ``[kh, kw, C, N]`` (HWIO), codes ``[kh * kw * C, N]``
(the kernel reshaped: tap-major, channel-minor), explicit padding ``((top, bottom), (left,
right))``, strides ``(sh, sw)``; no dilation, no feature groups.

Activations are transformed (smoothing, rotation) over the C channels of every pixel, exactly
as a Dense transforms a token, and the weight of every tap is folded with the inverse
transform, so the float output is unchanged. Quantization then follows the layer's mode:

* static: one per-tensor scale (and zero point) per time segment. ``xla`` pads the codes with
  the zero point, so a padded pixel dequantizes to 0, runs ONE int8 ``conv_general_dilated``
  with int32 accumulation, subtracts ``zero * Σ codes`` (over taps and channels) and applies
  the scales once;
* dynamic: per token, every pixel being a token (its C channels share a scale, as for a Dense).
  Scales then differ inside a window, so ``xla`` runs the integer conv tap by tap: kh * kw
  int8 1x1 dots with int32 accumulation, each scaled by its input pixel's scale, shifted into
  place and summed in float32 (the flops of one convolution).

``fake`` dequantizes activations and weights and runs a float convolution (the reference);
``pallas`` and ``auto`` run the ``xla`` path (no convolution kernel in ``pallas_kernels``).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from trdq_jax.quant import quantizers
from trdq_jax.quant.qlinear import (BACKENDS, QLinear, _select, _tie_packed, dequantized_weight,
                                    low_rank_branch, quantize_activation, transform_activation,
                                    weight_codes)

_DIMS = ("NHWC", "HWIO", "NHWC")


def conv_padding(padding, kernel_size: Sequence[int], strides: Sequence[int],
                 spatial: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Explicit ``((lo, hi), (lo, hi))`` pads from a Flax/lax padding spec: ``"SAME"``,
    ``"VALID"``, an int, or a pair per spatial axis (int or ``(lo, hi)``)."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise NotImplementedError(f"padding: {padding!r} convolutions are not quantizable "
                                      "(only SAME, VALID or explicit pads); keep the layer in "
                                      "float with Recipe.keep_float")
        return tuple(tuple(int(v) for v in p) for p in jax.lax.padtype_to_pads(
            tuple(spatial), tuple(kernel_size), tuple(strides), padding.upper()))
    if isinstance(padding, int):
        return tuple((padding, padding) for _ in kernel_size)
    pads = []
    for p in padding:
        pads.append((int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1])))
    if len(pads) != len(kernel_size):
        raise ValueError(f"padding: expected {len(kernel_size)} (lo, hi) pairs, got {padding!r}")
    return tuple(pads)


def module_geometry(module, x_shape) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
    """``(strides, pads)`` of a ``flax.linen.Conv`` applied to ``x_shape`` ``[B, H, W, C]``;
    NotImplementedError for what the quantized conv does not cover."""
    kernel = tuple(module.kernel_size)
    if len(kernel) != 2 or len(x_shape) != 4:
        raise NotImplementedError(f"conv {'/'.join(module.path)}: only 2-D NHWC convolutions are "
                                  "quantizable; keep it in float with Recipe.keep_float")
    for name in ("input_dilation", "kernel_dilation"):
        value = getattr(module, name, None)
        if value not in (None, 1) and tuple(value) != (1, 1):
            raise NotImplementedError(f"conv {'/'.join(module.path)}: {name}={value} is not "
                                      "quantizable; keep it in float with Recipe.keep_float")
    if getattr(module, "feature_group_count", 1) != 1:
        raise NotImplementedError(f"conv {'/'.join(module.path)}: grouped convolutions are not "
                                  "quantizable; keep it in float with Recipe.keep_float")
    strides = module.strides or 1
    strides = (strides, strides) if isinstance(strides, int) else tuple(int(s) for s in strides)
    return strides, conv_padding(module.padding, kernel, strides, x_shape[1:3])


def output_size(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def conv_patches(x: jax.Array, kernel_size, strides, pads, index: jax.Array) -> jax.Array:
    """im2col rows ``[R, kh * kw * C]`` of ``x [B, H, W, C]`` at the output positions ``index``
    (int ``[R]``, flat over ``[B, Ho, Wo]`` in C order), taps row-major then channels, so that
    ``patches @ kernel.reshape(-1, N)`` is the convolution output at those positions."""
    b, h, w, c = x.shape
    (kh, kw), (sh, sw) = kernel_size, strides
    ho, wo = output_size(h, kh, sh, pads[0]), output_size(w, kw, sw, pads[1])
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    bi, rest = jnp.divmod(index, ho * wo)
    oi, oj = jnp.divmod(rest, wo)
    di, dj = jnp.meshgrid(jnp.arange(kh), jnp.arange(kw), indexing="ij")
    rows = oi[:, None] * sh + di.reshape(-1)[None]                     # [R, T]
    cols = oj[:, None] * sw + dj.reshape(-1)[None]
    return xp[bi[:, None], rows, cols].reshape(index.shape[0], kh * kw * c)


def conv_weight_codes(q: QLinear, segment) -> jax.Array:
    """int8 HWIO codes ``[kh, kw, C, N]`` of the segment's weight copy (int4 unpacked)."""
    w = weight_codes(q, segment)
    return w.reshape(*q.kernel_size, q.in_features, w.shape[-1])


def conv_weight(q: QLinear, segment) -> jax.Array:
    """float32 HWIO ``[kh, kw, C, N]``: the folded weight as the quantizer represents it."""
    w = dequantized_weight(q, segment)
    return w.reshape(*q.kernel_size, q.in_features, w.shape[-1])


def _float_conv(x, w, strides, pads):
    return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DIMS,
                                        precision=jax.lax.Precision.HIGHEST)


def qconv_apply(q: QLinear, x: jax.Array, segment=0, backend: str = "xla", *,
                strides=(1, 1), padding=((0, 0), (0, 0))) -> jax.Array:
    """Quantized convolution ``x [B, H, W, C] -> [B, Ho, Wo, N]`` float32 (see module doc)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if len(q.kernel_size) != 2:
        raise ValueError(f"q: expected a quantized 2-D convolution (kernel_size (kh, kw)), "
                         f"got kernel_size {q.kernel_size!r}")
    if x.ndim != 4 or x.shape[-1] != q.in_features:
        raise ValueError(f"x: expected [B, H, W, {q.in_features}], got shape {x.shape}")
    strides = tuple(int(s) for s in strides)
    pads = conv_padding(padding, q.kernel_size, strides, x.shape[1:3])
    segment = jnp.asarray(segment, jnp.int32)
    xt = transform_activation(q, x, segment)
    if q.a_bits == 16:
        q = _tie_packed(q, xt)
        y = _float_conv(xt, conv_weight(q, segment), strides, pads)
    else:
        codes, a_scale, a_zero = quantize_activation(q, xt, segment)
        q = _tie_packed(q, codes)
        if backend == "fake" or q.w_bits == 16:
            y = _float_conv(quantizers.dequantize(codes, a_scale, a_zero),
                            conv_weight(q, segment), strides, pads)
        elif q.a_mode == "static" and not q.fp8:
            y = _static_int_conv(q, codes, a_scale, a_zero, segment, strides, pads)
        else:
            y = _per_token_int_conv(q, codes, a_scale, a_zero, segment, strides, pads)
    if q.lr_down is not None:  # the float branch: conv with L1 as a [kh, kw, C, r] kernel, then L2
        down, up = low_rank_branch(q, segment)
        y = y + _float_conv(xt, down.reshape(*q.kernel_size, q.in_features, -1), strides,
                            pads) @ up
    return y + q.bias if q.bias is not None else y


def _static_int_conv(q, codes, a_scale, a_zero, segment, strides, pads):
    """One integer conv; padding holds the zero point, i.e. dequantizes to exactly 0."""
    w = conv_weight_codes(q, segment)
    if a_zero is not None:
        codes = jnp.pad(codes.astype(jnp.int32) - a_zero, ((0, 0), *pads, (0, 0)))
        codes = (codes + a_zero).astype(jnp.int8)  # pad value = zero, others unchanged
    else:
        codes = jnp.pad(codes, ((0, 0), *pads, (0, 0)))
    acc = jax.lax.conv_general_dilated(codes, w, strides, ((0, 0), (0, 0)),
                                       dimension_numbers=_DIMS,
                                       preferred_element_type=jnp.int32)
    if a_zero is not None:
        acc = acc - a_zero * _select(q.w_colsum, segment)
    return acc.astype(jnp.float32) * a_scale * _select(q.w_scale, segment)


def _per_token_int_conv(q, codes, a_scale, a_zero, segment, strides, pads):
    """Tap by tap: int8 1x1 dot (int32) per tap, scaled per input pixel, shifted, summed
    (float8 codes: a float8 dot accumulated in float32; a static scale is one scalar)."""
    w = conv_weight_codes(q, segment)                                  # [kh, kw, C, N]
    kh, kw = q.kernel_size
    (sh, sw) = strides
    b, h, wd, _ = codes.shape
    ho, wo = output_size(h, kh, sh, pads[0]), output_size(wd, kw, sw, pads[1])
    w_scale = _select(q.w_scale, segment)
    out = jnp.zeros((b, ho, wo, w.shape[-1]), jnp.float32)
    for i in range(kh):
        for j in range(kw):
            acc = jax.lax.dot_general(codes, w[i, j], (((3,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32 if q.fp8
                                      else jnp.int32)  # [B, H, W, N]
            if a_zero is not None:
                acc = acc - a_zero * w[i, j].astype(jnp.int32).sum(axis=0)
            tap = jnp.pad(acc.astype(jnp.float32) * a_scale, ((0, 0), *pads, (0, 0)))
            out = out + tap[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
    return out * w_scale
