"""Bounded calibration storage (calibration format 3): a Gram matrix of every sampled row per
layer and a few kept rows per step instead of every sampled row.

What is exact: the stored Gram is ``XᵀX`` of every row ``collect_stats`` samples, so a shared
weight's GPTQ and weight clipping equal those fitted on all those rows, and the transformed Gram
``Mᵀ G M`` equals the Gram of the transformed rows for smoothing and rotations. What is not:
per-segment weights take their Gram from the kept rows, and the activation searches see only
the kept rows. Sizes do not grow with the number of calibration samples; an edited Gram is
refused naming the field; a format-2 directory asks to calibrate again."""
import dataclasses
import json

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import trdq_jax.quant as Q
from trdq_jax.manifest import tree_digest
from trdq_jax.models import build_model
from trdq_jax.quant import capture, fit, quantizers
from trdq_jax.quant.calib_io import CalibrationError, load_calibration, save_calibration
from trdq_jax.quant.pipeline import run_calibration
from trdq_jax.sampling import Sampler, conditioning
from tests.test_quant_cli import TINY, tiny_params
from tests.test_values import _forge, _set

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

NULL = TINY.model.num_classes
LAYER = "blocks_0/attn/qkv"


@pytest.fixture(scope="module")
def tiny():
    model, params = build_model(TINY.model), tiny_params()
    sampler = Sampler.from_config(TINY.sampler)
    labels = np.arange(4) % NULL
    traj = capture.calibration_trajectory(model, params, sampler, labels, NULL,
                                          (len(labels), 8, 8, 1), seed=0, cfg_scale=2.0)
    return model, params, traj


def _sampled_rows(model, params, traj, path, rows_per_step, seed=0):
    """float32 ``[steps, R, K]``: every row ``collect_stats`` samples for ``path`` (the same
    jitted step, key and paths), which its Gram sums and of which it keeps a few."""
    xs, ts, cond, null = capture._check_trajectory(traj.xs, traj.timesteps, traj.cond, NULL)
    y = conditioning.with_null(cond, null)
    out = []
    for step in range(len(xs)):
        stats = capture._step_statistics(
            model, params, xs[step], jnp.asarray(ts[step], jnp.float32), y,
            jnp.asarray(step, jnp.int32), jnp.asarray(seed, jnp.uint32), paths=(path,),
            classes=(nn.Dense,), num_rows=rows_per_step)
        out.append(np.asarray(stats[path]["rows"], np.float32))
    return np.stack(out)


def _packed_index(k, i, j):
    """Position of entry ``[i, j]`` (i <= j) in a packed ``[k, k]`` upper triangle."""
    return i * k - i * (i - 1) // 2 + (j - i)


def test_pack_unpack_round_trip():
    g = np.random.default_rng(0).normal(size=(7, 7)).astype(np.float32)
    g = g + g.T
    packed = capture.pack_gram(g)
    assert packed.shape == (28,) and capture.gram_width(28) == 7 and capture.gram_width(27) == -1
    np.testing.assert_array_equal(capture.unpack_gram(packed), g)
    assert packed[_packed_index(7, 2, 5)] == g[2, 5]


