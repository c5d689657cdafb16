"""The sampler computes a PixArt's caption projection and cross-attention K/V once per batch,
before its step loop, not at every step; for the float model and for a quantized one (when the
layers involved are the same in every time segment), with the samples of the per-step form.

"Once" is read off the sampler's jaxpr: a dot with a K/V kernel's shape ``[D, 2D]`` outside
every loop (``scan`` / ``while``) runs once; inside one it runs at every step.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from trdq_jax import quant as Q
from trdq_jax.quant.qlinear import ACTIVATION_SLICES
from trdq_jax.config import PixArtConfig, SamplerConfig
from trdq_jax.models.factory import build_model, init_params
from trdq_jax.sampling.scan_sampler import denoise_fn_for, sample
from trdq_jax.sampling.solvers import make_sampler

CFG = PixArtConfig(input_size=8, hidden_size=48, depth=2, num_heads=2, caption_channels=16,
                   max_tokens=6)
SAMPLER = make_sampler(SamplerConfig(num_steps=4, num_segments=2))
N = 3
SHAPE = (N, 8, 8, 4)
KV_KERNEL = (CFG.hidden_size, 2 * CFG.hidden_size)
CAPTION_FC1 = (CFG.caption_channels, CFG.hidden_size)


@pytest.fixture(scope="module")
def model_params():
    params = init_params(CFG, jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))  # every weight non-zero
    params = jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape)
                                       for a, k in zip(leaves, keys)])
    return build_model(CFG), params


def conditions():
    rng = np.random.default_rng(0)
    cond = {"caption": rng.normal(size=(N, 6, 16)).astype(np.float32),
            "mask": np.array([[1] * 6, [1] * 3 + [0] * 3, [1, 0, 0, 0, 0, 0]], np.int32)}
    null = {"caption": rng.normal(size=(6, 16)).astype(np.float32),
            "mask": np.ones((6,), np.int32)}
    return cond, null


def dots_by_place(fn, *args) -> dict:
    """``{"once": [...], "per_step": [...]}``: the kernel shapes (last two dims of the second
    operand) of every ``dot_general`` in ``fn``'s jaxpr, outside / inside loops."""
    found = {"once": [], "per_step": []}

    def walk(jaxpr, in_loop):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                shape = tuple(eqn.invars[1].aval.shape[-2:])
                found["per_step" if in_loop else "once"].append(shape)
            loop = in_loop or eqn.primitive.name in ("scan", "while")
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner, loop)
    walk(jax.make_jaxpr(fn)(*args).jaxpr, False)
    return found


def draw(apply_fn, params):
    cond, null = conditions()
    return sample(apply_fn, params, SAMPLER, cond, null_cond=null, seed=2, cfg_scale=3.0,
                  shape=SHAPE)


def test_float_sampler_hoists_caption_kv_out_of_the_step_loop(model_params):
    model, params = model_params
    hoisted = dots_by_place(lambda p: draw(denoise_fn_for(model), p), params)
    per_step = dots_by_place(lambda p: draw(denoise_fn_for(model, precompute_cond=False), p),
                             params)
    for kernel in (KV_KERNEL, CAPTION_FC1):
        assert (hoisted["once"].count(kernel), hoisted["per_step"].count(kernel)) == (
            CFG.depth if kernel == KV_KERNEL else 1, 0), kernel
        assert (per_step["once"].count(kernel), per_step["per_step"].count(kernel)) == (
            0, CFG.depth if kernel == KV_KERNEL else 1), kernel
    # the self-attention stays in the loop either way
    qkv = (CFG.hidden_size, 3 * CFG.hidden_size)
    assert hoisted["per_step"].count(qkv) == per_step["per_step"].count(qkv) == CFG.depth
    a = np.asarray(draw(denoise_fn_for(model), params))
    b = np.asarray(draw(denoise_fn_for(model, precompute_cond=False), params))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_quantized_sampler_hoists_only_segment_invariant_layers(model_params):
    """The default recipe quantizes the caption-side layers weight-only (one weight copy for
    every segment): hoisted, the same samples. A recipe that quantizes their activations with
    per-segment smoothing keeps them in the loop, so each step uses its segment's scales."""
    model, params = model_params
    cond, null = conditions()
    outputs = {}
    for name, weight_only in (("default", None), ("activations", ("t_embedder", "t_block"))):
        recipe = Q.get_recipe("trdq", 8, 8, num_segments=2, weight_only=weight_only)
        calib = Q.calibrate(model, params, recipe, SAMPLER, cond=cond, null_cond=null,
                            shape=SHAPE, rows_per_step=16)
        qparams = Q.quantize(params, calib, recipe)
        kv = qparams["layers"]["blocks_0"]["cross_attn"]["kv"]
        assert Q.segment_invariant(kv) == (name == "default")
        places = dots_by_place(lambda p: draw(Q.QuantizedDenoiser(model), p), qparams)
        in_loop = places["per_step"].count(KV_KERNEL)
        # a weight-only layer dots its codes once per activation slice (qlinear.sliced_dot)
        dots = CFG.depth * (ACTIVATION_SLICES if name == "default" else 1)
        assert (in_loop, places["once"].count(KV_KERNEL)) == (
            (0, dots) if name == "default" else (dots, 0)), (name, places)
        outputs[name] = (np.asarray(draw(Q.QuantizedDenoiser(model), qparams)),
                         np.asarray(draw(Q.QuantizedDenoiser(model, precompute_cond=False),
                                         qparams)))
    hoisted, per_step = outputs["default"]
    np.testing.assert_allclose(hoisted, per_step, rtol=0, atol=1e-5 * np.abs(per_step).max())
    np.testing.assert_array_equal(*outputs["activations"])  # one program: nothing hoisted


def test_models_without_precompute_cond_are_unchanged():
    """A DiT has no ``precompute_cond``: the conditioning passes through untouched."""
    from trdq_jax.config import DiTConfig
    from trdq_jax.sampling import conditioning
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1,
                    num_heads=2, num_classes=3)
    labels = np.array([0, 2])
    assert conditioning.precompute(build_model(cfg), {"params": {}}, labels) is labels
    assert denoise_fn_for(build_model(cfg)).prepare_cond({}, labels) is labels
