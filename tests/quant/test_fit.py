"""The recipe layer against independent references: GPTQ vs a float64 numpy loop and vs
round-to-nearest, the clipping and alpha searches (pooled, or per segment with per-segment
weights) vs brute force over their grids (each candidate simulated in numpy), per-segment
activation parameters vs numpy over each segment's rows, and the similarity split as wired
into ``calibrate`` vs brute force over all splits."""
import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

import trdq_jax.quant as Q
from trdq_jax.quant import gptq, hadamard
from trdq_jax.quant.capture import LayerStats
from trdq_jax.quant.fit import ACT_CLIP_GRID, quantize_layer

RNG = np.random.default_rng(0)


def _correlated_rows(r, k, seed=0):
    """Rows ``[r, k]`` with strongly correlated channels and a few outlier channels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(r, k)) @ (rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k))
    x[:, :3] *= 8.0
    return x.astype(np.float32)


def numpy_gptq(w, h, scale, bits):
    """Textbook GPTQ/OBQ in float64: quantize channel i, spread its error over the later
    channels with the inverse Hessian's row i, then eliminate i from the inverse."""
    w = np.array(w, np.float64)
    k = w.shape[0]
    h = np.array(h, np.float64)
    h = h + (0.01 * np.mean(np.diag(h)) + 1e-8) * np.eye(k)
    hinv = np.linalg.inv(h)
    qmax = 2 ** (bits - 1) - 1
    codes = np.zeros_like(w)
    for i in range(k):
        codes[i] = np.clip(np.round(w[i] / scale), -qmax, qmax)
        err = (w[i] - codes[i] * scale) / hinv[i, i]
        w[i + 1:] -= np.outer(hinv[i, i + 1:], err)
        hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return codes.astype(np.int8)


def _output_error(x, w, codes, scale):
    return float(np.sum((x.astype(np.float64) @ (w - codes * scale)) ** 2))


