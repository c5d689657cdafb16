"""Quantized convolutions: backends agree, integer accumulation is exact against numpy, the
im2col rows are the convolution's patches, transforms leave the float output unchanged, and
the UNet's convolutions are quantized by default."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trdq_jax.quant as Q
from trdq_jax.quant import qconv, quantizers
from trdq_jax.quant.capture import LayerStats
from trdq_jax.quant.fit import quantize_layer

RNG = np.random.default_rng(0)
GEOMETRIES = [((1, 1), ((1, 1), (1, 1))), ((2, 2), ((1, 1), (1, 1))), ((1, 1), "VALID"),
              ((1, 2), ((0, 2), (1, 0)))]


def _layer(c=8, n=5, kernel=(3, 3), a_mode="dynamic", a_symmetric=False, w_bits=8):
    w = RNG.normal(size=(*kernel, c, n)).astype(np.float32)
    codes, scale, _ = quantizers.quantize_weight(jnp.asarray(w.reshape(-1, n)), w_bits)
    extra = {}
    if a_mode == "static":
        extra = dict(a_scale=jnp.asarray([0.03]),
                     a_zero=None if a_symmetric else jnp.asarray([-5], jnp.int32))
    w_q = quantizers.pack_int4(codes[None]) if w_bits <= 4 else codes[None]
    return Q.QLinear(w_q=w_q, w_scale=scale[None], w_colsum=codes.astype(jnp.int32).sum(0)[None],
                     bias=jnp.asarray(RNG.normal(size=n), jnp.float32), in_features=c,
                     kernel_size=kernel, w_bits=w_bits, a_mode=a_mode, a_symmetric=a_symmetric,
                     **extra)


def numpy_int_conv(q, x, strides, pads):
    """The quantized conv from definitions: numpy int64 sums of code products per output,
    float64 epilogue (per-token: each input pixel's scale and zero point)."""
    x = np.asarray(x, np.float64)
    b = q.a_bits
    if q.a_mode == "static":
        scale = np.full(x.shape[:3] + (1,), float(q.a_scale[0]))
        zero = np.zeros_like(scale) if q.a_zero is None else np.full_like(scale, float(q.a_zero[0]))
    else:
        lo, hi = np.minimum(x.min(-1, keepdims=True), 0), np.maximum(x.max(-1, keepdims=True), 0)
        if q.a_symmetric:
            scale, zero = np.maximum(np.maximum(-lo, hi), 1e-8) / (2 ** (b - 1) - 1), 0 * lo
        else:
            scale = np.maximum(hi - lo, 1e-8) / (2 ** b - 1)
            zero = np.clip(np.round(-2 ** (b - 1) - lo / scale), -2 ** (b - 1), 2 ** (b - 1) - 1)
    lo_code = -(2 ** (b - 1) - 1) if q.a_symmetric else -2 ** (b - 1)
    codes = np.clip(np.round(x / scale) + zero, lo_code, 2 ** (b - 1) - 1).astype(np.int64)
    wq = np.asarray(Q.verify.weight_codes(q)[0], np.int64).reshape(*q.kernel_size, q.in_features, -1)
    (kh, kw), (sh, sw) = q.kernel_size, strides
    bsz, h, w, _ = x.shape
    ho = (h + sum(pads[0]) - kh) // sh + 1
    wo = (w + sum(pads[1]) - kw) // sw + 1
    out = np.zeros((bsz, ho, wo, wq.shape[-1]))
    for i in range(ho):
        for j in range(wo):
            for di in range(kh):
                for dj in range(kw):
                    r, c = i * sh + di - pads[0][0], j * sw + dj - pads[1][0]
                    if 0 <= r < h and 0 <= c < w:
                        acc = (codes[:, r, c] - zero[:, r, c].astype(np.int64)) @ wq[di, dj]
                        out[:, i, j] += acc * scale[:, r, c]
    return out * np.asarray(q.w_scale[0], np.float64) + np.asarray(q.bias, np.float64)


@pytest.mark.parametrize("a_mode,a_symmetric,w_bits", [("dynamic", False, 8), ("dynamic", True, 4),
                                                       ("static", False, 8), ("static", True, 4)])
def test_backends_agree_and_integer_accumulation_is_exact(a_mode, a_symmetric, w_bits):
    q = _layer(a_mode=a_mode, a_symmetric=a_symmetric, w_bits=w_bits)
    x = jnp.asarray(RNG.normal(size=(2, 7, 6, 8)).astype(np.float32) * 3)
    for strides, padding in GEOMETRIES:
        pads = qconv.conv_padding(padding, q.kernel_size, strides, x.shape[1:3])
        fake = np.asarray(qconv.qconv_apply(q, x, 0, "fake", strides=strides, padding=padding))
        xla = np.asarray(qconv.qconv_apply(q, x, 0, "xla", strides=strides, padding=padding))
        want = numpy_int_conv(q, x, strides, pads)
        assert fake.shape == want.shape == xla.shape
        np.testing.assert_allclose(xla, want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(fake, want, rtol=1e-5, atol=1e-4)


def test_static_xla_runs_one_integer_convolution():
    q = _layer(a_mode="static")
    x = jnp.ones((1, 5, 5, 8))
    hlo = jax.jit(lambda x: qconv.qconv_apply(q, x, 0, "xla", strides=(1, 1),
                                               padding=((1, 1), (1, 1)))).lower(x).as_text()
    assert hlo.count("stablehlo.convolution") == 1 and "xi8" in hlo


def test_patches_are_the_convolution_at_their_positions():
    x = jnp.asarray(RNG.normal(size=(2, 6, 5, 3)).astype(np.float32))
    kernel = jnp.asarray(RNG.normal(size=(3, 2, 3, 4)).astype(np.float32))
    for strides, padding in GEOMETRIES:
        pads = qconv.conv_padding(padding, (3, 2), strides, x.shape[1:3])
        full = jax.lax.conv_general_dilated(x, kernel, strides, pads,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision="highest")
        index = jnp.arange(full.shape[0] * full.shape[1] * full.shape[2])
        rows = qconv.conv_patches(x, (3, 2), strides, pads, index)
        np.testing.assert_allclose(rows @ kernel.reshape(-1, 4), full.reshape(-1, 4),
                                   rtol=1e-5, atol=1e-5)


def _conv_stats(x, kernel_size, strides, pads, rows_per_step=40):
    """LayerStats of a conv input ``x [steps, B, H, W, C]`` (patch rows at random positions)."""
    steps = x.shape[0]
    rows = []
    for s in range(steps):
        out = jax.eval_shape(lambda a: jax.lax.conv_general_dilated(
            a, jnp.zeros((*kernel_size, x.shape[-1], 1)), strides, pads,
            dimension_numbers=("NHWC", "HWIO", "NHWC")), x[s])
        positions = int(np.prod(out.shape[:3]))
        index = jnp.asarray(RNG.choice(positions, min(rows_per_step, positions), replace=False))
        rows.append(np.asarray(qconv.conv_patches(jnp.asarray(x[s]), kernel_size, strides, pads,
                                                  index)))
    flat = x.reshape(steps, -1, x.shape[-1])
    return LayerStats(absmax=np.abs(flat).max(1), tensor_min=flat.min((1, 2)),
                      tensor_max=flat.max((1, 2)), rows=np.stack(rows),
                      weight_absmax=np.ones(x.shape[-1], np.float32))


@pytest.mark.parametrize("fields", [dict(smoothing=True, alpha=0.5),
                                    dict(smoothing=True, rotation="hadamard"),
                                    dict(rotation="duquant", rotation_block=4, num_segments=2,
                                         per_segment_weights=True)])
def test_transforms_over_input_channels_leave_the_float_conv_unchanged(fields):
    steps, c, n = 4, 8, 6
    x = RNG.normal(size=(steps, 2, 6, 6, c)).astype(np.float32)
    x[..., 2] *= 20.0  # an outlier channel
    kernel = RNG.normal(size=(3, 3, c, n)).astype(np.float32)
    strides, pads = (2, 2), ((1, 1), (1, 1))
    recipe = Q.Recipe("off", w_bits=16, a_bits=16, **fields)
    table = np.repeat(np.arange(recipe.num_segments), steps // recipe.num_segments)
    q = quantize_layer(kernel, np.zeros(n, np.float32), _conv_stats(x, (3, 3), strides, pads),
                       table, recipe.num_segments, recipe)
    want = jax.lax.conv_general_dilated(jnp.asarray(x[0]), jnp.asarray(kernel), strides, pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision="highest")
    for segment in range(recipe.num_segments):
        got = qconv.qconv_apply(q, jnp.asarray(x[0]), segment, "xla", strides=strides,
                                padding=pads)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * float(jnp.abs(want).max()))


def test_quantized_conv_layer_tracks_the_float_conv():
    steps, c, n = 4, 16, 8
    x = RNG.normal(size=(steps, 2, 6, 6, c)).astype(np.float32)
    kernel = RNG.normal(size=(3, 3, c, n)).astype(np.float32) / 10
    strides, pads = (1, 1), ((1, 1), (1, 1))
    stats = _conv_stats(x, (3, 3), strides, pads)
    want = jax.lax.conv_general_dilated(jnp.asarray(x[1]), jnp.asarray(kernel), strides, pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    errors = {}
    for name in ("trdq", "trdq_static", "minmax"):
        recipe = Q.get_recipe(name, 8, 8, num_segments=1, segment_split="uniform")
        q = quantize_layer(kernel, None, stats, np.zeros(steps, np.int32), 1, recipe)
        got = qconv.qconv_apply(q, jnp.asarray(x[1]), 0, "xla", strides=strides, padding=pads)
        errors[name] = float(jnp.sqrt(jnp.mean((got - want) ** 2)) / jnp.std(want))
    assert max(errors.values()) < 0.02, errors


def test_unet_convolutions_are_quantized_by_default():
    from configs.digits_unet import get_config
    from trdq_jax.models import abstract_params, build_model, dummy_inputs
    from trdq_jax.quant.capture import layer_paths
    cfg = get_config().model
    params = abstract_params(cfg)
    paths = layer_paths(build_model(cfg), params, dummy_inputs(cfg, 2), kinds=("Dense", "Conv"))
    quantized, _, kept = Q.select_layers(paths, Q.get_recipe(
        "trdq", keep_float=Q.DEFAULT_KEEP_FLOAT, weight_only=Q.DEFAULT_WEIGHT_ONLY))
    assert sorted(p for ps in kept.values() for p in ps) == ["conv_in", "conv_out"]
    assert "down_0_res_0/conv_in" in quantized and "down_0_downsample" in quantized

    def size(path):
        node = params
        for name in path.split("/"):
            node = node[name]
        return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(node))
    total = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    assert sum(size(p) for p in quantized) / total >= 0.9
