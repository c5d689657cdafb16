"""Choosing a recipe's components end to end, by what the sampler sees.

Per-layer error on the fitting rows is a poor judge of a component: on the bundled UNet the
searched smoothing lowered every layer's error and cost 1.9 dB end to end. Here a candidate
recipe is judged on samples that none of the fits saw (another seed), by one of two errors:

- ``judge="samples"`` (default): the candidate draws the held-out samples from the same noise
  and conditioning as the float model, and its final samples' error against the float ones
  counts (``sample_error``: the geometric mean over images of their squared error, so that a
  ratio of two errors is exactly the difference of mean per-image PSNR, the benchmarks'
  number; a pooled mean square would be ruled by the few worst samples), errors accumulated
  along the trajectory included;
- ``judge="teacher_forced"``: at every step the float model's input ``x_t`` goes through the
  quantized model, and the error of the guided output (what the solver uses) is averaged over
  steps. Measured on digits-dit W4A4 it misjudged: it preferred dropping the rotation, which
  lost 2.2 dB PSNR end to end (a per-step error that averages out is not the bias that
  accumulates).

::

    traj = float_trajectories(model, params, sampler, labels=..., null_label=..., shape=...,
                              seed=7)                      # held out: not the calibration seed
    choice = choose_components(model, params, calib, base, sampler, traj)
    choice.recipe, choice.errors                           # the winner, {name: error}
    choice.gains                  # {name: (dB over the base, its standard error)}: resolved?

``choose_components`` first scores ``base`` and the fixed block combinations of the published
baselines (``ANCHORS``: QuaRot, ViDiT-Q with GPTQ, static time segments) and starts from the
best; then it walks the component grid one component at a time (``COMPONENT_STEPS``: with or
without smoothing, rotation, 1/2/4/8 time segments of at least 4 steps, clipping ratios, static
or dynamic activations), keeping a change only when it lowers the trajectory error by more
than ``margin_db`` (0.1 dB) and by ``margin_se`` (1) standard errors of its per-sample gain
(a smaller win is within the noise of the held-out estimate; an anchor replaces the base under
the same rule): about ``1 + len(anchors) + len(steps)`` quantizations per round instead of the
whole grid.

How far the choice can be trusted is measured, not assumed (BENCHMARKS.md, "Issue #24, third"
to "fifth pass"): a held-out gain comes with its standard error (``Choice.gains``), and on 30
held-out samples that error is 0.4-0.9 dB on every bundled model, while most candidates differ
by less: a win by the 0.1 dB margin alone follows noise (on 100 judged videos at W6A6 it took
ViDiT-Q+GPTQ with searched clipping, 0.60 dB below that baseline). So by default a change must
also win by one standard error of its per-sample gain over the current choice
(``margin_se=1``). On 30 held-out samples that rule missed the 0.3 dB bar against the best of
the three baselines in 3 of the 16 bundled model x width cells, by up to 1.6 dB (fifth pass);
on 100 held-out samples (standard errors of 0.2-0.6 dB; the CLI's default) and 100 judged
ones, 14 of the 15 cells measured are within 0.3 dB of that best; the video model at W4A8
misses by 0.70 dB, where the held-out and the judged 100 videos disagree by 1.4 dB about
smoothing (sixth pass). Two standard errors kept plain trdq on digits-dit W6A6, 0.98 dB below
ViDiT-Q+GPTQ (held-out gain +1.0 +- 0.7 on 30).

With ``confirm`` (the CLI's default: 100 more samples) a change that wins on the held-out
samples is taken only when it also wins by the same rule with the further samples pooled in.
The winner of a dozen comparisons on one set of samples is the candidate the noise favoured
most, so its gain there overstates it: on the video model at W4A8 the searched smoothing won
+0.73 +- 0.55 on 100 held-out videos and lost 0.70 on the judged ones; pooled with 100 more it
was +0.25 +- 0.39 and refused, and smoothing at alpha 0.5, confirmed at +0.93 +- 0.37, judged
0.50 dB above the best baseline (seventh pass). The changes that help were confirmed (e.g. the
text model's ViDiT-Q+GPTQ at W6A6, +0.47 +- 0.23 pooled).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax.quant.recipe import RECIPES, Recipe

# The fixed combinations of the recipe's own blocks that the published baselines are made of,
# as overrides of every component field: QuaRot (rotation + GPTQ with a weight-clip search,
# per-token activations, no time axis), ViDiT-Q with GPTQ (smoothing alpha 0.5, then rotation)
# and the static time-aware form (one per-tensor scale per segment). ``choose_components``
# starts from the best of these and the base, so on the held-out trajectories its choice is
# never worse than any of them; fields they do not name (bits, low rank, groups, fp8, seed)
# stay the base's.
# the recipe fields that make up a method's blocks; an anchor sets all of them to the named
# baseline's values (read from RECIPES, so the anchors cannot drift from the baselines)
_COMPONENT_FIELDS = ("smoothing", "alpha", "alpha_grid", "rotation", "gptq", "w_clip_search",
                     "w_clip_grid", "a_mode", "a_clip_search", "num_segments", "segment_split",
                     "min_segment_steps", "per_segment_weights", "low_rank_per_segment")


def _blocks_of(recipe: Recipe) -> dict:
    return {field: getattr(recipe, field) for field in _COMPONENT_FIELDS}


ANCHORS: dict[str, dict] = {
    "quarot": _blocks_of(RECIPES["quarot"]),
    "viditq_gptq": _blocks_of(dataclasses.replace(RECIPES["viditq"], gptq=True)),
    "trdq_static": _blocks_of(RECIPES["trdq_static"]),
}

# then one component each, as recipe overrides applied to the current choice
_SEGMENTS = {"segment_split": "similarity", "min_segment_steps": 4, "per_segment_weights": False,
             "low_rank_per_segment": False}
COMPONENT_STEPS: dict[str, dict] = {
    "smoothing": {"smoothing": True, "alpha_grid": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)},
    "smoothing_0.5": {"smoothing": True, "alpha": 0.5, "alpha_grid": ()},
    "no_smoothing": {"smoothing": False, "alpha_grid": ()},
    "no_rotation": {"rotation": "none"},
    "hadamard": {"rotation": "hadamard"},
    "one_segment": {"num_segments": 1, "segment_split": "uniform", "per_segment_weights": False,
                    "low_rank_per_segment": False},
    "2_segments": {"num_segments": 2, **_SEGMENTS},
    "4_segments": {"num_segments": 4, **_SEGMENTS},
    "8_segments": {"num_segments": 8, **_SEGMENTS},
    "act_clip": {"a_clip_search": True},
    "no_act_clip": {"a_clip_search": False},
    "static": {"a_mode": "static"},
    "dynamic": {"a_mode": "dynamic"},
}
# the low-rank branch's rank, tried only under a byte budget (``max_ratio``): without one a
# larger rank always errs less, and the choice would trade memory for quality unasked
RANK_STEPS: dict[str, dict] = {f"rank_{r}": {"low_rank": r} for r in (0, 8, 16, 32)}


@dataclasses.dataclass(frozen=True)
class Trajectories:
    """Float-model inputs along the sampling trajectory of held-out samples.

    xs: float32 ``[num_steps, N, ...spatial, C]``, the model input of every step in sampling
      order (``xs[0]`` the initial noise). y_both: the conditioning ``[cond; null]`` (leading
      axis 2N), or None for an unconditional model. cfg_scale: the guidance scale used.
    final: float32 ``[N, ...spatial, C]``, the float model's samples; sample_args: the keyword
      arguments of ``trdq_jax.sampling.sample`` that drew them (conditioning, seed, shape), so
      a candidate can draw the same samples.
    """

    xs: Any
    y_both: Any
    cfg_scale: float
    final: Any = None
    sample_args: Any = None


def float_trajectories(model, params, sampler, *, shape, seed: int, labels=None,
                       null_label=None, cond=None, null_cond=None,
                       cfg_scale: float | None = None) -> Trajectories:
    """Run the float sampler once on the held-out conditioning and keep every step's input."""
    from trdq_jax.sampling import conditioning, denoise_fn_for, sample
    if labels is not None:
        cond, null_cond = jnp.asarray(labels, jnp.int32), jnp.asarray(null_label, jnp.int32)
        kwargs = {"null_label": int(null_label)}
        given = labels
    else:
        kwargs = {"null_cond": null_cond}
        given = cond
    scale = sampler.cfg_scale if cfg_scale is None else cfg_scale
    args = {"cond": given, "seed": seed, "cfg_scale": float(scale), "shape": tuple(shape),
            **kwargs}
    final, xs = sample(denoise_fn_for(model), params, sampler, return_trajectory=True, **args)
    y_both = None if cond is None else conditioning.with_null(cond, null_cond)
    return Trajectories(xs=xs, y_both=y_both, cfg_scale=float(scale), final=final,
                        sample_args=args)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _guided(apply_fn, params, xs, y_both, model_time, segment_of_step, cfg_scale):
    """Guided output ``[steps, N, ...spatial, C]`` of ``apply_fn`` at every step's input."""
    channels = xs.shape[-1]
    prepare = getattr(apply_fn, "prepare_cond", None)
    if prepare is not None and y_both is not None:  # as the sampler does, once
        y_both = prepare(params, y_both)

    def one(args):
        x, t, segment = args
        n = x.shape[0]
        if y_both is None:
            out = apply_fn(params, x, jnp.full((n,), t, jnp.float32), None, segment, False)
            return out[..., :channels].astype(jnp.float32)
        out = apply_fn(params, jnp.concatenate([x, x]), jnp.full((2 * n,), t, jnp.float32),
                       y_both, segment, False).astype(jnp.float32)
        cond, uncond = out[:n, ..., :channels], out[n:, ..., :channels]
        return uncond + cfg_scale * (cond - uncond)

    return jax.lax.map(one, (xs, model_time, segment_of_step))