def test_stored_gram_is_every_sampled_row_and_gptq_from_it_is_exact(tiny):
    """The stored Gram sums every sampled row (the kept rows are some of them, rounded to
    float16); GPTQ with the weight clipping search fitted from it equals the same fit from
    all those rows up to float32 summation order (near-tie codes one step apart)."""
    model, params, traj = tiny
    stats = capture.collect_stats(model, params, traj.xs, traj.timesteps, traj.cond, NULL,
                                  paths=[LAYER], rows_per_step=32, progress=False)[LAYER]
    x = _sampled_rows(model, params, traj, LAYER, 32)           # [6, 32, 48]
    steps, r, k = x.shape
    assert stats.rows.shape == (steps, capture.KEPT_ROWS_PER_STEP, k)
    assert stats.rows.dtype == np.float16 and stats.gram_rows == steps * r
    np.testing.assert_array_equal(stats.rows, x[:, capture.kept_rows(r, 2)].astype(np.float16))
    flat = x.reshape(-1, k).astype(np.float64)
    np.testing.assert_allclose(capture.unpack_gram(stats.gram), flat.T @ flat, rtol=2e-5,
                               atol=2e-5 * np.abs(flat.T @ flat).max())

    dense = params["blocks_0"]["attn"]["qkv"]
    table = np.zeros(steps, np.int32)
    recipe = Q.get_recipe("quarot", 4, 8)  # GPTQ + clipping search; no row-judged search
    every_row = capture.LayerStats(absmax=stats.absmax, tensor_min=stats.tensor_min,
                                   tensor_max=stats.tensor_max, rows=x,
                                   weight_absmax=stats.weight_absmax)
    got = fit.quantize_layer(dense["kernel"], dense["bias"], stats, table, 1, recipe, LAYER)
    want = fit.quantize_layer(dense["kernel"], dense["bias"], every_row, table, 1, recipe, LAYER)
    np.testing.assert_allclose(np.asarray(got.w_scale), np.asarray(want.w_scale), rtol=1e-6)
    kept_only = dataclasses.replace(every_row, rows=np.asarray(stats.rows, np.float32))
    other = fit.quantize_layer(dense["kernel"], dense["bias"], kept_only, table, 1, recipe,
                               LAYER)
    codes = {name: np.asarray(quantizers.unpack_int4(q.w_q[0], k)).astype(np.int32)
             for name, q in [("got", got), ("want", want), ("other", other)]}
    # The two Grams hold the same sum in another float32 order (the stored one accumulated step
    # by step): a code GPTQ rounds at a near tie may flip by one step on some CPUs, and GPTQ
    # carries the flip along its column (measured on an AMD EPYC: 0.16% of the codes, equal
    # elsewhere); the kept rows alone fit another layer (23% of the codes differ).
    differ = codes["got"] != codes["want"]
    assert differ.mean() < 0.01, differ.mean()
    assert np.abs(codes["got"] - codes["want"]).max() <= 1
    assert np.mean(codes["other"] != codes["want"]) > 5 * max(differ.mean(), 1e-3), \
        "the kept rows alone must fit other codes, or this test shows nothing"


@pytest.mark.parametrize("rotation", ["hadamard", "duquant"])
def test_transformed_gram_is_the_gram_of_the_transformed_rows(rotation):
    """``Mᵀ G M`` (what GPTQ is fitted on) equals ``(XM)ᵀ(XM)``: smoothing is diagonal, the
    rotations (and DuQuant's permutation) orthogonal."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 16, 32)).astype(np.float32) * np.exp(rng.normal(size=32))
    kernel = rng.normal(size=(32, 8)).astype(np.float32)
    stats = capture.LayerStats(absmax=np.abs(x).max(1), tensor_min=x.min((1, 2)),
                               tensor_max=x.max((1, 2)), rows=x,
                               weight_absmax=np.abs(kernel).max(1))
    recipe = Q.Recipe("r", w_bits=4, a_bits=8, smoothing=True, alpha=0.5, rotation=rotation,
                      rotation_block=16)
    q = fit.quantize_layer(kernel, None, stats, np.zeros(4, np.int32), 1, recipe)
    assert not np.allclose(np.asarray(q.smooth), 1.0)
    flat = x.reshape(-1, 32)
    xt = np.asarray(fit.transform_rows(q, flat, 0), np.float64)
    got = np.asarray(fit._transformed_gram(q, jnp.asarray(flat.T @ flat), 0), np.float64)
    np.testing.assert_allclose(got, xt.T @ xt, rtol=1e-4, atol=1e-4 * np.abs(xt.T @ xt).max())


def test_per_segment_weights_take_their_gram_from_the_kept_rows(tiny):
    """Not exact, by design: segments are chosen after capture, so a per-segment weight's Gram
    is that of the segment's kept rows (the stored pooled Gram is not used)."""
    model, params, traj = tiny
    stats = capture.collect_stats(model, params, traj.xs, traj.timesteps, traj.cond, NULL,
                                  paths=[LAYER], rows_per_step=32, progress=False)[LAYER]
    dense = params["blocks_0"]["attn"]["qkv"]
    table = np.repeat(np.arange(2), 3).astype(np.int32)
    recipe = Q.get_recipe("quarot", 4, 8, num_segments=2, per_segment_weights=True)
    got = fit.quantize_layer(dense["kernel"], dense["bias"], stats, table, 2, recipe, LAYER)
    kept = dataclasses.replace(stats, gram=None, gram_rows=0)
    want = fit.quantize_layer(dense["kernel"], dense["bias"], kept, table, 2, recipe, LAYER)
    np.testing.assert_array_equal(np.asarray(got.w_q), np.asarray(want.w_q))


