"""quantize / QLinear / QuantizedDenoiser: equivalence, backends, bytes, errors, one compile."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trdq_jax.quant as Q
from trdq_jax.config import ConfigError, DiTConfig, SamplerConfig, UNetConfig, VideoDiTConfig
from trdq_jax.models import build_model, init_params, input_shape
from trdq_jax.quant.qlinear import output_columns
from trdq_jax.sampling import Sampler, denoise_fn_for, sample

DIT = DiTConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=48, depth=2, num_heads=2,
                num_classes=3, learn_sigma=False)
SAMPLER = Sampler.from_config(SamplerConfig(num_steps=6, cfg_scale=2.0))
LABELS = np.array([0, 1, 2, 0])


def _perturbed(cfg, seed=0):
    params = init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def dit():
    return build_model(DIT), _perturbed(DIT)


def _calib(model, params, recipe, cfg=DIT, labels=LABELS):
    return Q.calibrate(model, params, recipe, SAMPLER, labels=labels, null_label=cfg.num_classes,
                       shape=input_shape(cfg, len(labels)), rows_per_step=32)


def _forward(model, params, cfg, qparams=None, backend="xla", segment=0):
    x = jax.random.normal(jax.random.key(7), input_shape(cfg, 4))
    t, y = jnp.array([10.0, 400.0, 700.0, 999.0]), jnp.array([0, 1, 2, cfg.num_classes])
    if qparams is None:
        return model.apply({"params": params}, x, t, y)
    return Q.QuantizedDenoiser(model, backend)(qparams, x, t, y, jnp.int32(segment), False)


TRANSFORMS = [
    dict(smoothing=True, alpha=0.5),
    dict(rotation="hadamard"),
    dict(rotation="block_hadamard", rotation_block=16),
    dict(rotation="duquant", rotation_block=16),
    dict(smoothing=True, alpha_grid=(0.3, 0.7), rotation="duquant", rotation_block=16,
         num_segments=3, per_segment_weights=True),
]


_UNET_CONVS = r"(conv_in|conv_out|skip|sample)$"


def _assert_transforms_leave_output_unchanged(model, params, cfg, labels, block_of=None,
                                              transforms=TRANSFORMS):
    """Every transform in ``transforms``, with quantization disabled (16 bits), in every
    segment, changes the model output by < 1e-4 relative. ``block_of(fields)`` overrides the
    block size. Statistics are collected once and derived for every recipe."""
    from trdq_jax.quant.calibrate import derive_calibration
    want = np.asarray(_forward(model, params, cfg))
    shared = _calib(model, params, Q.Recipe("t", w_bits=16, a_bits=16, num_segments=3), cfg,
                    labels)
    for fields in transforms:
        if cfg.family == "unet" and fields.get("rotation") == "hadamard":
            continue  # UNet attention widths are powers of two: covered by the block variants
        if block_of is not None and "rotation_block" in fields:
            fields = {**fields, "rotation_block": block_of(fields)}
        if cfg.family == "unet" and fields.get("rotation") == "duquant":
            # DuQuant's greedy search on every conv is slow; convs: tests/quant/test_qconv.py
            fields = {**fields, "keep_float": Q.DEFAULT_KEEP_FLOAT + (_UNET_CONVS,)}
        recipe = Q.Recipe("t", w_bits=16, a_bits=16, **fields)
        qparams = Q.quantize(params, derive_calibration(shared, recipe, SAMPLER), recipe)
        assert Q.quantized_layer_paths(qparams)
        for segment in range(recipe.num_segments):
            got = np.asarray(_forward(model, params, cfg, qparams, segment=segment))
            rel = np.abs(got - want).max() / np.abs(want).max()
            assert rel < 1e-4, (cfg.family, fields, segment, rel)


@pytest.mark.parametrize("cfg", [
    DIT,
    VideoDiTConfig(num_frames=2, input_size=8, in_channels=1, patch_size=4, hidden_size=24,
                   depth=1, num_heads=2, num_classes=3),
    UNetConfig(input_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2),
               num_res_blocks=1, attention_resolutions=(4,), num_heads=2, num_groups=8,
               num_classes=3),
], ids=["dit", "video_dit", "unet"])
def test_transforms_without_quantization_leave_output_unchanged(cfg):
    # plain DuQuant (TRANSFORMS[3]) on the DiT only: the last entry runs DuQuant everywhere
    transforms = TRANSFORMS if cfg.family == "dit" else TRANSFORMS[:3] + TRANSFORMS[4:]
    _assert_transforms_leave_output_unchanged(build_model(cfg), _perturbed(cfg), cfg, LABELS,
                                              transforms=transforms)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits-dit"])
def test_transforms_leave_bundled_models_unchanged(name):
    """The trained weights (bf16, outlier channels included), not random ones: smoothing and
    the Hadamard rotations (DuQuant's greedy search on trained weights costs half a minute; it
    runs on random weights above). The UNet and the video DiT run the same check on random
    weights above (their convs in test_qconv); their bundled weights were dropped here to keep
    the suite inside its time budget."""
    from trdq_jax.models import zoo
    if name not in zoo.available():
        pytest.skip(f"{name} is not bundled in this checkout")
    model, params, cfg = zoo.load(name)
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    # transformer widths 192 / 768: blocks that divide both (UNet keeps the small blocks)
    block_of = None if cfg.model.family == "unet" else (
        lambda fields: 64 if fields["rotation"] == "duquant" else 48)
    _assert_transforms_leave_output_unchanged(
        model, params, cfg.model, np.array([0, 3, 7, 9]), block_of,
        transforms=[t for t in TRANSFORMS if t.get("rotation") != "duquant"])


@pytest.mark.parametrize("w_bits, a_bits, a_mode, a_symmetric", [
    (8, 8, "dynamic", False), (8, 8, "static", True), (4, 8, "dynamic", True),
    (4, 8, "static", False), (6, 6, "dynamic", False), (4, 16, "dynamic", False),
])
def test_fake_and_xla_agree_on_every_layer(dit, w_bits, a_bits, a_mode, a_symmetric):
    model, params = dit
    recipe = Q.Recipe("r", w_bits=w_bits, a_bits=a_bits, a_mode=a_mode, a_symmetric=a_symmetric,
                      rotation="hadamard", smoothing=True, num_segments=2)
    qparams = Q.quantize(params, _calib(model, params, recipe), recipe)
    x = jax.random.normal(jax.random.key(3), (5, 7, 48)) * 3
    for path in Q.quantized_layer_paths(qparams):
        q = qparams["layers"]
        for name in path.split("/"):
            q = q[name]
        xin = x if q.in_features == 48 else jax.random.normal(jax.random.key(4), (5, 7, q.in_features))
        for seg in (0, 1):
            fake = np.asarray(Q.qlinear_apply(q, xin, seg, "fake"))
            xla = np.asarray(Q.qlinear_apply(q, xin, seg, "xla"))
            np.testing.assert_allclose(xla, fake, rtol=1e-4, atol=1e-4 * np.abs(fake).max(),
                                       err_msg=path)


def test_cfg_sharing_runs_quantized_on_every_backend(dit):
    """A plan sharing one layer: the uncond half's ``value`` call is the quantized layer's v
    columns (exactly the full layer's on xla; packed int4 codes), and fake / xla / pallas
    agree."""
    model, params = dit
    recipe = Q.get_recipe("quarot_rtn", 4, 8)
    qparams = Q.quantize(params, _calib(model, params, recipe), recipe)
    q = qparams["layers"]["blocks_1"]["attn"]["qkv"]
    x = jax.random.normal(jax.random.key(5), (4, 16, 48))
    full = np.asarray(Q.qlinear_apply(q, x, 0, "xla"))
    cols = np.asarray(Q.qlinear_apply(output_columns(q, 96, 144), x, 0, "xla"))
    np.testing.assert_array_equal(cols, full[..., 96:])
    share = frozenset({"blocks_1/attn"})
    xin = jax.random.normal(jax.random.key(7), input_shape(DIT, 4))
    t, y = jnp.array([400.0] * 4), jnp.array([0, 1, 3, 3])
    out = {b: np.asarray(Q.QuantizedDenoiser(model, b)(qparams, xin, t, y, jnp.int32(0), share))
           for b in ("fake", "xla", "pallas")}
    unshared = np.asarray(Q.QuantizedDenoiser(model, "xla")(qparams, xin, t, y, jnp.int32(0),
                                                            False))
    for b in ("fake", "pallas"):
        np.testing.assert_allclose(out[b], out["xla"], rtol=1e-3, atol=1e-3 * np.abs(
            out["xla"]).max(), err_msg=b)
    np.testing.assert_allclose(out["xla"][:2], unshared[:2], rtol=1e-5, atol=1e-5)  # cond half
    assert np.abs(out["xla"][2:] - unshared[2:]).max() > 1e-4


def test_recipe_keep_float_survives_calibrate_then_quantize(dit):
    model, params = dit
    recipe = Q.Recipe("k", keep_float=Q.DEFAULT_KEEP_FLOAT + ("mlp/fc2$",))
    calib = _calib(model, params, recipe)
    assert not any(p.endswith("mlp/fc2") for p in calib.stats)
    qparams = Q.quantize(params, calib, recipe)
    paths = Q.quantized_layer_paths(qparams)
    assert paths and not any(p.endswith("mlp/fc2") for p in paths)
    assert "kernel" in qparams["float"]["blocks_0"]["mlp"]["fc2"]


def test_derive_calibration_reuses_statistics(dit):
    from trdq_jax.quant.calibrate import derive_calibration
    model, params = dit
    calib = _calib(model, params, Q.Recipe("all"))
    fewer = Q.Recipe("k", num_segments=3, keep_float=Q.DEFAULT_KEEP_FLOAT + ("mlp/fc2$",))
    derived = derive_calibration(calib, fewer, SAMPLER)
    assert sorted(derived.stats) == sorted(p for p in calib.stats if not p.endswith("mlp/fc2"))
    assert derived.num_segments == 3 and set(np.asarray(derived.segment_of_step)) == {0, 1, 2}
    np.testing.assert_array_equal(derived.stats["blocks_0/attn/qkv"].absmax,
                                  calib.stats["blocks_0/attn/qkv"].absmax)
    Q.quantize(params, derived, fewer)  # the derived selection quantizes as is
    # a layer's statistics do not depend on which other layers the recipe measures: the same
    # rows are sampled (the sample derives from seed, step and path), so derived == direct
    direct = _calib(model, params, fewer)
    assert sorted(direct.stats) == sorted(derived.stats)
    for path, stats in direct.stats.items():
        for field in dataclasses.fields(stats):
            want = getattr(derived.stats[path], field.name)
            if isinstance(want, np.ndarray):
                np.testing.assert_array_equal(getattr(stats, field.name), want, err_msg=path)
    with pytest.raises(ValueError, match="no statistics"):
        derive_calibration(derived, Q.Recipe("all"), SAMPLER)  # fc2 was never measured


def test_token_min_max_matches_numpy():
    x = np.random.default_rng(1).standard_normal((3, 5, 40)).astype(np.float32)
    x[1, 2, 7] = 50.0
    lo, hi = jax.jit(Q.qlinear.token_min_max)(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(lo), x.min(-1, keepdims=True))
    np.testing.assert_array_equal(np.asarray(hi), x.max(-1, keepdims=True))


def test_int8_dot_accumulates_exactly_in_int32():
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (64, 4608), dtype=np.int8)
    b = rng.integers(-128, 128, (4608, 32), dtype=np.int8)
    got = jax.lax.dot_general(jnp.asarray(a), jnp.asarray(b), (((1,), (0,)), ((), ())),
                              preferred_element_type=jnp.int32)
    np.testing.assert_array_equal(np.asarray(got), a.astype(np.int64) @ b.astype(np.int64))


def test_minmax_layer_matches_numpy_reference(dit):
    """Per-channel symmetric W8, static asymmetric per-tensor A8, written out in numpy."""
    model, params = dit
    recipe = Q.get_recipe("minmax", 8, 8)
    calib = _calib(model, params, recipe)
    q = Q.quantize(params, calib, recipe)["layers"]["blocks_0"]["mlp"]["fc1"]
    w = np.asarray(params["blocks_0"]["mlp"]["fc1"]["kernel"], np.float64)
    b = np.asarray(params["blocks_0"]["mlp"]["fc1"]["bias"], np.float64)
    st = calib.stats["blocks_0/mlp/fc1"]
    lo = min(0.0, float(st.tensor_min.min()), float(st.rows.min()))
    hi = max(0.0, float(st.tensor_max.max()), float(st.rows.max()))
    a_scale = (hi - lo) / 255
    a_zero = np.round(-128 - lo / a_scale)
    w_scale = np.abs(w).max(0) / 127
    x = np.asarray(jax.random.normal(jax.random.key(1), (9, 48)), np.float64)
    xq = np.clip(np.round(x / a_scale) + a_zero, -128, 127)
    wq = np.clip(np.round(w / w_scale), -127, 127)
    want = ((xq - a_zero) * a_scale) @ (wq * w_scale) + b
    got = np.asarray(Q.qlinear_apply(q, jnp.asarray(x, jnp.float32), 0, "xla"))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_weight_bytes_count_what_is_held(dit):
    model, params = dit
    recipe = Q.get_recipe("trdq", 4, 8, num_segments=2)
    qparams = Q.quantize(params, _calib(model, params, recipe), recipe)
    q = qparams["layers"]["blocks_1"]["mlp"]["fc2"]  # K=192, N=48
    assert q.w_q.dtype == jnp.uint8 and q.w_q.shape == (1, 96, 48)
    expected = (96 * 48 + 48 * 4 + 48 * 4 + 48 * 4 + 192 * 4 + 2 * 4)
    # codes, w_scale, w_colsum, bias, signs, a_clip[2] (trdq has no smoothing)
    assert Q.qlinear_bytes(q) == expected
    total = sum(Q.qlinear_bytes(_leaf(qparams, p)) for p in Q.quantized_layer_paths(qparams))
    assert Q.weight_bytes(qparams)["quantized_layers"] == total


def _leaf(qparams, path):
    node = qparams["layers"]
    for name in path.split("/"):
        node = node[name]
    return node


def test_trdq_w4a8_holds_under_030_of_bf16_bytes():
    cfg = dataclasses.replace(DIT, hidden_size=192, num_heads=6)
    model, params = build_model(cfg), _perturbed(cfg)
    recipe = Q.get_recipe("trdq", 4, 8, num_segments=2, w_clip_search=False, alpha_grid=())
    qparams = Q.quantize(params, _calib(model, params, recipe, cfg, LABELS), recipe)
    paths = Q.quantized_layer_paths(qparams)
    ratio = Q.weight_bytes(qparams)["quantized_layers"] / Q.float_bytes_of(params, paths)
    assert ratio <= 0.30, ratio


def test_four_segments_sample_in_one_compiled_scan(dit):
    model, params = dit
    recipe = Q.get_recipe("trdq_release", 8, 8, rotation_block=16, alpha_grid=())
    calib = _calib(model, params, recipe)
    qparams = Q.quantize(params, calib, recipe)
    sampler = SAMPLER.with_segments(calib.segment_of_step, calib.num_segments)
    assert calib.num_segments == 4 and sorted(set(calib.segment_of_step.tolist())) == [0, 1, 2, 3]
    traces = []
    apply_fn = Q.QuantizedDenoiser(model, "xla")

    def counting(qp, x, t, y, segment, share_cfg):
        traces.append(1)
        return apply_fn(qp, x, t, y, segment, share_cfg)

    out = sample(counting, qparams, sampler, LABELS, seed=0, cfg_scale=2.0, null_label=3,
                 shape=(4, 8, 8, 1))
    out2 = sample(counting, qparams, sampler, LABELS, seed=1, cfg_scale=3.0, null_label=3,
                  shape=(4, 8, 8, 1))
    assert len(traces) == 1  # one trace covers every step and every segment
    assert np.isfinite(np.asarray(out)).all() and not np.allclose(out, out2)
    ref = sample(denoise_fn_for(model), params, SAMPLER, LABELS, seed=0, cfg_scale=2.0,
                 null_label=3, shape=(4, 8, 8, 1))
    assert float(jnp.sqrt(jnp.mean((out - ref) ** 2))) < 0.1


def test_save_and_restore_without_float_weights(tmp_path, dit):
    model, params = dit
    recipe = Q.get_recipe("trdq_release", 4, 8, rotation_block=16, alpha_grid=(), num_segments=2)
    calib = _calib(model, params, recipe)
    qparams = Q.quantize(params, calib, recipe)
    Q.save_quantized(tmp_path / "q", qparams, DIT, recipe, calib.segment_of_step)
    restored, cfg, recipe2, table = Q.load_quantized(tmp_path / "q")
    assert cfg == DIT and recipe2 == recipe
    np.testing.assert_array_equal(table, calib.segment_of_step)
    assert jax.tree.structure(restored) == jax.tree.structure(qparams)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(qparams)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs_are_named(dit):
    model, params = dit
    with pytest.raises(ConfigError, match=r"Recipe.w_bits: expected bits in 2..8"):
        Q.get_recipe("trdq", 9, 8)
    with pytest.raises(ConfigError, match=r"Recipe.a_bits"):
        Q.get_recipe("trdq", 4, 1)
    with pytest.raises(ValueError, match="calibration set is empty"):
        Q.calibrate(model, params, Q.get_recipe("minmax"), SAMPLER, labels=[], null_label=3,
                    shape=(0, 8, 8, 1))
    with pytest.raises(ValueError, match=r"keep_float: regex\(es\) \['nothing_here'\] match no"):
        Q.select_layers(["blocks_0/attn/qkv"], Q.Recipe("r", keep_float=("nothing_here",)))
    recipe = Q.get_recipe("quarot", 8, 8)
    calib = _calib(model, params, Q.get_recipe("minmax"))
    bad = dataclasses.replace(calib.stats["blocks_0/attn/qkv"])
    bad_rows = np.array(bad.rows)
    bad_rows[0, 0, 0] = np.nan
    stats = dict(calib.stats)
    stats["blocks_0/attn/qkv"] = dataclasses.replace(bad, rows=bad_rows)
    with pytest.raises(ValueError, match="non-finite activation statistics for layer blocks_0/attn/qkv"):
        Q.quantize(params, dataclasses.replace(calib, stats=stats), recipe)


def test_unsupported_rotation_width_is_explained():
    cfg = DiTConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=52, depth=1,
                    num_heads=2, num_classes=3, learn_sigma=False)
    model, params = build_model(cfg), _perturbed(cfg)
    recipe = Q.get_recipe("quarot", 8, 8)
    calib = _calib(model, params, Q.get_recipe("quarot", 8, 8), cfg)
    with pytest.raises(ValueError, match="supported sizes are K"):
        Q.quantize(params, calib, recipe)
