"""``denoise_fn_for`` drives a real (tiny) DiT through the scan sampler."""
import jax
import jax.numpy as jnp
import numpy as np

from tests.sampling import _reference as ref
from trdq_jax.config import DiTConfig, SamplerConfig
from trdq_jax.models import build_model, init_params
from trdq_jax.sampling import Sampler, denoise_fn_for, sample, scan_sampler

CFG = DiTConfig(input_size=4, in_channels=2, patch_size=2, hidden_size=16, depth=1, num_heads=2,
                num_classes=3, learn_sigma=True)


@jax.jit
def _perturbed_params():
    """DiT zero-initialises its output layers; perturb every leaf so the output depends on
    x, t and y. (Jitted: eager init compiles every op separately and takes seconds.)"""
    params = init_params(CFG, jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape, p.dtype)
                                     for p, k in zip(leaves, keys)])


@jax.jit(static_argnums=(1, 2, 3))
def _documented_noise(seed, num, steps, sample_shape):
    """k_i = fold_in(key(seed), i); initial noise normal(k_i), step s noise normal(fold_in(k_i, s))."""
    keys = [jax.random.fold_in(jax.random.key(seed), i) for i in range(num)]
    x_t = jnp.stack([jax.random.normal(k, sample_shape) for k in keys])
    zs = jnp.stack([jnp.stack([jax.random.normal(jax.random.fold_in(k, s), sample_shape)
                               for k in keys]) for s in range(steps)])
    return x_t, zs


def test_dit_sampling_matches_a_float64_ddpm_loop_and_reuses_the_compiled_program():
    model, params = build_model(CFG), _perturbed_params()
    n, w, labels = 4, 2.0, np.array([0, 2])
    sampler = Sampler.from_config(SamplerConfig(solver="ddpm", num_steps=n))
    shape = (2, 4, 4, 2)
    # counted from an empty cache: what earlier tests compiled (or evicted, the cache is
    # bounded) does not change the count
    scan_sampler._sample_scan.clear_cache()
    before = scan_sampler._sample_scan._cache_size()
    got = sample(denoise_fn_for(model), params, sampler, labels, seed=4, cfg_scale=w,
                 null_label=3, shape=shape)
    again = sample(denoise_fn_for(build_model(CFG)), params, sampler, labels, seed=4,
                   cfg_scale=w + 1, null_label=3, shape=shape)
    assert scan_sampler._sample_scan._cache_size() == before + 1  # equal models share a program
    assert np.abs(np.asarray(again) - np.asarray(got)).max() > 1e-3

    apply = jax.jit(model.apply)

    def model_np(x, t, i):  # the model itself, called per branch, guidance in float64
        def call(y):
            out = apply({"params": params}, np.float32(x), np.full(2, t, np.float32),
                        np.int32(y))
            return np.asarray(out, np.float64)
        cond, uncond = call(labels), call(np.full(2, 3))
        return uncond[..., :2] + w * (cond[..., :2] - uncond[..., :2]), cond[..., 2:]

    x_t, zs = (np.asarray(a, np.float64) for a in _documented_noise(4, 2, n, shape[1:]))
    want = ref.ddpm_loop("linear", n, x_t, model_np, zs, learned=True)[-1]
    assert np.abs(want).max() > 0.1
    assert got.shape == shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