def _layer_bytes(stats) -> dict:
    return {p: {f: np.asarray(getattr(s, f)).nbytes for f in ("rows", "gram", "absmax")}
            for p, s in stats.items()}


def test_sizes_do_not_grow_with_the_samples_or_the_rows_sampled(tiny, tmp_path):
    model, params, traj = tiny
    sizes, files = [], []
    for copies, rows_per_step in ((1, 64), (3, 64), (3, 16)):  # 4 or 12 samples
        xs = np.concatenate([traj.xs] * copies, axis=1)
        stats = capture.collect_stats(model, params, xs, traj.timesteps,
                                      np.tile(traj.cond, copies), NULL,
                                      rows_per_step=rows_per_step, progress=False)
        sizes.append(_layer_bytes(stats))
        for s in stats.values():  # the bound: K'(K'+1)/2 floats + steps x 8 rows per layer
            width = s.rows.shape[2]
            assert s.gram.shape == (width * (width + 1) // 2,)
            assert s.rows.shape[:2] == (6, capture.KEPT_ROWS_PER_STEP)
        calib = Q.Calibration(stats=stats, segment_of_step=np.zeros(6, np.int32), num_segments=1,
                              keep_float={})
        path = save_calibration(tmp_path / f"c{len(files)}", calib, Q.get_recipe("quarot"),
                                TINY, source={"model": "x"}, params_sha256=tree_digest(params),
                                per_class=1, seed=0, rows_per_step=rows_per_step)
        files.append((path / "stats.npz").stat().st_size)
    # 4 samples: 128 token rows per step, 8 for the conditioning layers, both >= the 8 kept
    assert sizes[0] == sizes[1] == sizes[2]
    assert files[0] == files[1] == files[2]


def test_rows_beyond_float16_stay_float32(tiny, monkeypatch):
    model, params, traj = tiny
    monkeypatch.setattr(capture, "_FLOAT16_MAX", 1e-3)  # every layer "beyond" float16 now
    stats = capture.collect_stats(model, params, traj.xs, traj.timesteps, traj.cond, NULL,
                                  paths=[LAYER], rows_per_step=32, progress=False)[LAYER]
    x = _sampled_rows(model, params, traj, LAYER, 32)
    assert stats.rows.dtype == np.float32
    np.testing.assert_array_equal(stats.rows, x[:, capture.kept_rows(32, 2)])


# ----------------------------------------------------------------------------- stored values


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    params = tiny_params()
    recipe = Q.get_recipe("quarot", 4, 8)
    calib = run_calibration(build_model(TINY.model), params, TINY, recipe, per_class=1,
                            rows_per_step=16)
    path = save_calibration(tmp_path_factory.mktemp("storage") / "calibration", calib, recipe,
                            TINY, source={"model": "x"}, params_sha256=tree_digest(params),
                            per_class=1, seed=1000, rows_per_step=16)
    layers = json.loads((path / "metadata.json").read_text())["layers"]
    return path, layers.index(LAYER)


def _stored(path, i):
    with np.load(path / "stats.npz") as data:
        return {k.split(".", 1)[1]: data[k] for k in data.files if k.split(".")[0] == str(i)}


def _edit_entry(i, j, value_of):
    """A packed-Gram edit setting ``G[i, j]`` (and so ``G[j, i]``) to ``value_of(G)``."""
    def edit(packed):
        g = capture.unpack_gram(packed, np.float64)
        packed[_packed_index(g.shape[0], min(i, j), max(i, j))] = value_of(g)
        return packed
    return edit


def _indefinite(packed):
    """Three channels made pairwise correlated +0.9, +0.9, -0.9 (each pair within
    Cauchy-Schwarz, the three together impossible): not positive semi-definite."""
    g = capture.unpack_gram(packed, np.float64)
    d = np.sqrt(np.diag(g))
    k = g.shape[0]
    for (a, b), c in (((0, 1), 0.9), ((0, 2), 0.9), ((1, 2), -0.9)):
        packed[_packed_index(k, a, b)] = c * d[a] * d[b]
    return packed


def _scale_diagonal(j, factor_of):
    def edit(packed):
        k = capture.gram_width(len(packed))
        packed[_packed_index(k, j, j)] *= factor_of(packed, k)
        return packed
    return edit


GRAM_CASES = [  # (id, {field: edit(stored arrays of LAYER)}, message)
    ("nan", lambda s: {"gram": _set(5, np.nan)}, r"gram: 1 NaN values$"),
    ("cauchy-schwarz",
     lambda s: {"gram": _edit_entry(0, 1, lambda g: 2 * np.sqrt(g[0, 0] * g[1, 1]))},
     r"gram: entry \[0, 1\] = .* exceeds sqrt\(G_ii G_jj\) = .* \(Cauchy-Schwarz"),
    ("indefinite", lambda s: {"gram": _indefinite},
     r"gram: not positive semi-definite within rounding"),
    ("negative-diagonal", lambda s: {"gram": _scale_diagonal(3, lambda p, k: -1.0)},
     r"gram: 1 diagonal values negative \(a sum of squares\) \(first: column 3,"),
    ("diagonal-above-bound", lambda s: {"gram": _scale_diagonal(4, lambda p, k: 1e3)},
     r"gram: 1 diagonal values above the rows summed times their channel's absmax squared "
     r"\(first: column 4,"),
    ("diagonal-below-kept-rows", lambda s: {"gram": _scale_diagonal(
        6, lambda p, k: 0.5 * np.sum(s["rows"][..., 6].astype(np.float64) ** 2)
        / p[_packed_index(k, 6, 6)])},
     r"gram: 1 diagonal values below the kept rows' sum of squares \(which it includes\) "
     r"\(first: column 6,"),
    ("count", lambda s: {"gram_rows": lambda a: np.asarray(5, np.int64)},
     r"gram_rows: 5 rows summed, expected a multiple of the 6 steps and at least the 48 rows "
     r"kept"),
    ("shape", lambda s: {"gram": lambda a: a[:-1]},
     r"gram has shape float32\[1175\], expected float32 \[1176\] \(the packed upper triangle "
     r"of its \[48, 48\] Gram matrix\)"),
]


@pytest.mark.parametrize("case, edit, message", GRAM_CASES, ids=[c[0] for c in GRAM_CASES])
def test_an_edited_gram_is_refused_naming_the_field(calib_dir, tmp_path, case, edit, message):
    source, i = calib_dir
    stored = _stored(source, i)
    path = _forge(source, tmp_path / "c", {f"{i}.{f}": fn for f, fn in edit(stored).items()})
    with pytest.raises(CalibrationError, match=f"layer '{LAYER}' {message}") as error:
        load_calibration(path)
    assert "\n" not in str(error.value)


def test_a_consistent_edit_loads(calib_dir, tmp_path):
    """What is refused above is the values: a whole layer scaled consistently (magnitudes x2,
    the Gram x4) loads."""
    source, i = calib_dir
    twice = {f"{i}.{f}": (lambda a: a * 2) for f in ("absmax", "tensor_min", "tensor_max",
                                                     "rows", "weight_absmax")}
    path = _forge(source, tmp_path / "c", {**twice, f"{i}.gram": lambda a: a * 4})
    stats = load_calibration(path)[0].stats[LAYER]
    np.testing.assert_array_equal(stats.gram, _stored(source, i)["gram"] * 4)


def test_an_older_calibration_asks_to_calibrate_again(calib_dir, tmp_path):
    source, _ = calib_dir
    path = _forge(source, tmp_path / "old",
                  meta=lambda body: body.update(format="trdq_jax.calibration/2"))
    with pytest.raises(CalibrationError, match=r"calibration format 'trdq_jax.calibration/2' "
                                               r"keeps every sampled activation row; .* run "
                                               r"trdq calibrate again") as error:
        load_calibration(path)
    assert "\n" not in str(error.value)