def guided_outputs(apply_fn, params, traj: Trajectories, sampler) -> jax.Array:
    """float32 ``[steps, N, ...]``: the guided output of ``apply_fn`` at every trajectory step,
    with ``sampler``'s step -> segment table."""
    return _guided(apply_fn, params, traj.xs, traj.y_both, jnp.asarray(sampler.model_time),
                   jnp.asarray(sampler.segment_of_step, jnp.int32), jnp.float32(traj.cfg_scale))


def trajectory_error(outputs, reference) -> float:
    """Mean squared error of ``outputs`` against ``reference``, relative to the reference's mean
    square (equal shapes: guided outputs ``[steps, N, ...]`` or final samples ``[N, ...]``)."""
    ref = np.asarray(reference, np.float64)
    return float(np.mean((np.asarray(outputs, np.float64) - ref) ** 2) / np.mean(ref ** 2))


def sample_error(samples, reference) -> float:
    """The geometric mean over samples of each sample's mean squared error against
    ``reference``, relative to the reference's mean square. A sample is everything after the
    leading axis: an image of ``[N, H, W, C]``, a whole video of ``[N, F, H, W, C]`` (as the
    benchmarks score videos: their frames stacked into one image, since a frame whose digit
    has left the canvas matches almost exactly and its tiny error would rule a log mean), so
    ``10 log10(e_a / e_b)`` is how many dB of mean PSNR ``b`` has over ``a`` (before the
    benchmarks clip samples to [-1, 1]). An exact sample counts as an error of 1e-30 (not 0,
    which would end the choice); NaN anywhere gives inf (the candidate cannot win)."""
    return error_of_db(sample_db(samples, reference))