@pytest.mark.parametrize("k,n,bits", [(40, 12, 4), (200, 16, 3)])
def test_gptq_matches_numpy_loop_and_beats_round_to_nearest(k, n, bits):
    x = _correlated_rows(400, k)
    w = RNG.normal(size=(k, n)).astype(np.float32)
    h = x.T.astype(np.float64) @ x
    scale = (np.abs(w).max(0) / (2 ** (bits - 1) - 1)).astype(np.float32)
    got = np.asarray(gptq.gptq_codes(jnp.asarray(w), jnp.asarray(h, jnp.float32),
                                     jnp.asarray(scale), bits, block=16))
    want = numpy_gptq(w, h, scale, bits)
    assert np.mean(got == want) > 0.99  # float32 vs float64: a rounding tie may flip
    rtn = np.clip(np.round(w / scale), -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    e_got, e_want, e_rtn = (_output_error(x, w, c, scale) for c in (got, want, rtn))
    assert e_got == pytest.approx(e_want, rel=1e-3)
    assert e_got < 0.8 * e_rtn


def test_gptq_blocks_do_not_change_the_codes():
    x, w = _correlated_rows(300, 70), RNG.normal(size=(70, 9)).astype(np.float32)
    h, scale = jnp.asarray(x.T @ x), jnp.asarray(np.abs(w).max(0) / 7)
    codes = [np.asarray(gptq.gptq_codes(jnp.asarray(w), h, scale, 4, block=b))
             for b in (1, 16, 128)]
    assert np.mean(codes[0] == codes[1]) > 0.99 and np.mean(codes[0] == codes[2]) > 0.99


@pytest.mark.parametrize("use_gptq", [False, True])
def test_weight_clip_search_is_brute_force_per_column(use_gptq):
    k, n, bits, grid = 48, 10, 3, (1.0, 0.9, 0.8, 0.6)
    x = _correlated_rows(300, k, seed=1)
    w = RNG.standard_t(2, size=(k, n)).astype(np.float32)  # heavy tails: clipping pays
    h = (x.T @ x).astype(np.float32)
    codes, scales = gptq.fit_weight(jnp.asarray(w), jnp.asarray(h), bits, grid, use_gptq)
    codes, scales = np.asarray(codes), np.asarray(scales)
    qmax = 2 ** (bits - 1) - 1
    best_err = np.full(n, np.inf)
    best_ratio = np.zeros(n)
    for ratio in grid:  # brute force, candidate codes from the numpy references
        s = np.maximum(np.abs(w).max(0) * ratio, 1e-8) / qmax
        c = numpy_gptq(w, h, s, bits) if use_gptq else np.clip(np.round(w / s), -qmax, qmax)
        err = np.sum((x.astype(np.float64) @ (w - c * s)) ** 2, axis=0)
        better = err < best_err * (1 - 1e-6)
        best_err, best_ratio = np.where(better, err, best_err), np.where(better, ratio, best_ratio)
    got_ratio = scales * qmax / np.maximum(np.abs(w).max(0), 1e-8)
    got_err = np.sum((x.astype(np.float64) @ (w - codes * scales)) ** 2, axis=0)
    np.testing.assert_allclose(got_err, best_err, rtol=1e-3)
    assert np.mean(np.isclose(got_ratio, best_ratio, atol=1e-5)) >= 0.9
    assert len(set(np.round(best_ratio, 3))) > 1, "the test needs columns that prefer clipping"


# ----------------------------------------------------------------------------- one layer


def _stats(rows_per_step, k):
    """LayerStats from rows ``[steps, R, k]`` (absmax and ranges from the rows themselves)."""
    rows = np.asarray(rows_per_step, np.float32)
    return LayerStats(absmax=np.abs(rows).max(1), tensor_min=rows.min((1, 2)),
                      tensor_max=rows.max((1, 2)), rows=rows, weight_absmax=np.ones(k, np.float32))


def _segment_rows(k, steps=8, r=24, scales=(1.0, 30.0), seed=3):
    """Rows whose range differs by segment: steps [0, steps/2) x scales[0], then x scales[1]."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(steps, r, k)).astype(np.float32)
    rows[:, :, 1] += 4.0  # an outlier channel
    table = np.repeat(np.arange(2), steps // 2).astype(np.int32)
    rows *= np.asarray(scales, np.float32)[table][:, None, None]
    return rows, table


def numpy_layer(q: Q.QLinear, x: np.ndarray, segment: int) -> np.ndarray:
    """float64 simulation of a Dense QLinear (smoothing, Hadamard as a matrix, per-token or
    static activation codes, dequantized weight), written from the definitions."""
    x = np.asarray(x, np.float64)
    pick = lambda a: np.asarray(a)[0 if np.shape(a)[0] == 1 else segment]  # noqa: E731
    if q.smooth is not None:
        x = x / pick(q.smooth)
    if q.rotation == "hadamard":
        k = x.shape[-1]
        x = x @ (np.diag(np.asarray(q.signs, np.float64)) @ hadamard.hadamard_matrix(k)
                 / np.sqrt(k))
    if q.a_bits != 16:
        b = q.a_bits
        if q.a_mode == "dynamic":
            clip = 1.0 if q.a_clip is None else float(pick(q.a_clip))
            lo = np.minimum(x.min(-1, keepdims=True) * clip, 0)
            hi = np.maximum(x.max(-1, keepdims=True) * clip, 0)
            if q.a_symmetric:
                scale, zero = np.maximum(np.maximum(-lo, hi), 1e-8) / (2 ** (b - 1) - 1), 0
            else:
                scale = np.maximum(hi - lo, 1e-8) / (2 ** b - 1)
                zero = np.clip(np.round(-2 ** (b - 1) - lo / scale), -2 ** (b - 1), 2 ** (b - 1) - 1)
        else:
            scale = float(pick(q.a_scale))
            zero = 0 if q.a_zero is None else float(pick(q.a_zero))
        lo_code = -(2 ** (b - 1) - 1) if q.a_symmetric else -2 ** (b - 1)
        codes = np.clip(np.round(x / scale) + zero, lo_code, 2 ** (b - 1) - 1)
        x = (codes - zero) * scale
    codes = np.asarray(Q.verify.weight_codes(q), np.float64) if q.w_bits != 16 else np.asarray(
        q.w_q, np.float64)
    w = codes[0 if codes.shape[0] == 1 else segment] * (
        pick(q.w_scale) if q.w_bits != 16 else 1.0)
    y = x @ w
    return y + np.asarray(q.bias) if q.bias is not None else y


def _trajectory_error(q, rows, table, kernel):
    """Mean squared output error over every calibration row, numpy reference."""
    total, count = 0.0, 0
    for s in range(int(table.max()) + 1):
        x = rows[table == s].reshape(-1, rows.shape[-1])
        total += float(np.sum((numpy_layer(q, x, s) - x.astype(np.float64) @ kernel) ** 2))
        count += x.size // x.shape[-1] * kernel.shape[1]
    return total / count


def test_numpy_layer_reference_matches_the_fake_backend():
    k, n = 24, 8
    rows, table = _segment_rows(k)
    kernel = RNG.normal(size=(k, n)).astype(np.float32)
    recipe = Q.Recipe("r", w_bits=4, a_bits=6, smoothing=True, rotation="hadamard",
                      num_segments=2, a_clip_search=True)
    q = quantize_layer(kernel, None, _stats(rows, k), table, 2, recipe)
    x = rows[6]
    np.testing.assert_allclose(np.asarray(Q.qlinear_apply(q, jnp.asarray(x), 1, "fake")),
                               numpy_layer(q, x, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gptq_on", [False, True])
def test_alpha_search_is_brute_force_over_finished_layers(gptq_on):
    k, n = 24, 16
    rows, table = _segment_rows(k, scales=(1.0, 3.0))
    kernel = RNG.normal(size=(k, n)).astype(np.float32)
    grid = (0.2, 0.5, 0.8)
    base = Q.Recipe("r", w_bits=4, a_bits=4, smoothing=True, rotation="hadamard",
                    num_segments=2, gptq=gptq_on, w_clip_search=True)
    stats = _stats(rows, k)
    each = [_trajectory_error(quantize_layer(kernel, None, stats, table, 2,
                                             dataclasses.replace(base, alpha=a)),
                              rows, table, kernel) for a in grid]
    # the search also offers "no smoothing"
    each.append(_trajectory_error(quantize_layer(kernel, None, stats, table, 2,
                                                 dataclasses.replace(base, smoothing=False)),
                                  rows, table, kernel))
    searched = quantize_layer(kernel, None, stats, table, 2,
                              dataclasses.replace(base, alpha_grid=grid))
    assert max(each) > 1.05 * min(each), "the grid must hold a clearly worse alpha"
    assert _trajectory_error(searched, rows, table, kernel) == pytest.approx(min(each), rel=1e-6)


def test_per_segment_weights_choose_each_segment_alpha_by_brute_force():
    """``per_segment_weights`` (e.g. ``trdq_release``): each segment's alpha is the one whose
    finished layer has the least error on that segment's rows, chosen independently."""
    k, n, grid = 24, 16, (0.1, 0.5, 0.9)
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(8, 32, k)).astype(np.float32)
    table = np.repeat(np.arange(2), 4).astype(np.int32)
    rows[:4, :, :3] *= 1000.0  # segment 0: activation outlier channels (migrate them: alpha up)
    kernel = rng.normal(size=(k, n)).astype(np.float32)
    kernel[5:8] *= 30.0  # weight outlier channels, which segment 1's flat rows can take over
    base = Q.Recipe("r", w_bits=4, a_bits=8, smoothing=True, num_segments=2,
                    per_segment_weights=True, a_clip_search=False)
    stats = _stats(rows, k)
    fixed = [quantize_layer(kernel, None, stats, table, 2, dataclasses.replace(base, alpha=a))
             for a in grid] + [  # the search's "no smoothing" candidate
        quantize_layer(kernel, None, stats, table, 2, dataclasses.replace(base, smoothing=False))]
    searched = quantize_layer(kernel, None, stats, table, 2,
                              dataclasses.replace(base, alpha_grid=grid))
    best = []
    for s in range(2):  # brute force over this segment's rows, numpy reference layer
        x = rows[table == s].reshape(-1, k)
        err = [np.mean((numpy_layer(q, x, s) - x.astype(np.float64) @ kernel) ** 2)
               for q in fixed]
        b = int(np.argmin(err))
        assert sorted(err)[1] > 1.03 * err[b], "the choice must be clear"
        best.append(b)
        want = np.asarray(fixed[b].smooth)[s] if b < len(grid) else np.ones(k, np.float32)
        np.testing.assert_array_equal(np.asarray(searched.smooth)[s], want)
        assert np.mean((numpy_layer(searched, x, s) - x.astype(np.float64) @ kernel) ** 2) \
            == pytest.approx(err[b], rel=1e-6)
    assert best[0] != best[1], "the segments were planted to want different alphas"


