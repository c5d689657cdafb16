"""The float low-rank branch (``Recipe.low_rank``) against independent references: the
weighted rank-r fit against the closed-form Eckart-Young error (whitening by the symmetric
square root, not the Cholesky factor the code uses), the finished layer against a numpy
simulation of ``Q(x̃) deq(R_q) + x̃ L1 L2``, quantization off against the float layer (Dense and
conv, one or one branch per segment), the three backends against each other, and every bad
input and edited checkpoint against its one-line error."""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trdq_jax.quant as Q
from trdq_jax import checkpoint
from trdq_jax.config import ConfigError
from trdq_jax.quant import lowrank, qconv, verify
from trdq_jax.quant.fit import layer_error, quantize_layer
from tests.quant.test_fit import _stats, numpy_layer
from tests.quant.test_qconv import _conv_stats
from tests.test_integrity import _edit
from tests.test_quant_cli import TINY

RNG = np.random.default_rng(11)
K, N, STEPS = 64, 48, 8
TABLE = np.repeat(np.arange(2), STEPS // 2).astype(np.int32)


def _rows(seed=0):
    """Calibration rows ``[steps, 24, K]``: an outlier channel, the second segment 3x wider."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(STEPS, 24, K)).astype(np.float32)
    rows[:, :, 3] *= 10.0
    rows[STEPS // 2:] *= 3.0
    return rows


def _kernel(seed=1):
    """A kernel with a strong rank-4 part over a full-rank one (as trained layers have)."""
    rng = np.random.default_rng(seed)
    return (0.1 * rng.normal(size=(K, N)) + rng.normal(size=(K, 4)) @ rng.normal(size=(4, N))
            ).astype(np.float32)


def _recipe(w_bits, a_bits, **fields):
    return Q.get_recipe("trdq", w_bits, a_bits, num_segments=2, segment_split="uniform",
                        **fields)


def test_weighted_fit_reaches_the_eckart_young_error():
    x = _rows().reshape(-1, K).astype(np.float64)
    gram = x.T @ x
    error = RNG.normal(size=(K, N))
    c = lowrank._cholesky_upper(gram)
    h = c.T @ c  # the damped Gram
    vals, vecs = np.linalg.eigh(h)
    root = vecs @ np.diag(np.sqrt(vals)) @ vecs.T  # symmetric square root: another whitening
    for rank in (1, 8, 20):
        tail = np.linalg.svd(root @ error, compute_uv=False)[rank:]
        down, up = lowrank.weighted_fit(error, c, rank)
        got = lowrank.output_error(error - down.astype(np.float64) @ up, c)
        assert got == pytest.approx(float(np.sum(tail ** 2)), rel=2e-2)  # bf16 factors
        plain_down, plain_up = lowrank.top_singular(error, rank)
        assert got <= lowrank.output_error(error - plain_down.astype(np.float64) @ plain_up, c)


def test_top_singular_is_the_best_plain_approximation():
    w = _kernel()
    down, up = lowrank.top_singular(w, 4)
    tail = np.linalg.svd(w.astype(np.float64), compute_uv=False)[4:]
    assert np.sum((w - down.astype(np.float64) @ up) ** 2) == pytest.approx(
        float(np.sum(tail ** 2)), rel=2e-2)
    assert np.array_equal(down, down.astype(lowrank.BRANCH_DTYPE).astype(np.float32))


@pytest.mark.parametrize("per_segment", [False, True])
def test_quantization_off_reproduces_the_float_layer(per_segment):
    rows, kernel = _rows(), _kernel()
    bias = RNG.normal(size=N).astype(np.float32)
    q = quantize_layer(kernel, bias, _stats(rows, K), TABLE, 2,
                       _recipe(16, 16, low_rank=8, low_rank_per_segment=per_segment))
    assert q.rank == 8 and q.lr_down.dtype == jnp.bfloat16
    x = rows.reshape(-1, K)
    want = x.astype(np.float64) @ kernel + bias
    for segment in range(2):
        for backend in ("fake", "xla", "pallas"):
            got = np.asarray(Q.qlinear_apply(q, jnp.asarray(x), segment, backend))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


def test_quantization_off_reproduces_the_float_conv():
    x = RNG.normal(size=(4, 2, 6, 6, 8)).astype(np.float32)
    kernel = RNG.normal(size=(3, 3, 8, 6)).astype(np.float32)
    strides, pads = (1, 1), ((1, 1), (1, 1))
    recipe = Q.Recipe("off", w_bits=16, a_bits=16, rotation="hadamard", low_rank=4)
    q = quantize_layer(kernel, None, _conv_stats(x, (3, 3), strides, pads),
                       np.zeros(4, np.int32), 1, recipe)
    assert q.lr_down.shape == (1, 72, 4)
    want = jax.lax.conv_general_dilated(jnp.asarray(x[0]), jnp.asarray(kernel), strides, pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision="highest")
    got = qconv.qconv_apply(q, jnp.asarray(x[0]), 0, "xla", strides=strides, padding=pads)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def _numpy_with_branch(q, x, segment):
    """numpy: the layer without its branch (``test_fit.numpy_layer``) plus ``x̃ L1 L2`` on the
    float transformed activation."""
    plain = numpy_layer(dataclasses.replace(q, lr_down=None, lr_up=None), x, segment)
    xt = np.asarray(x, np.float64)
    k = xt.shape[-1]
    from trdq_jax.quant import hadamard
    xt = xt @ (np.diag(np.asarray(q.signs, np.float64)) @ hadamard.hadamard_matrix(k) / np.sqrt(k))
    pick = 0 if q.lr_down.shape[0] == 1 else segment
    down = np.asarray(q.lr_down[pick].astype(jnp.float32), np.float64)
    up = np.asarray(q.lr_up[pick].astype(jnp.float32), np.float64)
    return plain + xt @ down @ up


@pytest.mark.parametrize("w_bits, a_bits, a_mode, per_segment", [
    (4, 4, "dynamic", False), (4, 8, "static", False), (8, 8, "dynamic", True),
    (4, 4, "static", True)])
def test_branch_matches_numpy_and_backends_agree(w_bits, a_bits, a_mode, per_segment):
    rows, kernel = _rows(), _kernel()
    recipe = _recipe(w_bits, a_bits, a_mode=a_mode, low_rank=8, low_rank_per_segment=per_segment)
    q = quantize_layer(kernel, None, _stats(rows, K), TABLE, 2, recipe)
    assert q.lr_down.shape == ((2 if per_segment else 1), K, 8)
    for segment in range(2):
        x = rows[TABLE == segment].reshape(-1, K)
        want = _numpy_with_branch(q, x, segment)
        scale = np.abs(want).max()
        for backend in ("fake", "xla", "pallas"):
            got = np.asarray(Q.qlinear_apply(q, jnp.asarray(x), segment, backend))
            # a per-token scale may round one code differently in float32: a few codes' worth
            assert np.mean(np.abs(got - want) < 1e-4 * scale) > 0.99, backend
            np.testing.assert_allclose(got, want, atol=2e-2 * scale)


def test_branch_lowers_the_error_of_a_low_rank_heavy_layer():
    rows, kernel = _rows(), _kernel()
    stats = _stats(rows, K)
    errors = {}
    for rank in (0, 4, 16):
        q = quantize_layer(kernel, None, stats, TABLE, 2, _recipe(4, 4, low_rank=rank))
        errors[rank] = sum(layer_error(q, rows[TABLE == s].reshape(-1, K),
                                       rows[TABLE == s].reshape(-1, K) @ kernel, s)
                           for s in range(2))
    assert errors[4] < 0.5 * errors[0] and errors[16] < errors[4], errors


def test_rank_zero_is_bit_identical_to_the_code_before_the_branch(tiny_calibrated):
    """The quantized layers of four recipes at ``low_rank = 0``, leaf for leaf, against those
    written by 5a70a0b (the commit before the low-rank branch; the fixture's own script says
    how): the same codes bit for bit, and the same scales, rotations, clipping ratios and
    float remainder to a few float32 ulps (the fixture was written on another CPU, whose
    vector units sum in another order: measured on an AMD EPYC, at most 4e-7 relative)."""
    from tests.quant.fixtures.make_quantized_before_low_rank import RECIPES
    stored = np.load(pathlib.Path(__file__).parent / "fixtures"
                     / "quantized_before_low_rank.npz")
    _, params, calibrate_for = tiny_calibrated
    for label, (name, w_bits, a_bits) in RECIPES.items():
        recipe = Q.get_recipe(name, w_bits, a_bits)
        assert recipe.low_rank == 0
        qparams = Q.quantize(params, calibrate_for(recipe), recipe)
        now = {f"{label}|{jax.tree_util.keystr(path)}": np.asarray(leaf)
               for path, leaf in jax.tree_util.tree_flatten_with_path(qparams)[0]}
        before = {k for k in stored.files if k.startswith(f"{label}|")}
        assert set(now) == before, label  # no new leaf (no branch) and none lost
        for key in sorted(before):
            assert now[key].dtype == stored[key].dtype, key
            if np.issubdtype(stored[key].dtype, np.floating):
                np.testing.assert_allclose(now[key], stored[key], rtol=1e-6, atol=0,
                                           err_msg=key)
            else:
                np.testing.assert_array_equal(now[key], stored[key], err_msg=key)


def test_bad_ranks_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"Recipe.low_rank: expected an int >= 0"):
        _recipe(4, 4, low_rank=-1)
    with pytest.raises(ConfigError, match=r"Recipe.low_rank_per_segment: needs low_rank > 0"):
        _recipe(4, 4, low_rank_per_segment=True)
    with pytest.raises(ConfigError, match=r"low_rank_per_segment: needs .*num_segments > 1"):
        Q.get_recipe("trdq", 4, 4, num_segments=1, low_rank=4, low_rank_per_segment=True)
    with pytest.raises(ValueError, match=r"^Recipe.low_rank: rank 49 exceeds min\(K, N\) = 48 of "
                       r"layer blocks_0/x \(kernel \[64, 48\]\)") as e:
        quantize_layer(_kernel(), None, _stats(_rows(), K), TABLE, 2, _recipe(4, 4, low_rank=49),
                       path="blocks_0/x")
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def tiny_lowrank(tiny_calibrated):
    _, params, calibrate_for = tiny_calibrated
    recipe = Q.get_recipe("quarot", 4, 4, num_segments=2, low_rank=4)
    calib = calibrate_for(recipe)
    return recipe, calib, Q.quantize(params, calib, recipe)


def test_checkpoint_round_trip_and_edited_rank(tiny_lowrank, tmp_path):
    recipe, calib, qparams = tiny_lowrank
    path = Q.save_quantized(tmp_path / "q", qparams, TINY, recipe, calib.segment_of_step)
    restored, _, recipe2, _ = Q.load_quantized(path)
    assert recipe2 == recipe
    q, want = (t["layers"]["blocks_0"]["attn"]["qkv"] for t in (restored, qparams))
    assert q.lr_down.dtype == jnp.bfloat16 and q.rank == 4
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(qparams)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # weight-only layers (adaLN) carry no branch
    assert restored["layers"]["blocks_0"]["adaLN_modulation_1"].lr_down is None
    _edit(path, lambda m: m["extra"]["recipe"].update(low_rank=2))
    with pytest.raises(checkpoint.CheckpointError, match="edited .*low_rank"):
        Q.load_quantized(path)


def test_a_branch_of_another_rank_is_refused(tiny_lowrank):
    recipe, calib, qparams = tiny_lowrank
    layers = jax.tree.map(lambda x: x, qparams["layers"],
                          is_leaf=lambda x: isinstance(x, Q.QLinear))
    qkv = layers["blocks_0"]["attn"]["qkv"]
    layers["blocks_0"]["attn"]["qkv"] = qkv.replace(lr_down=qkv.lr_down[..., :2],
                                                    lr_up=qkv.lr_up[:, :2])
    edited = {"float": qparams["float"], "layers": layers}
    with pytest.raises(verify.QuantizedModelError,
                       match=r"layer blocks_0/attn/qkv has a low-rank branch of rank 2, the "
                             r"recipe says low_rank=4"):
        verify.check_quantized(edited, recipe, calib.segment_of_step, TINY, "q",
                               calib.weight_only)
    layers["blocks_0"]["attn"]["qkv"] = qkv.replace(lr_up=None)
    with pytest.raises(verify.QuantizedModelError, match=r"qkv.lr_up: a low-rank branch needs "
                       "both"):
        verify.check_quantized(edited, recipe, calib.segment_of_step, TINY, "q",
                               calib.weight_only)