def error_of_db(db: np.ndarray) -> float:
    """``sample_error`` from the samples' ``sample_db`` ``[N]``: ``10 ** (mean(db) / 10)``
    (inf where a sample is inf)."""
    return float(10 ** (np.mean(np.asarray(db, np.float64)) / 10))


def sample_db(samples, reference) -> np.ndarray:
    """float64 ``[N]``: each sample's error (as ``sample_error`` counts it) in dB, ``10 log10``
    of its mean squared error relative to the reference's mean square; the mean of two
    candidates' per-sample differences is their mean-PSNR difference, and the spread of those
    differences says how far the held-out samples resolve it. NaN -> inf."""
    ref = np.asarray(reference, np.float64)
    per_sample = np.mean((np.asarray(samples, np.float64) - ref) ** 2,
                         axis=tuple(range(1, ref.ndim)))  # all axes after the first
    db = 10 * np.log10(np.maximum(per_sample, 1e-30) / np.mean(ref ** 2))
    return np.where(np.isnan(db), np.inf, db)


def gain_and_se(base_db: np.ndarray, other_db: np.ndarray) -> tuple[float, float]:
    """``(mean, standard error)`` in dB of ``other``'s per-sample gain over ``base``
    (``sample_db`` arrays of the same samples); (nan, nan) where a sample is not finite."""
    return mean_and_se(np.asarray(base_db, np.float64) - np.asarray(other_db, np.float64))


