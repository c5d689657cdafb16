"""End to end: every solver with the exact denoiser of Gaussian data recovers that Gaussian.

Data x0 ~ N(MU, STD^2) per dimension. The exact denoisers are closed form, and because they are
affine in x every solver is an affine map of the initial noise plus Gaussian step noise, so the
exact mean and variance of each discrete solver's output follow from the float64 reference loops
(``_solver_moments``). Each test checks the sampled statistics against those moments (sampling
error only) and the moments against MU, STD^2 (discretisation error).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.sampling import _reference as ref
from trdq_jax.config import SamplerConfig
from trdq_jax.sampling import Sampler, sample

MU = np.array([0.5, -1.0, 2.0, 0.0])
STD = np.array([0.6, 1.0, 0.4, 1.5])
PARAMS = {"mu": jnp.asarray(MU, jnp.float32), "std": jnp.asarray(STD, jnp.float32)}
ABAR = ref.alphas_cumprod(ref.betas("linear", 1000))
NUM = 16384


def _eps_np(x, t, i):
    """E[eps | x_t] for x_t = a x0 + sigma eps: Cov(eps, x_t) = sigma,
    Var x_t = a^2 std^2 + sigma^2."""
    abar = ABAR[int(t)]
    return np.sqrt(1 - abar) * (x - np.sqrt(abar) * MU) / (abar * STD ** 2 + 1 - abar)


def _velocity_np(x, t, i):
    """E[eps - x0 | x_s] on the rectified-flow path x_s = (1 - s) x0 + s eps, s = t / 1000."""
    s = t / 1000
    return -MU + (s - (1 - s) * STD ** 2) * (x - (1 - s) * MU) / ((1 - s) ** 2 * STD ** 2 + s ** 2)


def _gaussian_eps(params, x, t, y, segment, share_cfg):
    abar = jnp.asarray(ABAR, jnp.float32)[t.astype(jnp.int32)][:, None]
    return jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * params["mu"]) / (
        abar * params["std"] ** 2 + 1 - abar)


def _gaussian_velocity(params, x, t, y, segment, share_cfg):
    s = (t / 1000.0)[:, None]
    mu, var = params["mu"], params["std"] ** 2
    return -mu + (s - (1 - s) * var) * (x - (1 - s) * mu) / ((1 - s) ** 2 * var + s ** 2)


def _learned_sigma_tables(num_steps):
    """Per training step: the exact reverse variance ``posterior_var + coef_x0^2 Var[x0 | x_t]``
    expressed as IDDPM's v, so DDPM with learned sigma is exact in distribution at any step
    count. float64 ``[1000, 4]``."""
    ts, abar, prev, beta = ref.chain("linear", 1000, num_steps)
    post_var = beta * (1 - prev) / (1 - abar)
    min_log, max_log = np.log(np.append(post_var[1], post_var[1:])), np.log(beta)
    coef_x0 = beta * np.sqrt(prev) / (1 - abar)
    var_x0 = STD[:, None] ** 2 * (1 - abar) / (abar * STD[:, None] ** 2 + 1 - abar)  # [4, N]
    frac = (np.log(post_var + coef_x0 ** 2 * var_x0) - min_log) / (max_log - min_log)
    v_table = np.zeros((1000, 4))
    v_table[ts] = (2 * frac - 1).T
    return v_table


def _learned_sigma_model(v_table):
    table = jnp.asarray(v_table, jnp.float32)

    def apply_fn(params, x, t, y, segment, share_cfg):
        v = table[t.astype(jnp.int32)]
        return jnp.concatenate([_gaussian_eps(params, x, t, y, segment, share_cfg), v], -1)
    return apply_fn


def _solver_moments(loop, num_steps):
    """Exact mean and variance of an affine reference loop started from N(0, I) noise.

    Runs the loop on a batch of basis inputs: row 0 all zero, row 1 x_T = 1, row 2+i z_i = 1.
    """
    rows = num_steps + 2
    x = np.zeros((rows, 4))
    x[1] = 1
    zs = np.zeros((num_steps, rows, 4))
    zs[np.arange(num_steps), 2 + np.arange(num_steps)] = 1
    out = loop(x, zs)[-1]
    gain = out - out[0]
    return out[0], gain[1] ** 2 + (gain[2:] ** 2).sum(0)


def _draw(apply_fn, solver, num_steps, eta=0.0, num=NUM):
    sampler = Sampler.from_config(SamplerConfig(solver=solver, num_steps=num_steps, eta=eta))
    x = sample(apply_fn, PARAMS, sampler, np.zeros(num, np.int32), seed=0, cfg_scale=1.0,
               null_label=1, shape=(num, 4))
    return np.asarray(x, np.float64)


def _check(x, mean, var, bias_rtol):
    # sampling error of the mean (4.5 standard errors) and of the variance (sqrt(2/n) relative)
    assert np.all(np.abs(x.mean(0) - mean) < 4.5 * np.sqrt(var / NUM)), (x.mean(0), mean)
    np.testing.assert_allclose(x.var(0), var, rtol=4.5 * np.sqrt(2 / NUM))
    # the solver's own discretisation error; the VP mean is also off by about sqrt(abar_T) * MU =
    # 0.006 * MU because sampling starts from N(0, I) rather than N(sqrt(abar_T) MU, ...)
    assert np.all(np.abs(mean - MU) < 0.01), (mean, MU)
    np.testing.assert_allclose(var, STD ** 2, rtol=bias_rtol)


@pytest.mark.parametrize("solver,num_steps,eta,bias_rtol", [
    ("ddpm", 250, 0.0, 0.03),            # fixed-large variance
    ("ddim", 1000, 1.0, 0.03),           # eta = 1: fixed-small variance
    ("ddim", 200, 0.0, 0.04),
    ("dpm_solver_pp_2m", 100, 0.0, 0.05),
])
def test_eps_solvers_recover_the_gaussian(solver, num_steps, eta, bias_rtol):
    loops = {"ddpm": lambda x, zs: ref.ddpm_loop("linear", num_steps, x, _eps_np, zs, False),
             "ddim": lambda x, zs: ref.ddim_loop("linear", num_steps, eta, x, _eps_np, zs),
             "dpm_solver_pp_2m": lambda x, zs: ref.dpm_pp_2m_loop("linear", num_steps, x, _eps_np)}
    mean, var = _solver_moments(loops[solver], num_steps)
    _check(_draw(_gaussian_eps, solver, num_steps, eta), mean, var, bias_rtol)


def test_ddpm_with_exact_learned_variance_is_exact_in_few_steps():
    v_table = _learned_sigma_tables(10)
    model_np = lambda x, t, i: (_eps_np(x, t, i), v_table[int(t)])  # noqa: E731
    mean, var = _solver_moments(
        lambda x, zs: ref.ddpm_loop("linear", 10, x, model_np, zs, True), 10)
    _check(_draw(_learned_sigma_model(v_table), "ddpm", 10), mean, var, bias_rtol=1e-3)


def test_flow_euler_recovers_the_gaussian():
    mean, var = _solver_moments(lambda x, zs: ref.flow_euler_loop(200, x, _velocity_np), 200)
    _check(_draw(_gaussian_velocity, "flow_euler", 200), mean, var, bias_rtol=0.035)


@pytest.mark.parametrize("solver,order", [("ddim", 1), ("dpm_solver_pp_2m", 2), ("flow_euler", 1)])
def test_ode_solvers_converge_to_the_exact_transport_map_at_their_order(solver, order):
    """For Gaussian data the probability-flow ODE maps noise z to MU + STD * z' per sample, with
    z' = (z - a_T MU) / sqrt(a_T^2 STD^2 + 1 - a_T^2) (a_T = 0 on the flow path)."""
    num = 256
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(num))
    z = np.asarray(jax.vmap(lambda k: jax.random.normal(k, (4,)))(keys), np.float64)
    if solver == "flow_euler":
        model, ideal = _gaussian_velocity, MU + STD * z
    else:
        a2 = ABAR[999]
        model = _gaussian_eps
        ideal = MU + STD * (z - np.sqrt(a2) * MU) / np.sqrt(a2 * STD ** 2 + 1 - a2)
    errors = [np.abs(_draw(model, solver, n, num=num) - ideal).max() for n in (100, 200)]
    assert errors[1] < 0.05 * STD.max()
    np.testing.assert_allclose(errors[0] / errors[1], 2.0 ** order, rtol=0.2)


