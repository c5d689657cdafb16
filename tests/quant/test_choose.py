"""Choosing components by the held-out trajectory error: the guided outputs are exactly what
the sampler steps with (DDIM: the next trajectory input follows from them), the error is a
relative mean square, and the walk keeps a change only when it lowers that error."""
import jax
import numpy as np
import pytest

import trdq_jax.quant as Q
from trdq_jax.models import input_shape
from trdq_jax.quant.calibrate import derive_calibration
from trdq_jax.quant.choose import (ANCHORS, choose_components, float_trajectories, guided_outputs,
                                   trajectory_error)
from trdq_jax.sampling import Sampler, denoise_fn_for, sample
from tests.test_quant_cli import TINY


@pytest.fixture(scope="module")
def setup(tiny_calibrated):
    model, params, calibrate_for = tiny_calibrated
    sampler = Sampler.from_config(TINY.sampler)
    calib = calibrate_for(Q.get_recipe("minmax", 8, 8))
    traj = float_trajectories(model, params, sampler, shape=input_shape(TINY.model, 3), seed=9,
                              labels=np.arange(3), null_label=3)
    return model, params, sampler, calib, traj


def test_guided_outputs_are_what_the_sampler_steps_with(setup):
    model, params, sampler, _, traj = setup
    assert TINY.sampler.solver == "ddim" and not sampler.stochastic
    guided = np.asarray(guided_outputs(denoise_fn_for(model), params, traj, sampler))
    xs = np.asarray(traj.xs)
    assert guided.shape == xs.shape
    for i in range(sampler.num_steps - 1):  # DDIM (eta 0): x_{i+1} = a_i x_i + b_i guided_i
        want = (np.asarray(sampler.x_coef)[i] * xs[i] + np.asarray(sampler.out_coef)[i] * guided[i])
        np.testing.assert_allclose(xs[i + 1], want, rtol=1e-4, atol=1e-5)


def test_trajectory_error_is_relative_mean_square():
    ref = np.array([[1.0, -1.0], [2.0, 0.0]])
    out = ref + np.array([[0.5, 0.0], [0.0, -0.5]])
    assert trajectory_error(out, ref) == pytest.approx((0.25 + 0.25) / 4 / (6.0 / 4))


def test_sample_error_ratios_are_mean_psnr_differences():
    """10 log10(e_a / e_b) equals mean per-sample PSNR of b minus a's (metrics.psnr), for
    images and for videos (one PSNR per video, its frames stacked, as bench_quant scores
    them); neither the pooled mean square nor a per-frame mean would."""
    from trdq_jax.eval.metrics import psnr
    from trdq_jax.quant.choose import sample_error
    rng = np.random.default_rng(0)
    for shape in [(6, 8, 8, 1), (3, 4, 8, 8, 1)]:
        ref = rng.uniform(-0.9, 0.9, shape)
        # errors that differ a lot between samples and, in a video, between frames
        spread = np.geomspace(0.001, 0.05, int(np.prod(shape[:-3]))).reshape(
            shape[:-3] + (1, 1, 1))
        a, b = ref + spread * rng.normal(size=shape), ref + 0.02 * rng.normal(size=shape)
        stacked = (lambda v: v.reshape(v.shape[0], -1, *v.shape[-2:])) if len(shape) == 5 \
            else (lambda v: v)
        gain = psnr(stacked(b), stacked(ref))[1] - psnr(stacked(a), stacked(ref))[1]
        assert 10 * np.log10(sample_error(a, ref) / sample_error(b, ref)) == pytest.approx(
            gain, rel=1e-9)
        pooled = 10 * np.log10(trajectory_error(a, ref) / trajectory_error(b, ref))
        assert abs(pooled - gain) > 0.5
        if len(shape) == 5:
            per_frame = psnr(b, ref)[1] - psnr(a, ref)[1]
            assert abs(per_frame - gain) > 0.5
        per_sample = np.mean((a - ref) ** 2, axis=tuple(range(1, a.ndim)))
        geometric_mean = np.prod(per_sample) ** (1 / len(per_sample))
        assert sample_error(a, ref) == pytest.approx(geometric_mean / np.mean(ref ** 2),
                                                     rel=1e-12)
    assert 0 < sample_error(ref, ref) < 1e-29
    assert sample_error(np.where(ref > 0.8, np.nan, ref), ref) == float("inf")
    from trdq_jax.quant.choose import gain_and_se, sample_db
    with_nan = sample_db(np.where(ref > 0.8, np.nan, ref), ref)
    assert np.isinf(with_nan).any() and np.all(np.isnan(gain_and_se(with_nan, with_nan)))