def test_rtn_alpha_search_picks_by_round_to_nearest_then_fits_gptq_once():
    k, n = 24, 16
    rows, table = _segment_rows(k, scales=(1.0, 3.0), seed=1)
    kernel = np.random.default_rng(1).standard_t(3, size=(k, n)).astype(np.float32)
    grid = (0.2, 0.5, 0.8)
    base = Q.Recipe("r", w_bits=3, a_bits=4, smoothing=True, rotation="hadamard",
                    num_segments=2, gptq=True, w_clip_search=True)
    stats = _stats(rows, k)
    fixed = [dataclasses.replace(base, alpha=a) for a in grid] + [
        dataclasses.replace(base, smoothing=False)]  # the search's "no smoothing" candidate
    err = lambda r: _trajectory_error(quantize_layer(kernel, None, stats, table, 2, r),  # noqa
                                      rows, table, kernel)
    rtn = [err(dataclasses.replace(r, gptq=False)) for r in fixed]
    final = [err(r) for r in fixed]
    # on these rows the two criteria disagree, so the test tells the modes apart
    assert np.argmin(rtn) != np.argmin(final)
    got = quantize_layer(kernel, None, stats, table, 2,
                         dataclasses.replace(base, alpha_grid=grid, search_weights="rtn"))
    assert _trajectory_error(got, rows, table, kernel) == pytest.approx(
        final[int(np.argmin(rtn))], rel=1e-6)