def mean_and_se(diff) -> tuple[float, float]:
    """``(mean, standard error of the mean)`` of the paired differences ``diff`` ``[N]``;
    (nan, nan) when one is not finite or fewer than two are given."""
    diff = np.asarray(diff, np.float64)
    if not np.all(np.isfinite(diff)) or len(diff) < 2:
        return float("nan"), float("nan")
    return float(np.mean(diff)), float(np.std(diff, ddof=1) / np.sqrt(len(diff)))


@dataclasses.dataclass(frozen=True)
class Choice:
    """recipe: the winner; label: its label in ``errors``. errors: ``{label: held-out error}``
    of every candidate tried, in order; label "base" is the starting recipe, "anchor:NAME" an
    anchor, others ``"+".join`` of the steps taken. ratios: ``{label: bytes of the quantized
    layers / the same layers in bf16}``. qparams / calib: the winner's quantized model and
    calibration. gains (samples judge only): ``{label: (mean, standard error)}`` in dB of each
    candidate's per-sample gain over the base on the held-out samples (``gain_and_se``): a
    gain within about twice its error is not resolved by those samples. confirmations (with
    ``confirm``): ``{label: (gain, standard error, taken)}`` of each change that won on the
    held-out samples, its gain in dB over the choice it would have replaced on those and the
    confirmation samples pooled."""

    recipe: Recipe
    errors: dict
    qparams: Any
    calib: Any
    label: str = "base"
    ratios: dict = dataclasses.field(default_factory=dict)
    gains: dict = dataclasses.field(default_factory=dict)
    confirmations: dict = dataclasses.field(default_factory=dict)