def _gaussian_v(params, x, t, y, segment, share_cfg):
    """The exact denoiser as a v-prediction model: v = (eps - sqrt(1 - abar) x) / sqrt(abar)."""
    abar = jnp.asarray(ABAR, jnp.float32)[t.astype(jnp.int32)][:, None]
    eps = _gaussian_eps(params, x, t, y, segment, share_cfg)
    return (eps - jnp.sqrt(1 - abar) * x) / jnp.sqrt(abar)


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpm_solver_pp_2m"])
def test_v_prediction_tables_reproduce_the_eps_samples(solver):
    # A v-model and an eps-model of one denoiser must give the same samples from the same noise.
    def draw(apply_fn, prediction):
        sampler = Sampler.from_config(SamplerConfig(solver=solver, num_steps=25,
                                                    prediction=prediction))
        return np.asarray(sample(apply_fn, PARAMS, sampler, np.zeros(256, np.int32), seed=3,
                                 cfg_scale=1.0, null_label=1, shape=(256, 4)))
    eps_samples = draw(_gaussian_eps, "epsilon")
    np.testing.assert_allclose(draw(_gaussian_v, "v"), eps_samples, atol=2e-3)
    assert np.abs(draw(_gaussian_v, "epsilon") - eps_samples).max() > 0.1  # tables do matter
