"""Quantizers against float32/float64 numpy references written here, bounds and exact packing."""
import jax
import numpy as np
import pytest

from trdq_jax.quant.quantizers import (check_bits, dequantize, mse_clip_search, pack_int4,
                                       quantize, quantize_per_tensor, quantize_per_token,
                                       quantize_weight, scale_zero_from_range, unpack_int4)


def _ref_quant(x, x_min, x_max, bits, symmetric):
    """Textbook min-max quantizer in float32 numpy: (codes, scale, zero)."""
    x = np.asarray(x, np.float32)
    qmax = 2 ** (bits - 1) - 1
    if symmetric:
        scale = (np.maximum(np.abs(x_min), np.abs(x_max)).astype(np.float32) / np.float32(qmax))
        return np.clip(np.round(x / scale), -qmax, qmax), scale, np.zeros_like(scale)
    lo = np.minimum(x_min, 0).astype(np.float32)
    hi = np.maximum(x_max, 0).astype(np.float32)
    scale = (hi - lo) / np.float32(2 ** bits - 1)
    zero = np.round(-qmax - 1 - lo / scale)
    return np.clip(np.round(x / scale) + zero, -qmax - 1, qmax), scale, zero


def _weights(k=64, n=24, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, n)) * rng.uniform(0.1, 3.0, n) + rng.normal(0, 0.5, n)
            ).astype(np.float32)


@pytest.mark.parametrize("bad", [1, 9, 0, 4.0, True, "8", None])
def test_bits_outside_2_to_8_raise_naming_the_argument(bad):
    with pytest.raises(ValueError, match="bits"):
        check_bits(bad)
    with pytest.raises(ValueError, match="^a_bits"):
        check_bits(bad, "a_bits")
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(_weights(8, 2), bad)


def test_check_bits_accepts_the_valid_range():
    assert [check_bits(b) for b in range(2, 9)] == list(range(2, 9))
    assert check_bits(np.int64(4)) == 4


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_round_trip_within_half_a_step_and_codes_in_range(bits, symmetric):
    w = _weights()
    q, scale, zero = quantize_weight(w, bits, symmetric=symmetric)
    q, scale = np.asarray(q), np.asarray(scale)
    assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (w.shape[1],)
    assert scale.dtype == np.float32 and np.all(scale > 0)
    lo = -(2 ** (bits - 1)) + (1 if symmetric else 0)
    assert q.min() >= lo and q.max() <= 2 ** (bits - 1) - 1
    if symmetric:
        assert zero is None
    else:
        zero = np.asarray(zero)
        assert zero.dtype == np.int32 and zero.min() >= -(2 ** (bits - 1))
        assert zero.max() <= 2 ** (bits - 1) - 1
    err = np.abs(np.asarray(dequantize(q, scale, zero), np.float64) - w)
    assert np.all(err <= scale / 2 * (1 + 1e-5) + 1e-7)
    # the full code range is used: each column's extreme lands on the edge code
    assert np.all((q == lo).any(0) | (q == 2 ** (bits - 1) - 1).any(0))


@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_codes_match_numpy_reference(symmetric):
    w = _weights(seed=1)
    q, scale, zero = quantize_weight(w, 4, symmetric=symmetric)
    ref_q, ref_scale, ref_zero = _ref_quant(w, w.min(0), w.max(0), 4, symmetric)
    np.testing.assert_allclose(np.asarray(scale), ref_scale, rtol=1e-6)
    if not symmetric:
        np.testing.assert_array_equal(np.asarray(zero), ref_zero)
    mismatch = np.asarray(q) != ref_q
    assert mismatch.mean() < 1e-3  # only exact .5 ties may round differently
    assert np.all(np.abs(np.asarray(q, np.int32) - ref_q)[mismatch] <= 1)


def test_asymmetric_range_is_widened_to_contain_zero():
    scale, zero = scale_zero_from_range(np.float32(2.0), np.float32(6.0), 8, False)
    assert float(scale) == pytest.approx(6.0 / 255) and int(zero) == -128
    scale, zero = scale_zero_from_range(np.float32(-5.1), np.float32(-1.0), 8, False)
    assert float(scale) == pytest.approx(5.1 / 255) and int(zero) == 127
    # 0 is exactly representable: it quantizes to the zero point
    assert int(quantize(np.float32(0.0), scale, zero, 8)) == 127


def test_all_zero_range_gives_positive_scale_and_zero_codes():
    w = np.zeros((8, 3), np.float32)
    for symmetric in (True, False):
        q, scale, zero = quantize_weight(w, 4, symmetric=symmetric)
        assert np.all(np.isfinite(scale)) and np.all(np.asarray(scale) > 0)
        np.testing.assert_array_equal(np.asarray(dequantize(q, scale, zero)), w)


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_group_shapes_and_values(symmetric):
    w = _weights(k=64, n=6, seed=2)
    q, scale, zero = quantize_weight(w, 4, symmetric=symmetric, group_size=16)
    assert q.shape == (64, 6) and scale.shape == (4, 6)
    assert (zero is None) == symmetric and (symmetric or zero.shape == (4, 6))
    groups = w.reshape(4, 16, 6)
    ref_q, ref_scale, ref_zero = _ref_quant(groups, groups.min(1, keepdims=True),
                                            groups.max(1, keepdims=True), 4, symmetric)
    np.testing.assert_allclose(np.asarray(scale), ref_scale[:, 0], rtol=1e-6)
    assert (np.asarray(q).reshape(4, 16, 6) != ref_q).mean() < 1e-3
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(w, 4, group_size=10)


