"""per_token_quantize (interpret mode) against a float64 reference, and in front of the matmul."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import per_token_quantize, w8a8_matmul
from tests.kernels import _reference as ref
from trdq_jax.quant import quantizers


def _activations(rng, m, k):
    x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 5.0, (m, 1))).astype(np.float32)
    x[1] = np.abs(x[1])  # all positive: the range is widened to contain 0
    x[2] = -np.abs(x[2])  # all negative
    x[3] = 0.0  # an all-zero token: the scale falls back to the epsilon floor
    return x


@pytest.mark.parametrize("bits, symmetric", [(8, False), (8, True), (4, False), (6, True)])
def test_codes_scales_zeros_match_float64_reference(bits, symmetric):
    rng = np.random.default_rng(bits)
    x = _activations(rng, 37, 101)
    clip = np.float32(0.8)  # clipped ranges: the outermost values saturate
    lo, hi = x.min(1, keepdims=True) * clip, x.max(1, keepdims=True) * clip
    codes, scale, zero = per_token_quantize(x, lo, hi, bits=bits, symmetric=symmetric,
                                            block_sizes=(16, 32))
    assert codes.dtype == jnp.int8 and codes.shape == x.shape and scale.shape == (37, 1)
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax if symmetric else -qmax - 1
    want_scale, zero_pre_round = ref.per_token_scale_zero(lo, hi, bits, symmetric)
    np.testing.assert_allclose(np.asarray(scale), want_scale, rtol=1e-6)
    scale64 = np.asarray(scale, np.float64)  # the kernel's own scale: its ulps do not count
    if symmetric:
        assert zero is None
        pre_round = x / scale64
    else:
        assert zero.dtype == jnp.int32 and zero.shape == (37, 1)
        ref.check_rounding(zero, qmin - np.minimum(lo, 0) / scale64, qmin, qmax)
        pre_round = x / scale64 + np.asarray(zero)
    assert ref.check_rounding(codes, pre_round, qmin, qmax) < 0.01
    assert (np.asarray(codes) == qmax).any()  # clipping happened


def test_exact_ties_round_half_to_even():
    """Range [-127, 127] at 8 bits symmetric gives scale exactly 1, so x / scale is x itself."""
    below_half = np.nextafter(np.float32(0.5), np.float32(0))
    values = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, below_half, -below_half,
                       np.nextafter(np.float32(0.5), np.float32(1)), 1e-30, -1e-30, 0.49, -3.51,
                       -0.75, 200.0, -200.0], np.float32)
    x = np.tile(values, (3, 1))
    lo, hi = np.full((3, 1), -127.0, np.float32), np.full((3, 1), 127.0, np.float32)
    codes, scale, _ = per_token_quantize(x, lo, hi, bits=8, symmetric=True)
    np.testing.assert_array_equal(np.asarray(scale), 1.0)
    np.testing.assert_array_equal(np.asarray(codes), np.clip(np.round(x), -127, 127))


def test_agrees_with_the_library_quantizer_with_default_blocks():
    x = _activations(np.random.default_rng(0), 50, 300)
    codes, scale, zero = per_token_quantize(x, x.min(1), x.max(1))
    want_codes, want_scale, want_zero = quantizers.quantize_per_token(x, 8, symmetric=False)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(want_codes))
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(want_scale))
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(want_zero))


def test_front_end_feeds_the_matmul():
    """float x -> kernel codes -> W8A8 kernel: float64 dequantised product of those codes, and
    8-bit-sized error against the float layer."""
    rng = np.random.default_rng(7)
    x = _activations(rng, 19, 72)
    w = rng.integers(-127, 128, (72, 40)).astype(np.int8)
    w_scale = rng.uniform(0.001, 0.01, 40).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    codes, scale, zero = per_token_quantize(x, x.min(1), x.max(1), block_sizes=(8, 32))
    y = w8a8_matmul(codes, w, scale, zero, w_scale, w.astype(np.int32).sum(0), bias,
                    block_sizes=(8, 16, 32))
    want = ref.dequant_matmul(np.asarray(codes), w, np.asarray(scale), np.asarray(zero), w_scale,
                              bias)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # and the quantized layer is close to the float one (8-bit error, not a wiring mistake)
    exact = x.astype(np.float64) @ (w * w_scale.astype(np.float64)) + bias
    assert np.abs(want - exact).max() < 0.02 * np.abs(exact).max()


def test_bad_inputs_name_the_argument():
    x = np.zeros((4, 8), np.float32)
    r = np.zeros((4, 1), np.float32)
    cases = [
        (dict(x=x.astype(np.int32)), "x: expected float activations"),
        (dict(x_min=np.zeros((3, 1))), "x_min: expected \\[M\\] or \\[M, 1\\]"),
        (dict(x_max=np.zeros((4, 2))), "x_max: expected"),
        (dict(bits=9), "bits: expected an integer bit width"),
        (dict(block_sizes=(8, 0)), "block_sizes: expected \\(bm, bk\\)"),
        (dict(target="cpu"), "target: expected None, 'tpu' or 'gpu'"),
    ]
    for overrides, message in cases:
        args = dict(x=x, x_min=r, x_max=r)
        args.update(overrides)
        with pytest.raises(ValueError, match=message):
            per_token_quantize(**args)
