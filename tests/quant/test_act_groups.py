"""Group-wise dynamic activation scales (``Recipe.a_group_size``): every backend against a
float64 numpy simulation (one scale and zero point per token and group of channels), one group
of K channels against per-token scales, storage and checks, and the bad inputs."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import trdq_jax.quant as Q
from trdq_jax.config import ConfigError
from trdq_jax.quant import verify
from trdq_jax.quant.fit import quantize_layer
from tests.quant.test_fit import _stats
from tests.quant.test_qconv import _conv_stats
from tests.test_quant_cli import TINY

RNG = np.random.default_rng(64)
K, N = 64, 24


def _rows():
    rows = RNG.normal(size=(8, 16, K)).astype(np.float32)
    rows[:, :, 5] *= 12.0  # an outlier channel: its group's scale differs from the others'
    return rows


def _numpy_reference(q, x):
    """float64: asymmetric (or symmetric) per-token-and-group codes with the layer's clip
    ratio, dequantized, times the dequantized weight, plus the branch and the bias."""
    b, g = q.a_bits, q.a_group_size
    clip = float(np.asarray(q.a_clip)[0])
    xg = np.asarray(x, np.float64).reshape(x.shape[0], -1, g)
    lo = np.minimum(xg.min(-1, keepdims=True) * clip, 0)
    hi = np.maximum(xg.max(-1, keepdims=True) * clip, 0)
    if q.a_symmetric:
        scale = np.maximum(np.maximum(-lo, hi), 1e-8) / (2 ** (b - 1) - 1)
        zero = 0.0
    else:
        scale = np.maximum(hi - lo, 1e-8) / (2 ** b - 1)
        zero = np.clip(np.round(-2 ** (b - 1) - lo / scale), -2 ** (b - 1), 2 ** (b - 1) - 1)
    codes = np.clip(np.round(xg / scale) + zero, -2 ** (b - 1), 2 ** (b - 1) - 1)
    xq = ((codes - zero) * scale).reshape(x.shape)
    w_codes = verify.weight_codes(q)[0].astype(np.float64)
    w_scale = np.asarray(q.w_scale[0], np.float64)
    w = w_codes * (np.repeat(w_scale, q.w_group_size, axis=0) if q.w_group_size else w_scale)
    y = xq @ w
    if q.lr_down is not None:
        down = np.asarray(q.lr_down[0].astype(jnp.float32), np.float64)
        y = y + np.asarray(x, np.float64) @ down @ np.asarray(q.lr_up[0].astype(jnp.float32),
                                                              np.float64)
    return y + np.asarray(q.bias)


@pytest.mark.parametrize("a_bits, a_symmetric, w_group, low_rank", [
    (4, False, 0, 0), (4, True, 0, 0), (8, False, 16, 0), (4, False, 16, 4)])
def test_grouped_activations_agree_with_numpy_on_every_backend(a_bits, a_symmetric, w_group,
                                                               low_rank):
    rows = _rows()
    kernel = RNG.standard_t(3, size=(K, N)).astype(np.float32)
    recipe = Q.get_recipe("trdq", 4, a_bits, num_segments=1, segment_split="uniform",
                          rotation="none", a_symmetric=a_symmetric, a_group_size=16,
                          w_group_size=w_group, low_rank=low_rank)
    q = quantize_layer(kernel, RNG.normal(size=N).astype(np.float32), _stats(rows, K),
                       np.zeros(8, np.int32), 1, recipe)
    assert q.a_group_size == 16 and q.w_group_size == w_group
    verify.check_qlinear(q, "layer", 1)
    x = rows.reshape(-1, K)
    want = _numpy_reference(q, x)
    scale = np.abs(want).max()
    for backend in ("fake", "xla", "pallas"):
        got = np.asarray(Q.qlinear_apply(q, jnp.asarray(x), 0, backend), np.float64)
        # a rare code may round the other way in float32: compare almost every entry tightly
        close = np.abs(got - want) < 1e-4 * scale
        assert close.mean() > 0.99, backend
        np.testing.assert_allclose(got, want, atol=0.05 * scale)


def test_an_odd_group_of_packed_weights_runs_xla_on_pallas():
    """Packed int4 codes hold two rows per byte: the kernel cannot take a group of 3 rows, so
    the pallas backend runs xla's per-group dots for that layer (same numbers)."""
    rows = _rows()[..., :48]  # K = 48 = 16 groups of 3
    kernel = RNG.normal(size=(48, N)).astype(np.float32)
    q = quantize_layer(kernel, None, _stats(rows, 48), np.zeros(8, np.int32), 1,
                       Q.get_recipe("quarot", 4, 4, a_group_size=3, w_group_size=3))
    assert q.packed and q.a_group_size == 3
    x = jnp.asarray(rows.reshape(-1, 48))
    np.testing.assert_array_equal(np.asarray(Q.qlinear_apply(q, x, 0, "pallas")),
                                  np.asarray(Q.qlinear_apply(q, x, 0, "xla")))