def test_clip_ratio_scalar_and_per_channel_array():
    w = _weights(k=32, n=5, seed=3)
    ratios = np.array([1.0, 0.9, 0.75, 0.6, 0.5], np.float32)
    q, scale, _ = quantize_weight(w, 4, clip_ratio=ratios)
    for j, r in enumerate(ratios):
        ref_q, ref_scale, _ = _ref_quant(w[:, j], w[:, j].min() * r, w[:, j].max() * r, 4, True)
        np.testing.assert_allclose(float(scale[j]), ref_scale, rtol=1e-6)
        assert (np.asarray(q[:, j]) != ref_q).sum() <= 1
    with pytest.raises(ValueError, match="clip_ratio"):
        quantize_weight(w, 4, clip_ratio=1.5)
    with pytest.raises(ValueError, match="clip_ratio"):
        quantize_weight(w, 4, clip_ratio=np.ones(4))


def _column_mse(w, bits, ratios):
    err = []
    for j in range(w.shape[1]):
        q, s, _ = _ref_quant(w[:, j], w[:, j].min() * ratios[j], w[:, j].max() * ratios[j],
                             bits, True)
        err.append(np.sum((q * s - w[:, j].astype(np.float64)) ** 2))
    return np.array(err)


def test_mse_clip_search_never_worse_and_better_on_heavy_tails():
    rng = np.random.default_rng(4)
    w = rng.standard_t(3, size=(256, 16)).astype(np.float32)
    ratios = np.asarray(mse_clip_search(w, 4))
    assert ratios.shape == (16,) and np.all((ratios >= 0.5) & (ratios <= 1.0))
    searched = _column_mse(w, 4, ratios)
    plain = _column_mse(w, 4, np.ones(16))
    assert np.all(searched <= plain * (1 + 1e-6))
    assert searched.sum() < 0.85 * plain.sum()  # about 0.75 for Student-t(3) at 4 bits
    assert np.mean(ratios < 1.0) > 0.8
    # the search is a brute-force argmin: no grid value beats the chosen one for any channel
    for r in np.arange(0.5, 1.0001, 0.05):
        assert np.all(searched <= _column_mse(w, 4, np.full(16, r)) * (1 + 1e-6))
    with pytest.raises(ValueError, match="grid"):
        mse_clip_search(w, 4, grid=(1.2,))


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_token_matches_reference_and_bound(symmetric):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 5, 32)) * 3 + 1).astype(np.float32)
    q, scale, zero = quantize_per_token(x, 8, symmetric=symmetric)
    assert q.dtype == np.int8 and scale.shape == (2, 5, 1)
    assert (zero is None) == symmetric and (symmetric or zero.shape == (2, 5, 1))
    ref_q, ref_scale, _ = _ref_quant(x, x.min(-1, keepdims=True), x.max(-1, keepdims=True), 8,
                                     symmetric)
    np.testing.assert_allclose(np.asarray(scale), ref_scale, rtol=1e-6)
    assert (np.asarray(q) != ref_q).mean() < 1e-3
    err = np.abs(np.asarray(dequantize(q, scale, zero)) - x)
    assert np.all(err <= np.asarray(scale) / 2 * (1 + 1e-5) + 1e-7)


def test_per_tensor_static_scale():
    x = np.array([-3.0, -0.26, 0.0, 0.24, 0.5, 9.0], np.float32)
    np.testing.assert_array_equal(np.asarray(quantize_per_tensor(x, 0.5, None, 4)),
                                  [-6, -1, 0, 0, 1, 7])
    np.testing.assert_array_equal(np.asarray(quantize_per_tensor(x, 0.5, np.int32(-3), 4)),
                                  [-8, -4, -3, -3, -2, 7])
    with pytest.raises(ValueError, match="scale"):
        quantize_per_tensor(x, np.ones(2), None, 8)


def test_quantize_weight_under_jit_matches_eager():
    w = _weights(seed=6)
    fn = jax.jit(lambda w: quantize_weight(w, 4, symmetric=False, group_size=16))
    for a, b in zip(fn(w), quantize_weight(w, 4, symmetric=False, group_size=16)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pack_unpack_all_16_codes_exact():
    codes = np.arange(-8, 8, dtype=np.int8).reshape(16, 1)
    packed = np.asarray(pack_int4(codes))
    assert packed.dtype == np.uint8 and packed.shape == (8, 1)
    # reference: low nibble = even row, high nibble = odd row, two's complement nibbles
    nib = codes[:, 0].astype(np.int64) % 16
    np.testing.assert_array_equal(packed[:, 0], nib[0::2] + 16 * nib[1::2])
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed, 16)), codes)
    assert int(pack_int4(np.array([[-1], [2]], np.int8))[0, 0]) == 0x2F


def test_pack_unpack_odd_k_and_stacked():
    rng = np.random.default_rng(7)
    codes = rng.integers(-8, 8, size=(7, 5)).astype(np.int8)
    packed = pack_int4(codes)
    assert packed.shape == (4, 5)
    np.testing.assert_array_equal(np.asarray(packed[3]) >> 4, 0)  # padded row is zero
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed, 7)), codes)
    stacked = rng.integers(-8, 8, size=(3, 9, 4)).astype(np.int8)
    np.testing.assert_array_equal(np.asarray(unpack_int4(pack_int4(stacked), 9)), stacked)
    with pytest.raises(ValueError, match="k"):
        unpack_int4(packed, 5)
    with pytest.raises(ValueError, match="packed"):
        unpack_int4(np.zeros((4, 5), np.int8), 7)
