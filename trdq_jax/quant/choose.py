"""Choosing a recipe's components end to end, by what the sampler sees.

Per-layer error on the fitting rows is a poor judge of a component: on the bundled UNet the
searched smoothing lowered every layer's error and cost 1.9 dB end to end. Here a candidate
recipe is judged by the guided denoiser output along float trajectories of calibration
samples that none of the fits saw (another seed): at every step the float model's input ``x_t``
goes through the quantized model, and the error of the guided output (what the solver uses)
against the float model's is averaged over steps (teacher forcing: every candidate sees the
same inputs, and one bad step does not derail the rest of the comparison).

::

    traj = float_trajectories(model, params, sampler, labels=..., null_label=..., shape=...,
                              seed=7)                      # held out: not the calibration seed
    choice = choose_components(model, params, calib, base, sampler, traj)
    choice.recipe, choice.errors                           # the winner, {name: error}

``choose_components`` walks the component grid one component at a time from ``base``
(``COMPONENT_STEPS``: with or without smoothing, rotation, time segments, clipping ratios),
keeping a change only when it lowers the trajectory error: ``1 + len(steps)`` quantizations
per round instead of the whole grid.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax.quant.recipe import Recipe

# one component each, as recipe overrides applied to the current choice
COMPONENT_STEPS: dict[str, dict] = {
    "smoothing": {"smoothing": True, "alpha_grid": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)},
    "no_smoothing": {"smoothing": False, "alpha_grid": ()},
    "no_rotation": {"rotation": "none"},
    "hadamard": {"rotation": "hadamard"},
    "one_segment": {"num_segments": 1, "segment_split": "uniform", "per_segment_weights": False},
    "no_act_clip": {"a_clip_search": False},
}


@dataclasses.dataclass(frozen=True)
class Trajectories:
    """Float-model inputs along the sampling trajectory of held-out samples.

    xs: float32 ``[num_steps, N, ...spatial, C]``, the model input of every step in sampling
      order (``xs[0]`` the initial noise). y_both: the conditioning ``[cond; null]`` (leading
      axis 2N), or None for an unconditional model. cfg_scale: the guidance scale used.
    """

    xs: Any
    y_both: Any
    cfg_scale: float


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
    _, xs = sample(denoise_fn_for(model), params, sampler, given, seed=seed, cfg_scale=scale,
                   shape=tuple(shape), return_trajectory=True, **kwargs)
    y_both = None if cond is None else conditioning.with_null(cond, null_cond)
    return Trajectories(xs=xs, y_both=y_both, cfg_scale=float(scale))


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
    """Mean squared error of ``outputs`` against ``reference`` over the trajectory, relative to
    the reference's mean square (both ``[steps, N, ...]``)."""
    ref = np.asarray(reference, np.float64)
    return float(np.mean((np.asarray(outputs, np.float64) - ref) ** 2) / np.mean(ref ** 2))


@dataclasses.dataclass(frozen=True)
class Choice:
    """recipe: the winner. errors: ``{label: trajectory error}`` of every candidate tried, in
    order; label "base" is the starting recipe, others ``"+".join`` of the steps taken.
    qparams / calib: the winner's quantized model and calibration."""

    recipe: Recipe
    errors: dict
    qparams: Any
    calib: Any


def choose_components(model, params, calib, base: Recipe, sampler, traj: Trajectories, *,
                      steps: dict | None = None, rounds: int = 1,
                      progress: bool = False) -> Choice:
    """The recipe reached from ``base`` by the component changes of ``steps`` (default
    ``COMPONENT_STEPS``) that lower the held-out trajectory error, one at a time (``rounds``
    passes over the changes; a change that leaves the recipe unchanged is skipped).

    ``calib``: statistics from which every candidate's calibration is derived
    (``derive_calibration``: no model run per candidate). ``traj``: ``float_trajectories`` of
    samples the calibration did not use.
    """
    from trdq_jax.quant.calibrate import derive_calibration
    from trdq_jax.quant.transform import QuantizedDenoiser, quantize
    from trdq_jax.sampling import denoise_fn_for
    steps = COMPONENT_STEPS if steps is None else steps
    reference = guided_outputs(denoise_fn_for(model), params, traj, sampler)
    denoiser = QuantizedDenoiser(model, "xla")
    errors: dict = {}

    def score(recipe):
        c = derive_calibration(calib, recipe, sampler)
        q = quantize(params, c, recipe)
        out = guided_outputs(denoiser, q, traj, sampler.with_segments(c.segment_of_step,
                                                                       c.num_segments))
        return trajectory_error(out, reference), q, c

    best_error, best_q, best_c = score(base)
    best, label = base, "base"
    errors[label] = best_error
    items = list(steps.items())
    if progress:
        from tqdm import tqdm
        items = tqdm(items * rounds, desc=f"choose {base.name}", unit="candidate")
    else:
        items = items * rounds
    for name, change in items:
        try:
            candidate = dataclasses.replace(best, **change)
        except ValueError:  # a change this recipe cannot take (e.g. per-segment weights)
            continue
        if candidate == best:
            continue
        error, q, c = score(candidate)
        errors[f"{label}+{name}" if label != "base" else name] = error
        if error < best_error:
            best, best_error, best_q, best_c = candidate, error, q, c
            label = name if label == "base" else f"{label}+{name}"
    return Choice(recipe=best, errors=errors, qparams=best_q, calib=best_c)
