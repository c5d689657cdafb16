"""Calibration capture on a tiny DiT: layer discovery by path, per-step statistics checked
against a float64 numpy recomputation of the layer inputs, one compile for all steps."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trdq_jax.config import DiTConfig, SamplerConfig
from trdq_jax.models import build_model, init_params
from trdq_jax.quant import capture
from trdq_jax.sampling import Sampler

CFG = DiTConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=24, depth=2, num_heads=2,
                num_classes=3, learn_sigma=False)
NULL = 3
LABELS = np.array([0, 2])
STEPS = 4
ROWS = 8
EXPECTED_DENSE = [
    "t_embedder/mlp_0", "t_embedder/mlp_2",
    "blocks_0/adaLN_modulation_1", "blocks_0/attn/qkv", "blocks_0/attn/proj",
    "blocks_0/mlp/fc1", "blocks_0/mlp/fc2",
    "blocks_1/adaLN_modulation_1", "blocks_1/attn/qkv", "blocks_1/attn/proj",
    "blocks_1/mlp/fc1", "blocks_1/mlp/fc2",
    "final_layer/adaLN_modulation_1", "final_layer/linear"]


@pytest.fixture(scope="module")
def setup():
    model = build_model(CFG)
    params = init_params(CFG, jax.random.key(0))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = treedef.unflatten([p + 0.2 * jax.random.normal(k, p.shape, p.dtype)
                                for p, k in zip(leaves, keys)])
    sampler = Sampler.from_config(SamplerConfig(solver="ddim", num_steps=STEPS))
    traj = capture.calibration_trajectory(model, params, sampler, LABELS, NULL,
                                          (len(LABELS), 8, 8, 1), seed=0, cfg_scale=3.0)
    stats = capture.collect_stats(model, params, traj.xs, traj.timesteps, traj.cond, NULL,
                                  rows_per_step=ROWS, progress=False)
    return model, params, traj, stats


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _silu(a):
    return a / (1.0 + np.exp(-a))


def _sincos(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2))
    angles = np.asarray(pos, np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], 1)


def _conditioning(p, t, y):
    """c = MLP(sinusoid(t)) + table[y], ``[B, D]``, plus the sinusoid features."""
    half = 128
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    feats = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], 1)
    te = p["t_embedder"]
    h = _silu(feats @ te["mlp_0"]["kernel"] + te["mlp_0"]["bias"])
    c = h @ te["mlp_2"]["kernel"] + te["mlp_2"]["bias"]
    return c + p["y_embedder"]["embedding_table"]["embedding"][y], feats


def _first_qkv_input(p, x, t, y):
    """Input of blocks_0/attn/qkv, ``[B, L, D]`` float64: patchify + pos, LayerNorm, modulate."""
    b, g, d = x.shape[0], 4, CFG.hidden_size
    patches = x.reshape(b, g, 2, g, 2, 1).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, 4)
    proj = p["x_embedder"]["proj"]
    h = patches @ proj["kernel"].reshape(4, d) + proj["bias"]
    rows, cols = np.divmod(np.arange(g * g), g)
    h = h + np.concatenate([_sincos(d // 2, cols), _sincos(d // 2, rows)], 1)[None]
    c, _ = _conditioning(p, t, y)
    ada = p["blocks_0"]["adaLN_modulation_1"]
    shift, scale = np.split(_silu(c) @ ada["kernel"] + ada["bias"], 6, axis=1)[:2]
    normed = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
    return normed * (1 + scale[:, None]) + shift[:, None]


def _cfg_batch(traj, step):
    x = np.asarray(traj.xs[step], np.float64)
    n = x.shape[0]
    return (np.concatenate([x, x]), np.full(2 * n, float(traj.timesteps[step])),
            np.concatenate([traj.cond, np.full(n, NULL)]))


def test_layer_paths_by_module_path(setup):
    model, params, traj, _ = setup
    inputs = (jnp.zeros((4, 8, 8, 1)), jnp.zeros((4,)), jnp.zeros((4,), jnp.int32))
    assert capture.layer_paths(model, params, inputs) == EXPECTED_DENSE
    both = capture.layer_paths(model, params, inputs, kinds=("Dense", "Conv"))
    assert both == ["x_embedder/proj"] + EXPECTED_DENSE
    with pytest.raises(ValueError, match="kinds"):
        capture.layer_paths(model, params, inputs, kinds=("Linear",))


def test_first_qkv_statistics_match_numpy_recomputation(setup):
    _, params, traj, stats = setup
    assert list(stats) == EXPECTED_DENSE
    p = _np(params)
    qkv = stats["blocks_0/attn/qkv"]
    assert qkv.absmax.shape == (STEPS, 24) and qkv.rows.shape == (STEPS, ROWS, 24)
    assert qkv.absmax.dtype == np.float32
    for step in range(STEPS):
        x, t, y = _cfg_batch(traj, step)
        inp = _first_qkv_input(p, x, t, y).reshape(-1, 24)  # [2N*L, D], cond rows first
        np.testing.assert_allclose(qkv.absmax[step], np.abs(inp).max(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(qkv.tensor_min[step], inp.min(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(qkv.tensor_max[step], inp.max(), rtol=1e-4, atol=1e-5)
        # kept rows are stored as float16 (relative rounding 2^-11)
        dist = np.abs(qkv.rows[step][:, None, :] - inp[None]).max(-1)  # [R, M]
        index = dist.argmin(1)
        assert dist.min(1).max() < 1e-4 + 2 ** -11 * np.abs(inp).max()
        half = inp.shape[0] // 2
        assert len(set(index)) == ROWS
        assert np.all(index[:ROWS // 2] < half) and np.all(index[ROWS // 2:] >= half)
        assert np.all(np.diff(index[:ROWS // 2]) > 0) and np.all(np.diff(index[ROWS // 2:]) > 0)
    np.testing.assert_allclose(qkv.weight_absmax, np.abs(p["blocks_0"]["attn"]["qkv"]["kernel"])
                               .max(1), rtol=1e-6)


def test_other_layers_match_an_independent_route(setup):
    model, params, traj, stats = setup
    p = _np(params)
    for step in range(STEPS):
        x, t, y = _cfg_batch(traj, step)
        _, state = model.apply({"params": params}, jnp.asarray(x, jnp.float32),
                               jnp.asarray(t, jnp.float32), jnp.asarray(y, jnp.int32),
                               capture_intermediates=True, mutable=["intermediates"])
        fc1_out = np.asarray(state["intermediates"]["blocks_1"]["mlp"]["fc1"]["__call__"][0],
                             np.float64)
        fc2_in = 0.5 * fc1_out * (1 + np.tanh(np.sqrt(2 / np.pi)
                                              * (fc1_out + 0.044715 * fc1_out ** 3)))
        fc2 = stats["blocks_1/mlp/fc2"]
        np.testing.assert_allclose(fc2.absmax[step], np.abs(fc2_in).reshape(-1, 96).max(0),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose([fc2.tensor_min[step], fc2.tensor_max[step]],
                                   [fc2_in.min(), fc2_in.max()], rtol=1e-4, atol=1e-5)
        # fewer rows than requested: all 2N rows, cond first
        _, feats = _conditioning(p, t, y)
        mlp_0 = stats["t_embedder/mlp_0"]
        assert mlp_0.rows.shape == (STEPS, 4, 256)
        # float32 phases t * f reach ~1000 rad: absolute error ~1e-4 in cos/sin
        # (and float16 storage: 2^-12 at most for |x| <= 1)
        np.testing.assert_allclose(mlp_0.rows[step], feats, rtol=0, atol=3e-4 + 2 ** -12)
        c, _ = _conditioning(p, t, y)
        np.testing.assert_allclose(stats["blocks_1/adaLN_modulation_1"].absmax[step],
                                   np.abs(_silu(c)).max(0), rtol=1e-4, atol=1e-5)


def test_conv_layers_when_asked(setup):
    model, params, traj, _ = setup
    stats = capture.collect_stats(model, params, traj.xs, traj.timesteps, traj.cond, NULL,
                                  paths=["x_embedder/proj"], kinds=("Dense", "Conv"),
                                  rows_per_step=6, progress=False)
    conv = stats["x_embedder/proj"]
    # im2col rows: the 2x2 patch (stride 2, VALID) under each sampled output position
    assert list(stats) == ["x_embedder/proj"] and conv.rows.shape == (STEPS, 6, 4)
    xs = np.asarray(traj.xs, np.float64)
    b, h, w, _ = xs.shape[1:]
    patches = xs[0].reshape(b, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 2, 4).reshape(-1, 4)
    for row in np.asarray(conv.rows[0], np.float64):  # float16: relative rounding 2^-11
        assert np.min(np.abs(patches - row).max(1)) < 1e-6 + 2 ** -11 * np.abs(patches).max()
    np.testing.assert_allclose(conv.absmax[:, 0], np.abs(xs).reshape(STEPS, -1).max(1), rtol=1e-6)
    np.testing.assert_allclose(conv.tensor_min, xs.reshape(STEPS, -1).min(1), rtol=1e-6)
    np.testing.assert_allclose(conv.weight_absmax,
                               [np.abs(np.asarray(params["x_embedder"]["proj"]["kernel"])).max()],
                               rtol=1e-6)


def test_one_compile_for_all_steps_and_seeded_rows(setup):
    model, params, traj, stats = setup
    kw = dict(rows_per_step=ROWS, progress=False)
    before = capture._step_statistics._cache_size()
    capture.collect_stats(model, params, traj.xs, traj.timesteps, traj.cond, NULL,
                          rows_per_step=5, progress=False)  # a new static configuration
    assert capture._step_statistics._cache_size() == before + 1  # one program for all 4 steps
    again = capture.collect_stats(model, params, traj.xs, traj.timesteps, traj.cond, NULL, **kw)
    other = capture.collect_stats(model, params, traj.xs[::-1], traj.timesteps[::-1], traj.cond,
                                  NULL, seed=1, **kw)
    assert capture._step_statistics._cache_size() == before + 1
    np.testing.assert_array_equal(again["blocks_0/attn/qkv"].rows, stats["blocks_0/attn/qkv"].rows)
    np.testing.assert_allclose(other["blocks_0/attn/qkv"].absmax[::-1],
                               stats["blocks_0/attn/qkv"].absmax, rtol=1e-6)
    assert not np.array_equal(np.sort(other["blocks_0/attn/qkv"].rows[::-1], axis=1),
                              np.sort(stats["blocks_0/attn/qkv"].rows, axis=1))


def test_trajectory_comes_from_the_sampler(setup):
    _, _, traj, _ = setup
    assert traj.xs.shape == (STEPS, 2, 8, 8, 1) and traj.xs.dtype == np.float32
    noise = [jax.random.normal(jax.random.fold_in(jax.random.key(0), i), (8, 8, 1))
             for i in range(2)]
    np.testing.assert_allclose(traj.xs[0], np.stack(noise), atol=1e-6)
    np.testing.assert_array_equal(traj.timesteps, [999, 666, 333, 0])


def test_errors_name_the_problem(setup):
    model, params, traj, _ = setup
    args = (traj.timesteps, traj.cond, NULL)
    with pytest.raises(ValueError, match="xs"):
        capture.collect_stats(model, params, traj.xs[:0], traj.timesteps[:0], traj.cond, NULL,
                              progress=False)
    with pytest.raises(ValueError, match=r"blocks_9/\.\*.*available.*blocks_0/attn/qkv"):
        capture.collect_stats(model, params, traj.xs, *args,
                              paths=["blocks_0/attn/qkv", "blocks_9/.*"], progress=False)
    with pytest.raises(ValueError, match="rows_per_step"):
        capture.collect_stats(model, params, traj.xs, *args, rows_per_step=0, progress=False)
    with pytest.raises(ValueError, match="labels"):
        capture.collect_stats(model, params, traj.xs, traj.timesteps, np.array([0, 4]), NULL,
                              progress=False)
    bad = traj.xs.copy()
    bad[2, 1, 3, 3, 0] = np.nan
    with pytest.raises(ValueError, match=r"'blocks_1/mlp/fc2' at step 2"):
        capture.collect_stats(model, params, bad, *args, paths=["blocks_1/mlp/fc2"],
                              progress=False)