def test_walk_keeps_only_changes_that_lower_the_error(setup):
    model, params, sampler, calib, traj = setup
    base = Q.get_recipe("minmax", 4, 4)  # static per-tensor 4-bit activations: poor
    steps = {"dynamic_rotated": {"a_mode": "dynamic", "rotation": "hadamard"},
             "two_bits": {"w_bits": 2}, "nothing": {}}
    choice = choose_components(model, params, calib, base, sampler, traj, steps=steps,
                               anchors={}, judge="teacher_forced")
    assert list(choice.errors) == ["base", "dynamic_rotated", "dynamic_rotated+two_bits"]
    assert choice.errors["dynamic_rotated"] < choice.errors["base"]
    assert choice.errors["dynamic_rotated+two_bits"] > choice.errors["dynamic_rotated"]
    assert (choice.recipe.a_mode, choice.recipe.rotation, choice.recipe.w_bits) == (
        "dynamic", "hadamard", 4)
    # the winner's error, recomputed from its own quantized model
    out = guided_outputs(Q.QuantizedDenoiser(model, "xla"), choice.qparams, traj,
                         sampler.with_segments(choice.calib.segment_of_step,
                                               choice.calib.num_segments))
    ref = guided_outputs(denoise_fn_for(model), params, traj, sampler)
    assert trajectory_error(out, ref) == pytest.approx(choice.errors["dynamic_rotated"],
                                                       rel=1e-6)
    assert jax.tree.leaves(choice.qparams)


def _per_image_errors(model, params, calib, recipe, sampler, traj, seed=9):
    """Each image's squared error relative to the reference's mean square, of the recipe's
    final samples, drawn from the held-out noise (``seed``) by the plain sampler, against the
    float model's samples drawn here too."""
    c = derive_calibration(calib, recipe, sampler)
    q = Q.quantize(params, c, recipe)
    given = {"seed": seed, "shape": input_shape(TINY.model, 3),
             "cfg_scale": TINY.sampler.cfg_scale, "null_label": 3}
    out = sample(Q.QuantizedDenoiser(model, "xla"), q,
                 sampler.with_segments(c.segment_of_step, c.num_segments), np.arange(3), **given)
    want = sample(denoise_fn_for(model), params, sampler, np.arange(3), **given)
    np.testing.assert_allclose(np.asarray(traj.final), np.asarray(want), rtol=1e-5, atol=1e-5)
    per_image = np.mean((np.asarray(out, np.float64) - np.asarray(want, np.float64)) ** 2,
                        axis=(1, 2, 3)) / np.mean(np.asarray(want, np.float64) ** 2)
    return per_image  # each image's relative error


def _error_of(model, params, calib, recipe, sampler, traj):
    """The geometric mean over images of ``_per_image_errors``."""
    per_image = _per_image_errors(model, params, calib, recipe, sampler, traj)
    return float(np.prod(per_image) ** (1 / len(per_image)))


