"""Group-wise weight scales (``Recipe.w_group_size``): GPTQ with static groups against a float64
numpy loop, one group of K rows against the per-channel fit, the grouped integer dot against a
numpy simulation and the other backends, storage and checks, and the bad inputs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trdq_jax.quant as Q
from trdq_jax.config import ConfigError
from trdq_jax.quant import gptq, verify
from trdq_jax.quant.fit import quantize_layer
from tests.quant.test_fit import _correlated_rows, _stats
from tests.quant.test_qconv import _conv_stats
from tests.test_quant_cli import TINY

RNG = np.random.default_rng(21)


def numpy_group_gptq(w, h, group, bits):
    """Textbook GPTQ in float64 with static groups: each group's scale from the original
    weight, then channel by channel rounding with the error spread by the inverse Hessian."""
    w = np.array(w, np.float64)
    k, n = w.shape
    qmax = 2 ** (bits - 1) - 1
    scale = np.maximum(np.abs(w.reshape(k // group, group, n)).max(1), 1e-8) / qmax  # [G, N]
    rows = np.repeat(scale, group, axis=0)
    h = np.array(h, np.float64) + (0.01 * np.mean(np.diag(h)) + 1e-8) * np.eye(k)
    hinv = np.linalg.inv(h)
    codes = np.zeros_like(w)
    for i in range(k):
        codes[i] = np.clip(np.round(w[i] / rows[i]), -qmax, qmax)
        err = (w[i] - codes[i] * rows[i]) / hinv[i, i]
        w[i + 1:] -= np.outer(hinv[i, i + 1:], err)
        hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return codes.astype(np.int8), scale


def test_group_gptq_matches_the_numpy_loop():
    k, n, group = 64, 10, 16
    x = _correlated_rows(300, k, seed=2)
    w = RNG.standard_t(3, size=(k, n)).astype(np.float32)
    h = (x.T @ x).astype(np.float32)
    codes, scales = gptq.fit_weight(jnp.asarray(w), jnp.asarray(h), 4, (1.0,), True, False, group)
    want_codes, want_scales = numpy_group_gptq(w, h, group, 4)
    np.testing.assert_allclose(np.asarray(scales), want_scales, rtol=1e-6)
    assert np.mean(np.asarray(codes) == want_codes) > 0.99  # float32 vs float64 ties


@pytest.mark.parametrize("use_gptq", [False, True])
def test_one_group_of_k_rows_is_the_per_channel_fit(use_gptq):
    k, n = 48, 8
    x = _correlated_rows(200, k, seed=4)
    w = RNG.normal(size=(k, n)).astype(np.float32)
    h = jnp.asarray(x.T @ x)
    grid = (1.0, 0.9, 0.8)
    c0, s0 = gptq.fit_weight(jnp.asarray(w), h, 4, grid, use_gptq, False, 0)
    c1, s1 = gptq.fit_weight(jnp.asarray(w), h, 4, grid, use_gptq, False, k)
    np.testing.assert_array_equal(np.asarray(c0), np.asarray(c1))
    np.testing.assert_array_equal(np.asarray(s0), np.asarray(s1)[0])


def _numpy_grouped(q, x):
    """float64: dynamic per-token asymmetric activation codes (clip ratio from the layer),
    dequantized, times the codes with their groups' scales."""
    b = q.a_bits
    clip = float(np.asarray(q.a_clip)[0])
    x = np.asarray(x, np.float64)
    lo = np.minimum(x.min(-1, keepdims=True) * clip, 0)
    hi = np.maximum(x.max(-1, keepdims=True) * clip, 0)
    scale = np.maximum(hi - lo, 1e-8) / (2 ** b - 1)
    zero = np.clip(np.round(-2 ** (b - 1) - lo / scale), -2 ** (b - 1), 2 ** (b - 1) - 1)
    xq = (np.clip(np.round(x / scale) + zero, -2 ** (b - 1), 2 ** (b - 1) - 1) - zero) * scale
    codes = verify.weight_codes(q)[0].astype(np.float64)
    w = codes * np.repeat(np.asarray(q.w_scale[0], np.float64), q.w_group_size, axis=0)
    return xq @ w + (0 if q.bias is None else np.asarray(q.bias))


@pytest.mark.parametrize("w_bits, a_mode, a_symmetric", [
    (4, "dynamic", False), (4, "static", False), (8, "static", True), (3, "dynamic", True)])