def choose_components(model, params, calib, base: Recipe, sampler, traj: Trajectories, *,
                      steps: dict | None = None, anchors: dict | None = None, rounds: int = 1,
                      judge: str = "samples", max_ratio: float | None = None,
                      margin_db: float = 0.1, margin_se: float = 1.0,
                      confirm: Trajectories | None = None, progress: bool = False) -> Choice:
    """The recipe of least held-out trajectory error reached from the best of ``base`` and
    its ``anchors`` (overrides of ``base``, default ``ANCHORS``; ``{}``: none) by the
    component changes of ``steps`` (default ``COMPONENT_STEPS``) that lower the error, one at a
    time (``rounds`` passes over the changes). A candidate equal to one already scored, or one
    the recipe or the sampler cannot take (e.g. 8 segments of 4 steps in a 20-step sampler), is
    skipped, as is one whose groups or rank a layer cannot hold. ``judge``: "samples" or
    "teacher_forced" (module doc). ``max_ratio``: a memory budget, the most bytes the quantized
    layers may hold relative to the same layers in bf16 (e.g. 0.35); a candidate over it is
    scored and reported but cannot win (ValueError when none fits); with the default steps,
    the branch's rank is then chosen too (``RANK_STEPS``: 0, 8, 16, 32). ``margin_db``: how
    much lower (in dB of the error) a candidate's error must be to replace the current choice:
    the held-out estimate is noisy, and a change that wins by less than the noise is as likely
    to lose on other samples (0: any win). ``margin_se`` (samples judge): the win must also
    exceed that many standard errors of the per-sample gain over the current choice (paired,
    on the same held-out samples; ``gain_and_se``), so a change the held-out samples do not
    resolve keeps the current choice (default 1; 0: the margin alone). ``confirm`` (samples
    judge): ``float_trajectories`` of further held-out samples (another seed): a change that
    wins on ``traj`` is taken only when it also wins by the same rule on ``traj`` and
    ``confirm`` pooled. The candidate that wins one of a dozen noisy comparisons is the one
    whose estimate the noise favoured, so its gain on the samples that picked it is biased
    upward; fresh samples, drawn only where a change is at stake, correct that at the cost of
    sampling ``confirm`` with each change that reaches them (and once with the choice it would
    replace). None: no confirmation.

    ``calib``: statistics from which every candidate's calibration is derived
    (``derive_calibration``: no model run per candidate). ``traj``: ``float_trajectories`` of
    samples the calibration did not use.
    """
    from trdq_jax.compile_cache import release_programs_near_map_limit
    from trdq_jax.quant.calibrate import derive_calibration
    from trdq_jax.quant.transform import (QuantizedDenoiser, calibrated_selection,
                                          check_layer_shapes, float_bytes_of, quantize,
                                          quantized_layer_paths, weight_bytes)
    from trdq_jax.sampling import denoise_fn_for
    from trdq_jax.sampling import sample
    if judge not in ("samples", "teacher_forced"):
        raise ValueError(f"judge: expected 'samples' or 'teacher_forced', got {judge!r}")
    if judge == "samples" and traj.final is None:
        raise ValueError("traj: holds no final samples (judge='samples' needs "
                         "float_trajectories' output)")
    if confirm is not None and judge != "samples":
        raise ValueError(f"confirm: re-judges changes on further samples; judge={judge!r} "
                         "does not sample (use judge='samples')")
    if confirm is not None and (not isinstance(confirm, Trajectories) or confirm.final is None):
        raise ValueError("confirm: expected float_trajectories' output (with final samples) "
                         f"of other held-out samples, got {type(confirm).__name__}")
    if isinstance(margin_db, bool) or not isinstance(margin_db, (int, float)) or not margin_db >= 0:
        raise ValueError(f"margin_db: expected a number >= 0 (dB), got {margin_db!r}")
    if isinstance(margin_se, bool) or not isinstance(margin_se, (int, float)) or not margin_se >= 0:
        raise ValueError(f"margin_se: expected a number >= 0 (standard errors), got "
                         f"{margin_se!r}")
    if max_ratio is not None and not (isinstance(max_ratio, (int, float)) and max_ratio > 0):
        raise ValueError(f"max_ratio: expected a positive number (bytes relative to bf16), got "
                         f"{max_ratio!r}")
    if steps is None:
        steps = COMPONENT_STEPS if max_ratio is None else {**COMPONENT_STEPS, **RANK_STEPS}
    reference = (traj.final if judge == "samples"
                 else guided_outputs(denoise_fn_for(model), params, traj, sampler))
    denoiser = QuantizedDenoiser(model, "xla")
    errors: dict = {}
    ratios: dict = {}
    per_sample: dict = {}  # samples judge: {label: sample_db}
    confirm_per_sample: dict = {}  # {label: sample_db on confirm}
    confirmations: dict = {}  # {label: (pooled gain over the choice then, its SE, taken)}

    def score(recipe):
        release_programs_near_map_limit()  # each candidate compiles its own programs
        c = derive_calibration(calib, recipe, sampler)
        q = quantize(params, c, recipe)
        segmented = sampler.with_segments(c.segment_of_step, c.num_segments)
        out = (sample(denoiser, q, segmented, **traj.sample_args) if judge == "samples"
               else guided_outputs(denoiser, q, traj, segmented))
        if judge == "samples":
            db = sample_db(out, reference)
            return error_of_db(db), q, c, db
        return trajectory_error(out, reference), q, c, None

    def fits(recipe):  # every layer can hold the candidate's groups and rank
        try:
            check_layer_shapes(params, calibrated_selection(calib, recipe), recipe)
        except ValueError:
            return False
        return True

    def judged(key, error, q, db):  # the error a candidate competes with (inf: over budget)
        errors[key] = error
        if db is not None:
            per_sample[key] = db
        ratios[key] = (weight_bytes(q)["quantized_layers"]
                       / float_bytes_of(params, quantized_layer_paths(q)))
        return error if max_ratio is None or ratios[key] <= max_ratio else float("inf")

    def resolved(current, key):  # the gain over the current choice exceeds margin_se SEs
        if not margin_se or key not in per_sample:
            return True
        gain, se = gain_and_se(per_sample[current], per_sample[key])
        return bool(np.isfinite(se)) and gain > margin_db + margin_se * se

    def confirm_db(q, c):  # sample_db on the confirmation samples
        segmented = sampler.with_segments(c.segment_of_step, c.num_segments)
        return sample_db(sample(denoiser, q, segmented, **confirm.sample_args), confirm.final)

    def confirmed(current, current_q, current_c, key, q, c):  # the rule on both sets pooled
        if confirm is None:
            return True
        if current not in confirm_per_sample:
            confirm_per_sample[current] = confirm_db(current_q, current_c)
        confirm_per_sample[key] = confirm_db(q, c)
        gain, se = mean_and_se(np.concatenate([
            per_sample[current] - per_sample[key],
            confirm_per_sample[current] - confirm_per_sample[key]]))
        taken = bool(np.isfinite(se)) and gain > margin_db + margin_se * se
        confirmations[key] = (gain, se, taken)
        return taken

    best_error, best_q, best_c, db = score(base)
    best, label = base, "base"
    best_error = judged(label, best_error, best_q, db)
    seen = {base}
    anchors = ANCHORS if anchors is None else anchors
    todo = [(f"anchor:{name}", change, True) for name, change in anchors.items()]
    todo += [(name, change, False) for name, change in steps.items()] * rounds
    if progress:
        from tqdm import tqdm
        todo = tqdm(todo, desc=f"choose {base.name}", unit="candidate")
    for name, change, is_anchor in todo:
        candidate = _replace(base if is_anchor else best, change, sampler.num_steps)
        if candidate is None or candidate in seen or not fits(candidate):
            continue
        seen.add(candidate)
        error, q, c, db = score(candidate)
        key = name if is_anchor or label == "base" else f"{label}+{name}"
        error = judged(key, error, q, db)
        if error < best_error * 10.0 ** (-margin_db / 10.0) and (
                best_error == float("inf")  # over budget / NaN: any finite error replaces it
                or resolved(label, key) and confirmed(label, best_q, best_c, key, q, c)):
            best, best_error, best_q, best_c, label = candidate, error, q, c, key
    if best_error == float("inf"):
        raise ValueError(f"max_ratio: no candidate fits {max_ratio} x bf16 (the smallest holds "
                         f"{min(ratios.values()):.4f} x)")
    gains = {key: gain_and_se(per_sample["base"], db) for key, db in per_sample.items()
             if key != "base"}
    return Choice(recipe=best, errors=errors, qparams=best_q, calib=best_c, label=label,
                  ratios=ratios, gains=gains, confirmations=confirmations)


def _replace(recipe: Recipe, change: dict, num_steps: int) -> Recipe | None:
    """``recipe`` with ``change``, or None where the recipe or a ``num_steps``-step sampler
    cannot take it."""
    from trdq_jax.config import ConfigError
    from trdq_jax.quant.calibrate import check_segment_lengths
    try:
        candidate = dataclasses.replace(recipe, **change)
        check_segment_lengths(candidate, num_steps)
    except (ConfigError, ValueError):
        return None
    if candidate.num_segments > num_steps:
        return None
    return candidate
