"""sample(..., return_trajectory=True): the model input of every step, checked against the
independent float64 solver loops of ``_reference``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.sampling import _reference as ref
from trdq_jax.config import SamplerConfig
from trdq_jax.sampling import Sampler, sample
from trdq_jax.sampling import scan_sampler

ABAR = ref.alphas_cumprod(ref.betas("linear", 1000))
CLASS_MU = np.array([[1.0, -1.0, 0.5], [-2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
STD = np.array([0.7, 1.2, 0.5])
PARAMS = {"mu": jnp.asarray(CLASS_MU, jnp.float32), "std": jnp.asarray(STD, jnp.float32)}
NULL = 2
LABELS = np.array([0, 1, 2, 1])


def _eps_np(x, t, y):
    abar, mu = ABAR[int(t)], CLASS_MU[y]
    return np.sqrt(1 - abar) * (x - np.sqrt(abar) * mu) / (abar * STD ** 2 + 1 - abar)


def _apply_fn(params, x, t, y, segment, share_cfg):
    """Exact eps of a per-class Gaussian (x: [2N, 3])."""
    abar = jnp.asarray(ABAR, jnp.float32)[t.astype(jnp.int32)][:, None]
    mu, var = params["mu"][y], params["std"] ** 2
    return jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * mu) / (abar * var + 1 - abar)


def _guided_np(w):
    return lambda x, t, i: _eps_np(x, t, NULL) + w * (_eps_np(x, t, LABELS) - _eps_np(x, t, NULL))


def _initial_noise(seed, n):
    return np.asarray([jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), (3,))
                       for i in range(n)], np.float64)


@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_trajectory_holds_every_step_input(eta):
    n_steps, w, seed = 7, 2.5, 4
    sampler = Sampler.from_config(SamplerConfig(solver="ddim", num_steps=n_steps, eta=eta))
    x_final, xs = sample(_apply_fn, PARAMS, sampler, LABELS, seed=seed, cfg_scale=w,
                         null_label=NULL, shape=(len(LABELS), 3), return_trajectory=True)
    assert xs.dtype == jnp.float32 and xs.shape == (n_steps, len(LABELS), 3)
    x_t = _initial_noise(seed, len(LABELS))
    np.testing.assert_allclose(np.asarray(xs[0]), x_t, rtol=0, atol=1e-6)
    zs = [np.asarray([jax.random.normal(jax.random.fold_in(
        jax.random.fold_in(jax.random.key(seed), i), s), (3,)) for i in range(len(LABELS))])
        for s in range(n_steps)]
    states = ref.ddim_loop("linear", n_steps, eta, x_t, _guided_np(w), zs)
    np.testing.assert_allclose(np.asarray(xs[1:]), np.stack(states[:-1]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(x_final), states[-1], rtol=1e-4, atol=1e-4)
    # the default call returns the same final x, alone
    alone = sample(_apply_fn, PARAMS, sampler, LABELS, seed=seed, cfg_scale=w, null_label=NULL,
                   shape=(len(LABELS), 3))
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(x_final))


def test_each_recorded_input_reproduces_the_next_by_one_ddim_step():
    """Independent of the sampler tables: one DDIM(eta=0) update from xs[s] gives xs[s+1]."""
    n_steps, w = 5, 3.0
    sampler = Sampler.from_config(SamplerConfig(solver="ddim", num_steps=n_steps))
    _, xs = sample(_apply_fn, PARAMS, sampler, LABELS, seed=1, cfg_scale=w, null_label=NULL,
                   shape=(len(LABELS), 3), return_trajectory=True)
    ts = ref.space_timesteps(1000, n_steps)[::-1]  # sampling order, noisiest first
    guided = _guided_np(w)
    for s in range(n_steps - 1):
        x = np.asarray(xs[s], np.float64)
        abar, abar_next = ABAR[ts[s]], ABAR[ts[s + 1]]
        eps = guided(x, ts[s], s)
        x0 = (x - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
        want = np.sqrt(abar_next) * x0 + np.sqrt(1 - abar_next) * eps
        np.testing.assert_allclose(np.asarray(xs[s + 1]), want, rtol=1e-4, atol=1e-4)


def test_trajectory_programs_are_cached_and_flag_is_validated():
    sampler = Sampler.from_config(SamplerConfig(solver="ddim", num_steps=3))
    kw = dict(null_label=NULL, shape=(len(LABELS), 3))
    sample(_apply_fn, PARAMS, sampler, LABELS, seed=0, cfg_scale=1.0, return_trajectory=True, **kw)
    before = scan_sampler._sample_scan._cache_size()
    sample(_apply_fn, PARAMS, sampler, LABELS, seed=3, cfg_scale=5.0, return_trajectory=True, **kw)
    assert scan_sampler._sample_scan._cache_size() == before
    with pytest.raises(ValueError, match="return_trajectory"):
        sample(_apply_fn, PARAMS, sampler, LABELS, seed=0, cfg_scale=1.0, return_trajectory=1,
               **kw)