def test_grouped_layers_agree_on_every_backend(w_bits, a_mode, a_symmetric):
    k, n, group = 64, 24, 16
    rows = RNG.normal(size=(8, 16, k)).astype(np.float32)
    rows[:, :, 5] *= 10.0
    kernel = RNG.standard_t(3, size=(k, n)).astype(np.float32)
    recipe = Q.get_recipe("trdq", w_bits, 4, num_segments=1, segment_split="uniform",
                          a_mode=a_mode, a_symmetric=a_symmetric, rotation="none",
                          w_group_size=group)
    q = quantize_layer(kernel, RNG.normal(size=n).astype(np.float32), _stats(rows, k),
                       np.zeros(8, np.int32), 1, recipe)
    assert q.w_scale.shape == (1, k // group, n) and q.w_colsum.shape == (1, k // group, n)
    verify.check_qlinear(q, "layer", 1)
    x = rows.reshape(-1, k)
    fake = np.asarray(Q.qlinear_apply(q, jnp.asarray(x), 0, "fake"))
    for backend in ("xla", "pallas"):
        got = np.asarray(Q.qlinear_apply(q, jnp.asarray(x), 0, backend))
        np.testing.assert_allclose(got, fake, rtol=1e-5, atol=1e-5 * np.abs(fake).max())
    if a_mode == "dynamic" and not a_symmetric:
        want = _numpy_grouped(q, x)
        assert np.mean(np.abs(fake - want) < 1e-4 * np.abs(want).max()) > 0.99


def test_groups_lower_the_error_and_cost_their_scales():
    k, n = 128, 32
    rows = RNG.normal(size=(8, 16, k)).astype(np.float32)
    kernel = RNG.standard_t(3, size=(k, n)).astype(np.float32)
    x = rows.reshape(-1, k)
    errors, sizes = {}, {}
    for group in (0, 64, 32):
        q = quantize_layer(kernel, None, _stats(rows, k), np.zeros(8, np.int32), 1,
                           Q.get_recipe("minmax", 4, 8, w_group_size=group))
        y = np.asarray(Q.qlinear_apply(q, jnp.asarray(x), 0, "xla"))
        errors[group] = float(np.mean((y - x @ kernel) ** 2))
        sizes[group] = Q.qlinear_bytes(q)
    assert errors[32] < errors[64] < errors[0]
    # int4 codes k * n / 2 bytes; a float32 scale and an int32 column sum per group and column
    assert sizes[32] - sizes[0] == (k // 32 - 1) * n * 8


def test_convolutions_keep_per_channel_scales():
    x = RNG.normal(size=(4, 2, 6, 6, 8)).astype(np.float32)
    kernel = RNG.normal(size=(3, 3, 8, 6)).astype(np.float32)
    q = quantize_layer(kernel, None, _conv_stats(x, (3, 3), (1, 1), ((1, 1), (1, 1))),
                       np.zeros(4, np.int32), 1, Q.get_recipe("minmax", 4, 8, w_group_size=8))
    assert q.w_group_size == 0 and q.w_scale.shape == (1, 6)


def test_bad_groups_are_one_line_errors():
    for value in (-1, 1, 1.5, True):
        with pytest.raises(ConfigError, match=r"^Recipe.w_group_size: expected 0 \(per output "
                                              r"channel\) or an int >= 2"):
            Q.Recipe("r", w_group_size=value)
    with pytest.raises(ConfigError, match=r"^Recipe.w_group_size: group-wise scales are not "
                                          r"implemented for fp8"):
        Q.Recipe("r", fp8=True, w_group_size=64)
    rows = RNG.normal(size=(4, 8, 48)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^Recipe.w_group_size: 64 does not divide K = 48 of "
                                         r"layer blocks_0/x \(kernel \[48, 8\]\)"):
        quantize_layer(RNG.normal(size=(48, 8)).astype(np.float32), None, _stats(rows, 48),
                       np.zeros(4, np.int32), 1, Q.get_recipe("minmax", 4, 8, w_group_size=64),
                       path="blocks_0/x")


def round_trip(tmp_path, tiny_calibrated, recipe):
    """``(qparams, restored, calib)``: ``recipe`` quantized on the tiny model, saved and loaded
    back; the recipe and every leaf come back equal."""
    _, params, calibrate_for = tiny_calibrated
    calib = calibrate_for(recipe)
    qparams = Q.quantize(params, calib, recipe)
    path = Q.save_quantized(tmp_path / "q", qparams, TINY, recipe, calib.segment_of_step)
    restored, _, recipe2, _ = Q.load_quantized(path)
    assert recipe2 == recipe
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(qparams), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return qparams, restored, calib


def test_grouped_checkpoint_round_trip_and_checks(tmp_path, tiny_calibrated):
    recipe = Q.get_recipe("quarot", 4, 8, num_segments=2, w_group_size=16)
    qparams, restored, calib = round_trip(tmp_path, tiny_calibrated, recipe)
    layers = restored["layers"]["blocks_0"]
    assert layers["attn"]["qkv"].w_group_size == 16
    assert layers["adaLN_modulation_1"].w_group_size == 0  # weight-only: per channel
    qkv = layers["attn"]["qkv"]
    with pytest.raises(verify.QuantizedModelError, match=r"qkv.w_colsum: does not equal the "
                       r"column sums of the stored codes \(per group of 16 rows\)"):
        verify.check_qlinear(qkv.replace(w_colsum=qkv.w_colsum.at[0, 1, 0].add(1)), "qkv", 2)
    with pytest.raises(verify.QuantizedModelError, match=r"qkv.w_group_size: expected 0, or a "
                       r"divisor of K = 48"):
        verify.check_qlinear(qkv.replace(w_group_size=5), "qkv", 2)
    with pytest.raises(verify.QuantizedModelError, match=r"layer blocks_0/\w+/\w+.w_group_size "
                       r"is 16, the recipe says 0"):
        verify.check_quantized(qparams, dataclasses.replace(recipe, w_group_size=0),
                               calib.segment_of_step, TINY, "q", calib.weight_only)