def test_anchors_are_the_published_baselines_and_the_choice_is_never_worse(setup):
    """Each anchor, applied to any base, is exactly the baseline recipe of its name (same
    error computed independently), the choice starts from the best of them, and each
    anchor's reported gain over the base is the mean +- standard error of the per-image dB
    differences."""
    model, params, sampler, calib, traj = setup
    base = Q.get_recipe("minmax", 4, 4)
    choice = choose_components(model, params, calib, base, sampler, traj, steps={}, margin_db=0,
                               margin_se=0)
    baselines = {"quarot": Q.get_recipe("quarot", 4, 4),
                 "viditq_gptq": Q.get_recipe("viditq", 4, 4, gptq=True),
                 "trdq_static": Q.get_recipe("trdq_static", 4, 4)}
    assert set(ANCHORS) == set(baselines)
    db = {name: 10 * np.log10(_per_image_errors(model, params, calib, recipe, sampler, traj))
          for name, recipe in {"base": base, **baselines}.items()}
    assert choice.errors["base"] == pytest.approx(10 ** (np.mean(db["base"]) / 10), rel=1e-6)
    for name in baselines:
        assert choice.errors[f"anchor:{name}"] == pytest.approx(10 ** (np.mean(db[name]) / 10),
                                                                rel=1e-6)
        diff = db["base"] - db[name]
        gain, se = choice.gains[f"anchor:{name}"]
        assert gain == pytest.approx(np.mean(diff), abs=1e-6)
        assert se == pytest.approx(np.std(diff, ddof=1) / np.sqrt(len(diff)), rel=1e-5)
    best = min(choice.errors, key=choice.errors.get)
    assert choice.errors[best] == min(choice.errors.values())
    assert _error_of(model, params, calib, choice.recipe, sampler, traj) == pytest.approx(
        choice.errors[best], rel=1e-6)


def test_a_change_must_win_by_the_margin(setup):
    """A change that lowers the error by d dB replaces the choice under a margin below d and
    not under one above it; a negative margin is refused."""
    model, params, sampler, calib, traj = setup
    base = Q.get_recipe("minmax", 4, 4)
    steps = {"dynamic_rotated": {"a_mode": "dynamic", "rotation": "hadamard"}}
    kwargs = {"steps": steps, "anchors": {}, "judge": "teacher_forced"}
    free = choose_components(model, params, calib, base, sampler, traj, margin_db=0, **kwargs)
    gain_db = 10 * np.log10(free.errors["base"] / free.errors["dynamic_rotated"])
    assert gain_db > 0.2 and free.label == "dynamic_rotated"
    below = choose_components(model, params, calib, base, sampler, traj,
                              margin_db=gain_db - 0.1, **kwargs)
    above = choose_components(model, params, calib, base, sampler, traj,
                              margin_db=gain_db + 0.1, **kwargs)
    assert below.label == "dynamic_rotated" and below.recipe.rotation == "hadamard"
    assert above.label == "base" and above.recipe == base
    assert above.errors == pytest.approx(free.errors)
    with pytest.raises(ValueError, match=r"^margin_db: expected a number >= 0 \(dB\), got -1"):
        choose_components(model, params, calib, base, sampler, traj, margin_db=-1, **kwargs)


def test_a_change_must_win_by_its_standard_errors_too(setup):
    """With margin_se = z the win over the current choice must exceed margin_db + z x the
    standard error of its per-sample gain: replaced under a z below (gain - margin) / SE, kept
    above it; a negative z is refused."""
    model, params, sampler, calib, traj = setup
    base = Q.get_recipe("minmax", 4, 4)
    kwargs = {"steps": {"dynamic_rotated": {"a_mode": "dynamic", "rotation": "hadamard"}},
              "anchors": {}, "margin_db": 0.05}
    free = choose_components(model, params, calib, base, sampler, traj, margin_se=0, **kwargs)
    gain, se = free.gains["dynamic_rotated"]
    assert free.label == "dynamic_rotated" and gain > 0.05 and se > 0
    z = (gain - 0.05) / se
    below = choose_components(model, params, calib, base, sampler, traj, margin_se=0.9 * z,
                              **kwargs)
    above = choose_components(model, params, calib, base, sampler, traj, margin_se=1.1 * z,
                              **kwargs)
    assert below.label == "dynamic_rotated" and above.label == "base" and above.recipe == base
    assert above.gains == free.gains
    with pytest.raises(ValueError, match=r"^margin_se: expected a number >= 0 \(standard "
                                         r"errors\), got -1"):
        choose_components(model, params, calib, base, sampler, traj, margin_se=-1, **kwargs)


