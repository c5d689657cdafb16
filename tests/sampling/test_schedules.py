import numpy as np
import pytest

from tests.sampling import _reference as ref
from trdq_jax.sampling import alphas_cumprod, make_betas, respaced_betas, space_timesteps


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 250, 4000])
def test_betas_and_alphas_cumprod_match_reference(schedule, T):
    b = make_betas(schedule, T)
    assert b.dtype == np.float64 and b.shape == (T,)
    np.testing.assert_allclose(b, ref.betas(schedule, T), rtol=1e-12, atol=0)
    np.testing.assert_allclose(alphas_cumprod(b), ref.alphas_cumprod(b), rtol=1e-12)


def test_known_schedule_values():
    lin = make_betas("linear", 1000)
    assert lin[0] == pytest.approx(1e-4, abs=1e-15) and lin[-1] == pytest.approx(0.02, abs=1e-15)
    assert make_betas("linear", 500)[-1] == pytest.approx(0.04, abs=1e-15)
    cos = make_betas("cosine", 1000)
    assert cos[-1] == pytest.approx(0.999) and cos.max() <= 0.999
    # IDDPM's cosine alpha_bar after T/2 steps: f(0.5) / f(0), f(s) = cos((s+0.008)/1.008 * pi/2)^2
    half = np.cos((0.5 + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    assert alphas_cumprod(cos)[499] == pytest.approx(half, rel=1e-12)


def test_space_timesteps_matches_iddpm():
    assert space_timesteps(1000, 20).tolist() == [0, 53, 105, 158, 210, 263, 315, 368, 421, 473,
                                                  526, 578, 631, 684, 736, 789, 841, 894, 946, 999]
    for T, counts in [(1000, [1, 2, 3, 10, 21, 27, 50, 100, 250, 999, 1000]), (400, [7, 33, 399])]:
        for n in counts:
            got = space_timesteps(T, n)
            assert got.tolist() == ref.space_timesteps(T, n), (T, n)
            assert len(got) == n


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_betas_reproduce_kept_alphas_cumprod(schedule):
    b = make_betas(schedule, 1000)
    for n in (1, 20, 250):
        ts = space_timesteps(1000, n)
        got = respaced_betas(b, ts)
        np.testing.assert_allclose(got, ref.respaced_betas(b, ts), rtol=1e-12)
        np.testing.assert_allclose(ref.alphas_cumprod(got), ref.alphas_cumprod(b)[ts], rtol=1e-9)


def test_schedule_validation():
    with pytest.raises(ValueError, match="schedule"):
        make_betas("quadratic", 1000)
    with pytest.raises(ValueError, match="num_train_steps"):
        make_betas("linear", 0)
    with pytest.raises(ValueError, match="num_steps"):
        space_timesteps(100, 101)
    with pytest.raises(ValueError, match="betas"):
        alphas_cumprod(np.array([0.1, 1.5]))
    with pytest.raises(ValueError, match="timesteps"):
        respaced_betas(make_betas("linear", 100), np.array([5, 3]))
    with pytest.raises(ValueError, match="timesteps"):
        respaced_betas(make_betas("linear", 100), np.array([0, 100]))
