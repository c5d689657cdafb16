"""FP8 (``Recipe.fp8``): codes against ``ml_dtypes`` bit for bit, a layer against a numpy
simulation written from the definition, the ``xla`` float8 dot against the ``fake`` backend
(Dense and conv), real 1-byte storage through a checkpoint, and the bad inputs."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import trdq_jax.quant as Q
from trdq_jax.config import ConfigError
from trdq_jax.quant import qconv, quantizers, verify
from trdq_jax.quant.fit import quantize_layer
from tests.quant.test_fit import _stats
from tests.quant.test_qconv import _conv_stats
from tests.test_quant_cli import TINY

RNG = np.random.default_rng(5)
E4M3 = ml_dtypes.float8_e4m3fn


def _reference_codes(x, scale):
    return np.clip(np.asarray(x, np.float32) / np.float32(scale), -448, 448).astype(E4M3)


def test_codes_match_ml_dtypes_bit_for_bit():
    x = np.concatenate([RNG.normal(size=4000) * 50, RNG.normal(size=1000) * 1e-3,
                        [0.0, -0.0, 448.0, -448.0, 449.0, 1e6, -1e6, 464.0, 0.0625 * 1.5],
                        np.float32(2.0) ** np.arange(-12, 9)]).astype(np.float32)
    for scale in (1.0, 0.37, 3.0):
        got = np.asarray(quantizers.quantize_fp8(jnp.asarray(x), scale))
        assert got.dtype == E4M3
        np.testing.assert_array_equal(got.view(np.uint8), _reference_codes(x, scale).view(np.uint8))
    assert not np.isnan(np.asarray(quantizers.quantize_fp8(jnp.asarray(x), 1.0),
                                   np.float32)).any()  # overflow saturates, never NaN


def _numpy_fp8_layer(q, x, segment):
    """float64 from the definition: per-token (dynamic) or per-tensor (static) scale
    ``absmax / 448``, e4m3 codes by ml_dtypes, times the e4m3 weight codes and their scales."""
    pick = lambda a: np.asarray(a)[0 if np.shape(a)[0] == 1 else segment]  # noqa: E731
    x = np.asarray(x, np.float32)
    if q.a_mode == "dynamic":
        clip = float(pick(q.a_clip))
        scale = np.maximum(np.abs(x).max(-1, keepdims=True) * np.float32(clip), 1e-8) / 448
    else:
        scale = pick(q.a_scale)
    codes = np.clip(x / scale, -448, 448).astype(E4M3)
    w = np.asarray(q.w_q[0]).astype(np.float64) * np.asarray(q.w_scale[0], np.float64)
    return (codes.astype(np.float64) * scale) @ w


@pytest.mark.parametrize("name", ["trdq", "trdq_static", "minmax"])
def test_layer_matches_numpy_and_xla_matches_fake(name):
    rows = RNG.normal(size=(8, 16, 32)).astype(np.float32)
    rows[:, :, 2] *= 10
    kernel = RNG.normal(size=(32, 8)).astype(np.float32)
    recipe = Q.get_recipe(name, 8, 8, num_segments=1, segment_split="uniform", fp8=True,
                          rotation="none")
    q = quantize_layer(kernel, None, _stats(rows, 32), np.zeros(8, np.int32), 1, recipe)
    assert q.w_q.dtype == jnp.float8_e4m3fn and q.fp8 and q.a_zero is None
    verify.check_qlinear(q, "layer", 1)
    x = rows.reshape(-1, 32)
    want = _numpy_fp8_layer(q, x, 0) if q.a_mode == "dynamic" else None
    fake = np.asarray(Q.qlinear_apply(q, jnp.asarray(x), 0, "fake"))
    for backend in ("xla", "pallas", "auto"):
        got = np.asarray(Q.qlinear_apply(q, jnp.asarray(x), 0, backend))
        np.testing.assert_allclose(got, fake, rtol=1e-5, atol=1e-5 * np.abs(fake).max())
    if want is not None:
        np.testing.assert_allclose(fake, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    float_out = x @ kernel
    assert np.sqrt(np.mean((fake - float_out) ** 2)) < 0.05 * np.std(float_out)


def test_xla_feeds_float8_operands_to_the_dot():
    rows = RNG.normal(size=(4, 8, 32)).astype(np.float32)
    q = quantize_layer(RNG.normal(size=(32, 8)).astype(np.float32), None, _stats(rows, 32),
                       np.zeros(4, np.int32), 1, Q.get_recipe("quarot", 8, 8, fp8=True))
    text = jax.jit(lambda x: Q.qlinear_apply(q, x, 0, "xla")).lower(
        jnp.ones((4, 32))).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line and "f8E4M3FN" in line]
    assert len(dots) == 1 and "-> tensor<4x8xf32>" in dots[0], dots  # the other: the rotation
    assert not [line for line in text.splitlines()  # the weight codes are never upcast
                if "convert" in line and "32x8xf8E4M3FN" in line.split("->")[0]]


@pytest.mark.parametrize("a_mode", ["dynamic", "static"])
def test_fp8_conv_xla_matches_fake(a_mode):
    x = RNG.normal(size=(4, 2, 6, 6, 8)).astype(np.float32)
    kernel = RNG.normal(size=(3, 3, 8, 6)).astype(np.float32)
    pads = ((1, 1), (1, 1))
    recipe = Q.Recipe("f", a_mode=a_mode, fp8=True, a_clip_search=False)
    q = quantize_layer(kernel, None, _conv_stats(x, (3, 3), (1, 1), pads),
                       np.zeros(4, np.int32), 1, recipe)
    fake = qconv.qconv_apply(q, jnp.asarray(x[0]), 0, "fake", padding=pads)
    got = qconv.qconv_apply(q, jnp.asarray(x[0]), 0, "xla", padding=pads)
    np.testing.assert_allclose(got, fake, rtol=1e-5, atol=1e-5 * float(jnp.abs(fake).max()))


def test_bad_fp8_recipes_are_one_line_errors():
    for w_bits, a_bits in ((4, 8), (8, 6), (6, 6)):
        with pytest.raises(ConfigError, match=rf"^Recipe.fp8: float8 e4m3 codes are 8 bits: "
                           rf"needs w_bits = 8 and a_bits = 8 \(16: weight-only\), got "
                           rf"W{w_bits}A{a_bits}$"):
            Q.get_recipe("trdq", w_bits, a_bits, fp8=True)


def test_fp8_checkpoint_holds_one_byte_codes_and_refuses_edits(tmp_path, tiny_calibrated):
    _, params, calibrate_for = tiny_calibrated
    recipe = Q.get_recipe("quarot", 8, 8, num_segments=2, fp8=True)
    calib = calibrate_for(recipe)
    qparams = Q.quantize(params, calib, recipe)
    int8 = Q.quantize(params, calib, dataclasses.replace(recipe, fp8=False))
    assert Q.weight_bytes(qparams)["quantized_layers"] == Q.weight_bytes(int8)["quantized_layers"]
    path = Q.save_quantized(tmp_path / "q", qparams, TINY, recipe, calib.segment_of_step)
    restored, _, recipe2, _ = Q.load_quantized(path)
    assert recipe2 == recipe
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(qparams)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8) if a.dtype == E4M3
                                      else np.asarray(a),
                                      np.asarray(b).view(np.uint8) if b.dtype == E4M3
                                      else np.asarray(b))
    qkv = qparams["layers"]["blocks_0"]["attn"]["qkv"]
    int_qkv = int8["layers"]["blocks_0"]["attn"]["qkv"]
    with pytest.raises(verify.QuantizedModelError, match=r"qkv.fp8: float8 e4m3 layers have "
                       r"w_bits 8, a_bits 8 or 16 and symmetric activations"):
        verify.check_qlinear(int_qkv.replace(fp8=True), "qkv", 2)
    with pytest.raises(verify.QuantizedModelError, match=r"qkv.fp8: float8 codes are stored as "
                       r"float8_e4m3fn"):
        verify.check_qlinear(int_qkv.replace(fp8=True, a_symmetric=True), "qkv", 2)
    big = qkv.replace(w_q=jnp.full_like(qkv.w_q, jnp.nan))
    with pytest.raises(verify.QuantizedModelError, match=r"qkv.w_q: .* not finite float8 e4m3"):
        verify.check_qlinear(big, "qkv", 2)