def test_a_change_is_confirmed_on_further_samples(setup):
    """With ``confirm`` a change that wins on the held-out samples is taken only when its
    gain over the current choice, on both sets of samples pooled (per-image dB differences
    computed here independently), passes the same rule: taken under a z below the pooled
    (gain - margin) / SE, refused above it; a change that loses on the held-out samples
    never reaches the confirmation; confirm needs the samples judge and final samples."""
    model, params, sampler, calib, traj = setup
    other = float_trajectories(model, params, sampler, shape=input_shape(TINY.model, 3),
                               seed=11, labels=np.arange(3), null_label=3)
    base = Q.get_recipe("minmax", 4, 4)
    change = {"a_mode": "dynamic", "rotation": "hadamard"}
    kwargs = {"steps": {"dynamic_rotated": change}, "anchors": {}, "margin_db": 0.05}
    free = choose_components(model, params, calib, base, sampler, traj, margin_se=0,
                             confirm=other, **kwargs)
    assert free.label == "dynamic_rotated"
    candidate = Q.get_recipe("minmax", 4, 4, **change)
    diff = np.concatenate([
        10 * np.log10(_per_image_errors(model, params, calib, base, sampler, other, seed)
                      / _per_image_errors(model, params, calib, candidate, sampler, other, seed))
        for seed, other in ((9, traj), (11, other))])
    gain, se, taken = free.confirmations["dynamic_rotated"]
    assert taken and gain == pytest.approx(np.mean(diff), abs=1e-5)
    assert se == pytest.approx(np.std(diff, ddof=1) / np.sqrt(len(diff)), rel=1e-4)
    assert gain > 0.05 and se > 0
    z = (gain - 0.05) / se
    screen_gain, screen_se = free.gains["dynamic_rotated"]
    # a z that the held-out samples alone pass but the pooled ones do not (or the reverse)
    below = choose_components(model, params, calib, base, sampler, traj, margin_se=0.9 * z,
                              confirm=other, **kwargs)
    above = choose_components(model, params, calib, base, sampler, traj, margin_se=1.1 * z,
                              confirm=other, **kwargs)
    assert below.label == "dynamic_rotated"
    assert above.label == "base" and above.recipe == base
    if (screen_gain - 0.05) / screen_se > 1.1 * z:  # passed the screen, refused when pooled
        assert above.confirmations["dynamic_rotated"][2] is False
    losing = choose_components(model, params, calib, candidate, sampler, traj, margin_se=0,
                               confirm=other, steps={"static_plain": {"a_mode": "static",
                                                                      "rotation": "none"}},
                               anchors={}, margin_db=0.05)
    assert losing.label == "base" and losing.confirmations == {}
    with pytest.raises(ValueError, match=r"^confirm: re-judges changes on further samples; "
                                         r"judge='teacher_forced' does not sample"):
        choose_components(model, params, calib, base, sampler, traj, confirm=other,
                          judge="teacher_forced", **kwargs)
    with pytest.raises(ValueError, match=r"^confirm: expected float_trajectories' output"):
        choose_components(model, params, calib, base, sampler, traj, confirm=other.xs,
                          **kwargs)


def test_a_bad_judge_is_refused(setup):
    model, params, sampler, calib, traj = setup
    with pytest.raises(ValueError, match=r"^judge: expected 'samples' or 'teacher_forced', got "
                                         r"'psnr'"):
        choose_components(model, params, calib, Q.get_recipe("minmax"), sampler, traj,
                          judge="psnr")