def test_one_group_of_k_channels_is_per_token():
    rows = _rows()
    kernel = RNG.normal(size=(K, N)).astype(np.float32)
    x = jnp.asarray(rows.reshape(-1, K))
    base = Q.get_recipe("quarot", 4, 4)
    per_token = quantize_layer(kernel, None, _stats(rows, K), np.zeros(8, np.int32), 1, base)
    one_group = quantize_layer(kernel, None, _stats(rows, K), np.zeros(8, np.int32), 1,
                               dataclasses.replace(base, a_group_size=K))
    for backend in ("fake", "xla"):
        np.testing.assert_allclose(np.asarray(Q.qlinear_apply(one_group, x, 0, backend)),
                                   np.asarray(Q.qlinear_apply(per_token, x, 0, backend)),
                                   rtol=1e-5, atol=1e-5)


def test_groups_lower_the_activation_error_and_store_nothing():
    rows = _rows()
    kernel = RNG.normal(size=(K, N)).astype(np.float32)
    x = rows.reshape(-1, K)
    errors, sizes = {}, {}
    for group in (0, 32, 16):
        q = quantize_layer(kernel, None, _stats(rows, K), np.zeros(8, np.int32), 1,
                           Q.get_recipe("minmax", 8, 4, a_mode="dynamic", a_group_size=group))
        y = np.asarray(Q.qlinear_apply(q, jnp.asarray(x), 0, "xla"))
        errors[group] = float(np.mean((y - x @ kernel) ** 2))
        sizes[group] = Q.qlinear_bytes(q)
    assert errors[16] < errors[32] < 0.6 * errors[0]
    assert sizes[16] == sizes[32] == sizes[0]  # scales are computed at run time


def test_convolutions_keep_per_token_scales():
    x = RNG.normal(size=(4, 2, 6, 6, 8)).astype(np.float32)
    kernel = RNG.normal(size=(3, 3, 8, 6)).astype(np.float32)
    q = quantize_layer(kernel, None, _conv_stats(x, (3, 3), (1, 1), ((1, 1), (1, 1))),
                       np.zeros(4, np.int32), 1, Q.get_recipe("quarot", 4, 4, a_group_size=4))
    assert q.a_group_size == 0


def test_bad_activation_groups_are_one_line_errors():
    for value in (-1, 1, 2.0, True):
        with pytest.raises(ConfigError, match=r"^Recipe.a_group_size: expected 0 \(per token\) "
                                              r"or an int >= 2"):
            Q.Recipe("r", a_group_size=value)
    for fields in ({"a_mode": "static"}, {"fp8": True}):
        with pytest.raises(ConfigError, match=r"^Recipe.a_group_size: group-wise activation "
                                              r"scales need dynamic integer activations"):
            Q.Recipe("r", a_group_size=64, **fields)
    with pytest.raises(ConfigError, match=r"^Recipe.a_group_size: must equal w_group_size when "
                                          r"both are set \(one integer dot per group\), got 32 "
                                          r"and 64"):
        Q.Recipe("r", a_group_size=32, w_group_size=64)
    rows = RNG.normal(size=(4, 8, 48)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^Recipe.a_group_size: 32 does not divide K = 48 of "
                                         r"layer blocks_0/x \(kernel \[48, 8\]\)"):
        quantize_layer(RNG.normal(size=(48, 8)).astype(np.float32), None, _stats(rows, 48),
                       np.zeros(4, np.int32), 1, Q.get_recipe("quarot", 4, 4, a_group_size=32),
                       path="blocks_0/x")


def test_checkpoint_round_trip_and_edited_group_sizes(tmp_path, tiny_calibrated):
    from tests.quant.test_groups import round_trip
    recipe = Q.get_recipe("quarot", 4, 4, a_group_size=16)
    qparams, restored, calib = round_trip(tmp_path, tiny_calibrated, recipe)
    layers = restored["layers"]["blocks_0"]
    qkv = layers["attn"]["qkv"]
    assert qkv.a_group_size == 16 and layers["adaLN_modulation_1"].a_group_size == 0
    x = jnp.asarray(RNG.normal(size=(5, qkv.in_features)), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(Q.qlinear_apply(qkv, x, 0, "xla")),
        np.asarray(Q.qlinear_apply(qparams["layers"]["blocks_0"]["attn"]["qkv"], x, 0, "xla")))
    with pytest.raises(verify.QuantizedModelError, match=r"qkv.a_group_size: expected 0, or a "
                       r"divisor of K = 48 for a Dense with dynamic integer activations"):
        verify.check_qlinear(qkv.replace(a_group_size=5), "qkv", 1)
    with pytest.raises(verify.QuantizedModelError, match=r"layer blocks_0/\w+/\w+.a_group_size "
                       r"is 16, the recipe says 0"):
        verify.check_quantized(qparams, dataclasses.replace(recipe, a_group_size=0),
                               calib.segment_of_step, TINY, "q", calib.weight_only)
