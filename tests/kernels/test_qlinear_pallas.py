"""backend="pallas" / "auto" of qlinear_apply against "xla" and "fake" on a quantized tiny DiT."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
import trdq_jax.quant as Q
from trdq_jax.config import DiTConfig, SamplerConfig
from trdq_jax.models import build_model, init_params, input_shape
from trdq_jax.sampling import Sampler

DIT = DiTConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=48, depth=2, num_heads=2,
                num_classes=3, learn_sigma=False)
RECIPES = {  # all share one 2-segment calibration
    "w8a8_dynamic_asym_hadamard": Q.Recipe("a", w_bits=8, a_bits=8, rotation="hadamard",
                                           smoothing=True, num_segments=2),
    "w4a8_static_asym": Q.Recipe("b", w_bits=4, a_bits=8, a_mode="static", num_segments=2,
                                 a_clip_search=False),
    "w4a8_dynamic_sym_per_segment_weights": Q.Recipe(
        "c", w_bits=4, a_bits=8, a_symmetric=True, rotation="duquant", rotation_block=16,
        smoothing=True, num_segments=2, per_segment_weights=True, a_clip_search=False),
    # grouped_matmul: SVDQuant's format (groups on both sides, packed int4, a low-rank branch)
    # and activation groups over per-channel weights, one copy per segment (the column sums
    # per group are built from every copy's codes)
    "w4a4_groups_lowrank": Q.Recipe("d", w_bits=4, a_bits=4, w_group_size=16, a_group_size=16,
                                    low_rank=4, smoothing=True, num_segments=2),
    "w8a8_act_groups_per_segment_weights": Q.Recipe(
        "e", w_bits=8, a_bits=8, a_group_size=16, rotation="hadamard", num_segments=2,
        per_segment_weights=True, a_clip_search=False),
}


@pytest.fixture(scope="module")
def quantized():
    params = init_params(DIT, jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                       for p, k in zip(leaves, keys)])
    model = build_model(DIT)
    sampler = Sampler.from_config(SamplerConfig(num_steps=2, cfg_scale=2.0))
    labels = np.array([0, 2])
    calib = Q.calibrate(model, params, RECIPES["w4a8_static_asym"], sampler, labels=labels,
                        null_label=DIT.num_classes, shape=input_shape(DIT, len(labels)),
                        rows_per_step=8)
    return model, params, {name: Q.quantize(params, calib, r) for name, r in RECIPES.items()}


def _layers(qparams):
    for path in Q.quantized_layer_paths(qparams):
        node = qparams["layers"]
        for name in path.split("/"):
            node = node[name]
        yield path, node


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_layer_agrees_with_xla_and_fake(quantized, name):
    qparams = quantized[2][name]
    layers = list(_layers(qparams))
    assert {q.packed for _, q in layers} == {RECIPES[name].w_bits == 4}
    if RECIPES[name].per_segment_weights:  # weight-only (conditioning) layers keep one copy
        assert all(q.num_weight_copies == (1 if q.a_bits == 16 else 2) for _, q in layers)
        assert any(q.a_bits == 16 for _, q in layers) and any(q.a_bits == 8 for _, q in layers)
    for path, q in layers:
        x = jax.random.normal(jax.random.key(3), (5, 7, q.in_features)) * 3
        for seg in (0, 1):
            pallas = np.asarray(Q.qlinear_apply(q, x, seg, "pallas"))
            xla = np.asarray(Q.qlinear_apply(q, x, seg, "xla"))
            fake = np.asarray(Q.qlinear_apply(q, x, seg, "fake"))
            assert pallas.shape == xla.shape == (5, 7, q.w_scale.shape[-1])
            scale = np.abs(xla).max()
            np.testing.assert_allclose(pallas, xla, rtol=1e-5, atol=1e-5 * scale, err_msg=path)
            np.testing.assert_allclose(pallas, fake, rtol=1e-4, atol=1e-4 * scale, err_msg=path)


def test_full_model_forward_on_pallas_matches_xla(quantized):
    """Per-segment int4 weight copies, one compiled forward for both segments. (``xla`` and
    ``fake`` agree per layer above and per model in tests/quant/test_transform.py.)"""
    model, params, all_q = quantized
    qparams = all_q["w4a8_dynamic_sym_per_segment_weights"]
    x = jax.random.normal(jax.random.key(7), input_shape(DIT, 4))
    t, y = jnp.array([10.0, 400.0, 700.0, 999.0]), jnp.array([0, 1, 2, DIT.num_classes])
    traces = []

    def forward(backend):
        denoiser = Q.QuantizedDenoiser(model, backend)

        def run(qp, segment):
            traces.append(backend)
            return denoiser(qp, x, t, y, segment, False)
        return jax.jit(run)

    runs = {b: forward(b) for b in ("pallas", "xla")}
    outs = {(b, s): np.asarray(runs[b](qparams, jnp.int32(s))) for b in runs for s in (0, 1)}
    assert traces.count("pallas") == 1
    float_out = np.asarray(model.apply({"params": params}, x, t, y))
    for s in (0, 1):
        xla, scale = outs[("xla", s)], np.abs(outs[("xla", s)]).max()
        np.testing.assert_allclose(outs[("pallas", s)], xla, rtol=1e-5, atol=1e-5 * scale)
        assert np.abs(outs[("pallas", s)] - float_out).max() < 0.2 * np.abs(float_out).max()
    assert not np.allclose(outs[("pallas", 0)], outs[("pallas", 1)])  # the segment matters


def test_auto_is_xla_on_cpu_and_pallas_on_accelerators_when_the_layer_fits(quantized, monkeypatch):
    path, q = next(_layers(quantized[2]["w8a8_dynamic_asym_hadamard"]))
    x = jax.random.normal(jax.random.key(5), (3, q.in_features))
    np.testing.assert_array_equal(np.asarray(Q.qlinear_apply(q, x, 1, "auto")),
                                  np.asarray(Q.qlinear_apply(q, x, 1, "xla")))
    assert pallas_kernels.auto_backend(1152, 4608, 4, 8) == "xla"  # CPU
    for accelerator in ("tpu", "gpu"):
        monkeypatch.setattr(pallas_kernels.platform, "backend_name", lambda a=accelerator: a)
        assert pallas_kernels.auto_backend(1152, 4608, 4, 8) == "pallas"
        assert pallas_kernels.auto_backend(4608, 1152, 8, 8) == "pallas"
        assert pallas_kernels.auto_backend(1152, 1152, 8, 16) == "xla"  # no integer dot
        assert pallas_kernels.auto_backend(48, 144, 8, 8) == "xla"  # narrower than a lane tile
    with pytest.raises(ValueError, match="backend: expected one of"):
        Q.qlinear_apply(q, x, 0, "triton")
