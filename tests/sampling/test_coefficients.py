"""Per-step solver tables against textbook float64 update rules (IDDPM, DDIM, DPM-Solver++)."""
import numpy as np
import pytest

from tests.sampling import _reference as ref
from trdq_jax.config import SamplerConfig
from trdq_jax.sampling import Sampler

DIM = 6


def _tables(sampler):
    return {k: np.asarray(getattr(sampler, k), np.float64) for k in (
        "x_coef", "out_coef", "prev_x0_coef", "x0_from_x", "x0_from_out", "noise_scale",
        "log_var_min", "log_var_max", "fixed_log_var")}


def _run_tables(sampler, x, outs, zs, vs, learned):
    """The documented affine update, in float64, with given model outputs and noise."""
    c, x0_prev, trajectory = _tables(sampler), np.zeros_like(x), []
    for i in range(sampler.num_steps):
        out = outs[i]
        x0 = c["x0_from_x"][i] * x + c["x0_from_out"][i] * out
        x_next = c["x_coef"][i] * x + c["out_coef"][i] * out + c["prev_x0_coef"][i] * x0_prev
        if learned:
            frac = (vs[i] + 1) / 2
            log_var = frac * c["log_var_max"][i] + (1 - frac) * c["log_var_min"][i]
        else:
            log_var = c["fixed_log_var"][i]
        x = x_next + c["noise_scale"][i] * np.exp(0.5 * log_var) * zs[i]
        x0_prev = x0
        trajectory.append(x)
    return trajectory


def _inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=DIM), rng.normal(size=(n, DIM)), rng.normal(size=(n, DIM)),
            rng.uniform(-1, 1, size=(n, DIM)))


def _assert_trajectories(got, want):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * (1 + np.abs(w).max()),
                                   err_msg=f"step {i}")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("n", [1, 2, 3, 20, 50])
def test_eps_solver_tables_match_textbook_updates(schedule, n):
    x, outs, zs, vs = _inputs(n)
    given = lambda x_, t, i: outs[i]  # noqa: E731 (model outputs fixed in advance)
    given_learned = lambda x_, t, i: (outs[i], vs[i])  # noqa: E731
    for learned in (False, True):
        s = Sampler.from_config(SamplerConfig(solver="ddpm", num_steps=n, schedule=schedule))
        _assert_trajectories(_run_tables(s, x, outs, zs, vs, learned), ref.ddpm_loop(
            schedule, n, x, given_learned if learned else given, zs, learned))
    for eta in (0.0, 0.5, 1.0):
        s = Sampler.from_config(SamplerConfig(solver="ddim", num_steps=n, schedule=schedule,
                                              eta=eta))
        assert s.stochastic == (eta > 0 and n > 1)
        for learned in (False, True):  # DDIM ignores the variance channels
            _assert_trajectories(_run_tables(s, x, outs, zs, vs, learned),
                                 ref.ddim_loop(schedule, n, eta, x, given, zs))
    s = Sampler.from_config(SamplerConfig(solver="dpm_solver_pp_2m", num_steps=n,
                                          schedule=schedule))
    assert not s.stochastic
    _assert_trajectories(_run_tables(s, x, outs, zs, vs, False),
                         ref.dpm_pp_2m_loop(schedule, n, x, given))


@pytest.mark.parametrize("n", [1, 7, 20])
def test_flow_euler_tables(n):
    x, outs, zs, vs = _inputs(n, seed=1)
    s = Sampler.from_config(SamplerConfig(solver="flow_euler", num_steps=n, num_train_steps=1000))
    _assert_trajectories(_run_tables(s, x, outs, zs, vs, False),
                         ref.flow_euler_loop(n, x, lambda x_, t, i: outs[i]))
    np.testing.assert_allclose(np.asarray(s.model_time), 1000 * (1 - np.arange(n) / n), rtol=1e-6)
    # the carried data prediction of the flow path x = (1-t) x0 + t eps, v = eps - x0: x0 = x - t v
    np.testing.assert_allclose(np.asarray(s.x0_from_out), -(1 - np.arange(n) / n), rtol=1e-6)


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpm_solver_pp_2m"])
def test_model_time_is_the_kept_training_step(solver):
    s = Sampler.from_config(SamplerConfig(solver=solver, num_steps=20))
    want = ref.space_timesteps(1000, 20)[::-1]
    assert np.asarray(s.train_timesteps).tolist() == want
    np.testing.assert_array_equal(np.asarray(s.model_time), np.array(want, np.float32))
    # the data prediction the DPM carry uses: x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)
    abar = ref.alphas_cumprod(ref.betas("linear", 1000))[want]
    np.testing.assert_allclose(np.asarray(s.x0_from_x), 1 / np.sqrt(abar), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s.x0_from_out), -np.sqrt(1 - abar) / np.sqrt(abar),
                               rtol=1e-6)


def test_uniform_segment_tables():
    def table(num_segments, num_steps=20, solver="ddim"):
        cfg = SamplerConfig(solver=solver, num_steps=num_steps, num_segments=num_segments)
        return np.asarray(Sampler.from_config(cfg).segment_of_step)

    # sampling order: segment 0 holds the first (noisiest) steps sampled
    assert table(20).tolist() == list(range(20))  # every step its own segment
    assert table(4).tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    assert table(1).tolist() == [0] * 20
    assert table(1).dtype == np.int32
    # 10 steps, 3 segments of the axis [0, 1000): boundaries at 333.3 and 666.7
    ts = np.array(ref.space_timesteps(1000, 10)[::-1])
    assert table(3, 10).tolist() == [0 if t >= 667 else 1 if t >= 334 else 2 for t in ts]
    # flow: times 1, 0.9, ..., 0.1 -> training steps 999, 900, ..., 100; 500 is in the upper half
    assert table(2, 10, "flow_euler").tolist() == [0] * 6 + [1] * 4
    # 999, 900, 800 | 700, 600 | 500, 400 | 300, 200 | 100
    assert table(5, 10, "flow_euler").tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4]


def test_custom_segment_table_and_validation():
    cfg = SamplerConfig(solver="ddim", num_steps=6, num_segments=2)
    s = Sampler.from_config(cfg, segment_of_step=[1, 1, 0, 0, 0, 0])
    assert np.asarray(s.segment_of_step).tolist() == [1, 1, 0, 0, 0, 0] and s.num_segments == 2
    s3 = s.with_segments(np.array([2, 2, 1, 1, 0, 0]), 3)
    assert s3.num_segments == 3 and np.asarray(s3.segment_of_step).tolist() == [2, 2, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="segment_of_step"):
        Sampler.from_config(cfg, segment_of_step=[0, 1, 2, 0, 0, 0])
    with pytest.raises(ValueError, match="segment_of_step"):
        Sampler.from_config(cfg, segment_of_step=[0, 1])
    with pytest.raises(ValueError, match="segment_of_step"):
        Sampler.from_config(cfg, segment_of_step=[0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="segment_of_step"):
        s.with_segments([-1, 0, 0, 0, 0, 0], 2)
    with pytest.raises(ValueError, match="num_segments"):
        s.with_segments([0] * 6, 7)
    with pytest.raises(ValueError, match="cfg"):
        Sampler.from_config({"solver": "ddim"})