def test_searches_never_lose_to_the_recipe_without_them():
    k, n = 24, 16
    rows, table = _segment_rows(k, scales=(1.0, 3.0), seed=5)
    kernel = np.random.default_rng(0).standard_t(3, size=(k, n)).astype(np.float32)
    stats = _stats(rows, k)
    full = Q.Recipe("r", w_bits=3, a_bits=4, smoothing=True, alpha_grid=(0.3, 0.5, 0.7),
                    rotation="hadamard", num_segments=2, gptq=True, w_clip_search=True,
                    a_clip_search=True)
    err = lambda r: _trajectory_error(quantize_layer(kernel, None, stats, table, 2, r),  # noqa
                                      rows, table, kernel)
    e_full = err(full)
    # these rows make every search pay (strictly): turning one off must show
    for off in (dict(alpha_grid=()), dict(w_clip_search=False), dict(a_clip_search=False),
                dict(gptq=False)):
        assert e_full < err(dataclasses.replace(full, **off)) * (1 - 1e-3), off


def test_static_activation_scales_follow_each_segment_rows():
    k, n = 16, 8
    rows, table = _segment_rows(k, scales=(1.0, 50.0))
    kernel = RNG.normal(size=(k, n)).astype(np.float32)
    stats = _stats(rows, k)
    for symmetric in (False, True):
        recipe = Q.Recipe("r", w_bits=8, a_bits=8, a_mode="static", a_clip_search=False,
                          a_symmetric=symmetric, num_segments=2)
        q = quantize_layer(kernel, None, stats, table, 2, recipe)
        for s in range(2):
            x = rows[table == s]
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            if symmetric:
                want = max(-lo, hi) / 127
            else:
                want = (hi - lo) / 255
                zero = np.clip(np.round(-128 - lo / want), -128, 127)
                assert int(np.asarray(q.a_zero)[s]) == zero
            assert float(np.asarray(q.a_scale)[s]) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("a_mode", ["static", "dynamic"])