def test_candidates_the_sampler_cannot_take_are_skipped(setup, monkeypatch):
    """A 6-step sampler holds 2 segments of at least 3 steps, not 2 of 4 nor 8 segments; the
    compiled programs are checked against the map limit before each candidate scored."""
    from trdq_jax import compile_cache
    checks = []
    monkeypatch.setattr(compile_cache, "release_programs_near_map_limit",
                        lambda: checks.append(1) or False)
    model, params, sampler, calib, traj = setup
    base = Q.get_recipe("trdq", 8, 8)
    steps = {"8": {"num_segments": 8}, "2x4": {"num_segments": 2, "min_segment_steps": 4},
             "2x3": {"num_segments": 2, "min_segment_steps": 3}}
    choice = choose_components(model, params, calib, base, sampler, traj, steps=steps,
                               anchors={})
    assert set(choice.errors) <= {"base", "2x3"} and "2x3" in choice.errors
    assert len(checks) == len(choice.errors)
    if choice.recipe.num_segments == 2:
        assert np.bincount(choice.calib.segment_of_step).min() >= 3


def test_a_byte_budget_excludes_larger_candidates(setup):
    """With a branch the layers hold more bytes and err less; under a budget between the two
    the branch cannot win, and a budget nothing fits is an error naming the smallest ratio."""
    model, params, sampler, calib, traj = setup
    base = Q.get_recipe("quarot", 4, 4, low_rank=8)
    steps = {"no_branch": {"low_rank": 0}}
    free = choose_components(model, params, calib, base, sampler, traj, steps=steps, anchors={})
    small, large = free.ratios["no_branch"], free.ratios["base"]
    assert small < large and free.errors["base"] < free.errors["no_branch"]
    assert free.label == "base" and free.recipe.low_rank == 8
    paths = Q.quantized_layer_paths(free.qparams)
    assert large == pytest.approx(Q.weight_bytes(free.qparams)["quantized_layers"]
                                  / Q.float_bytes_of(params, paths))
    budget = choose_components(model, params, calib, base, sampler, traj, steps=steps,
                               anchors={}, max_ratio=(small + large) / 2)
    assert budget.label == "no_branch" and budget.recipe.low_rank == 0
    assert budget.errors == pytest.approx(free.errors)
    with pytest.raises(ValueError, match=rf"^max_ratio: no candidate fits 0.1 x bf16 \(the "
                                         rf"smallest holds {small:.4f} x\)"):
        choose_components(model, params, calib, base, sampler, traj, steps=steps, anchors={},
                          max_ratio=0.1)
    with pytest.raises(ValueError, match=r"^max_ratio: expected a positive number"):
        choose_components(model, params, calib, base, sampler, traj, max_ratio=0)


def test_under_a_budget_the_rank_is_chosen_too(setup, monkeypatch):
    """The default steps include the branch's rank only with a byte budget; a rank some layer
    cannot hold (above its min(K, N) = 48 here) is skipped, not an error."""
    model, params, sampler, calib, traj = setup
    import trdq_jax.quant.choose as choose
    base = Q.get_recipe("quarot", 4, 4)
    monkeypatch.setattr(choose, "COMPONENT_STEPS", {"no_rotation": {"rotation": "none"}})
    monkeypatch.setattr(choose, "RANK_STEPS", {"rank_8": {"low_rank": 8},
                                               "rank_64": {"low_rank": 64}})
    free = choose.choose_components(model, params, calib, base, sampler, traj, anchors={})
    assert set(free.errors) <= {"base", "no_rotation"}
    budget = choose.choose_components(model, params, calib, base, sampler, traj, anchors={},
                                      max_ratio=10.0, margin_db=0, margin_se=0)
    tried = {key.rsplit("+", 1)[-1] for key in budget.errors}
    assert "rank_8" in tried and "rank_64" not in tried
    assert budget.recipe.low_rank == 8  # a branch errs less, and the budget allows it
    assert budget.ratios[budget.label] > budget.ratios["base"]