def test_activation_clip_search_is_brute_force_per_segment(a_mode):
    k, n, bits = 64, 8, 3
    rows, table = _segment_rows(k, scales=(1.0, 20.0), seed=7)
    rows[:4] = np.random.default_rng(1).laplace(size=rows[:4].shape)  # heavy tails: clipping
    rows[:4, :2, 0] *= 25.0  # pays in segment 0, and rare spikes there
    kernel = RNG.normal(size=(k, n)).astype(np.float32)
    recipe = Q.Recipe("r", w_bits=8, a_bits=bits, a_mode=a_mode, a_clip_search=True,
                      num_segments=2)
    q = quantize_layer(kernel, None, _stats(rows, k), table, 2, recipe)
    plain = quantize_layer(kernel, None, _stats(rows, k), table, 2,
                           dataclasses.replace(recipe, a_clip_search=False))
    chosen = []
    for s in range(2):
        x = rows[table == s].reshape(-1, k)
        y_ref = x.astype(np.float64) @ kernel
        errors = []
        for c in ACT_CLIP_GRID:  # brute force with the numpy layer
            if a_mode == "dynamic":
                cand = dataclasses.replace(q, a_clip=jnp.full((2,), c, jnp.float32))
            else:
                lo, hi = min(float(x.min()), 0.0) * c, max(float(x.max()), 0.0) * c
                scale = np.float32((np.float32(hi) - np.float32(lo)) / (2 ** bits - 1))
                zero = int(np.clip(np.round(-2 ** (bits - 1) - np.float32(lo) / scale),
                                   -2 ** (bits - 1), 2 ** (bits - 1) - 1))
                cand = dataclasses.replace(q, a_scale=jnp.full((2,), scale, jnp.float32),
                                           a_zero=jnp.full((2,), zero, jnp.int32))
            errors.append(np.mean((numpy_layer(cand, x, s) - y_ref) ** 2))
        best = int(np.argmin(errors))
        got = (float(np.asarray(q.a_clip)[s]) if a_mode == "dynamic"
               else float(np.asarray(q.a_scale)[s]))
        want = (ACT_CLIP_GRID[best] if a_mode == "dynamic"
                else float(np.asarray(_scale_of(x, ACT_CLIP_GRID[best], bits))))
        assert got == pytest.approx(want, rel=1e-5), (s, errors)
        chosen.append(best)
        assert np.mean((numpy_layer(q, x, s) - y_ref) ** 2) <= np.mean(
            (numpy_layer(plain, x, s) - y_ref) ** 2) * (1 + 1e-6)
    assert any(chosen), "the rows should make clipping pay somewhere"


def _scale_of(x, c, bits):
    lo, hi = min(float(x.min()), 0.0) * c, max(float(x.max()), 0.0) * c
    return np.float32((np.float32(hi) - np.float32(lo)) / (2 ** bits - 1))


# ----------------------------------------------------------------------------- calibrate


def test_similarity_split_in_calibrate_is_the_brute_force_optimum():
    from tests.quant.test_transform import DIT, LABELS, SAMPLER, _perturbed
    from trdq_jax.models import build_model, input_shape
    model, params = build_model(DIT), _perturbed(DIT)
    recipe = Q.Recipe("s", num_segments=3, segment_split="similarity")
    calib = Q.calibrate(model, params, recipe, SAMPLER, labels=LABELS,
                        null_label=DIT.num_classes, shape=input_shape(DIT, len(LABELS)),
                        rows_per_step=8)
    feats = np.concatenate([np.log(np.maximum(np.asarray(s.absmax, np.float64),
                                              np.asarray(s.absmax).max() * 1e-6))
                            / np.sqrt(s.absmax.shape[1])
                            for _, s in sorted(calib.stats.items())], axis=1)
    steps = feats.shape[0]
    best, best_table = np.inf, None
    for cuts in itertools.combinations(range(1, steps), 2):  # every contiguous 3-split
        bounds = (0, *cuts, steps)
        cost = sum(np.sum((feats[a:b] - feats[a:b].mean(0)) ** 2)
                   for a, b in zip(bounds, bounds[1:]))
        if cost < best - 1e-9:
            best = cost
            best_table = np.concatenate([np.full(b - a, i) for i, (a, b)
                                         in enumerate(zip(bounds, bounds[1:]))])
    np.testing.assert_array_equal(calib.segment_of_step, best_table)
    uniform = Q.calibrate(model, params, dataclasses.replace(recipe, segment_split="uniform"),
                          SAMPLER, labels=LABELS, null_label=DIT.num_classes,
                          shape=input_shape(DIT, len(LABELS)), rows_per_step=8)
    assert not np.array_equal(uniform.segment_of_step, best_table), \
        "pick a model whose similarity split differs from the uniform one"
