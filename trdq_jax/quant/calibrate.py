"""``calibrate``: float model + sampler -> per-layer, per-step statistics and a segment table."""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from trdq_jax.quant import capture, segments, timing
from trdq_jax.quant.recipe import Recipe
from trdq_jax.quant.roles import layer_roles
from trdq_jax.quant.transform import calibrated_selection, select_layers

QUANTIZABLE_KINDS = ("Dense", "Conv")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What ``quantize`` needs.

    stats: ``{module path: LayerStats}`` of the layers the recipe quantizes (weight-only ones
      included).
    segment_of_step: int32 ``[num_steps]`` time segment of each sampling step (sampling order).
    num_segments: S.
    keep_float: ``{regex, or the structural reason: paths}`` report of layers left in float.
    weight_only: paths of the quantized layers that are quantized weight-only.
    roles: ``{"input", "output", "conditioning": paths}`` of every Dense / Conv, found from the
      data flow (``trdq_jax.quant.roles``); None for a calibration saved before they existed.
    """

    stats: dict
    segment_of_step: np.ndarray
    num_segments: int
    keep_float: dict
    weight_only: list = dataclasses.field(default_factory=list)
    roles: dict | None = None


def calibrate(model, params, recipe: Recipe, sampler, *, labels=None, null_label=None,
              cond=None, null_cond=None, shape: tuple[int, ...], seed: int = 0,
              cfg_scale: float | None = None, rows_per_step: int = 64,
              progress: bool = False) -> Calibration:
    """Run the float model through the real sampler on calibration inputs and collect stats.

    Args:
      labels, null_label: ``[N]`` class labels of the calibration samples (e.g. a few per class)
        and the null label of the uncond branch; or
      cond, null_cond: any conditioning pytree with leading axis N and its null conditioning
        (``trdq_jax.sampling.conditioning``), or None and None for an unconditional model.
      shape: batch shape ``(N, ...spatial, C)``.
      sampler: the ``Sampler`` that will be used for generation (same steps -> same segments).
    Segments are uniform over the training-time axis or a data-driven contiguous split
    (``recipe.segment_split``); every segment must contain at least one step.
    """
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe: expected a Recipe, got {type(recipe).__name__}")
    if labels is not None or null_label is not None:
        if cond is not None or null_cond is not None:
            raise ValueError("labels: give labels and null_label, or cond and null_cond, not both")
        labels = np.asarray(labels)
        if labels.size == 0:
            raise ValueError("labels: the calibration set is empty; pass at least one label")
        cond, null_cond = labels, null_label
    if recipe.num_segments > sampler.num_steps:
        raise ValueError(f"recipe.num_segments: {recipe.num_segments} segments but the sampler "
                         f"has only {sampler.num_steps} steps")
    check_segment_lengths(recipe, sampler.num_steps)
    with timing.stage("trajectory"):
        traj = capture.calibration_trajectory(model, params, sampler, cond, null_cond, shape,
                                              seed, cfg_scale)
    example = capture.example_inputs(traj, null_cond)
    paths = capture.layer_paths(model, params, example, kinds=QUANTIZABLE_KINDS)
    roles = layer_roles(model, params, capture.example_inputs(traj, null_cond, n=1))
    selection = select_layers(paths, recipe, roles)
    with timing.stage("statistics"):
        stats = capture.collect_stats(model, params, traj.xs, traj.timesteps, traj.cond,
                                      null_cond,
                                      paths=[f"^{re.escape(p)}$" for p in selection.quantized],
                                      kinds=QUANTIZABLE_KINDS, rows_per_step=rows_per_step,
                                      seed=seed, progress=progress)
    return Calibration(stats=stats, segment_of_step=_segment_table(stats, recipe, sampler),
                       num_segments=recipe.num_segments, keep_float=selection.keep_float,
                       weight_only=selection.weight_only, roles=roles)


def derive_calibration(calib: Calibration, recipe: Recipe, sampler) -> Calibration:
    """The ``Calibration`` of ``recipe`` from statistics already collected (no model run).

    Statistics do not depend on the recipe, only the layer selection and the segment table do:
    calibrate once with any recipe, then derive the others. The layers ``recipe`` quantizes
    must all be in ``calib.stats`` (ValueError naming the missing ones otherwise).
    """
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe: expected a Recipe, got {type(recipe).__name__}")
    if recipe.num_segments > sampler.num_steps:
        raise ValueError(f"recipe.num_segments: {recipe.num_segments} segments but the sampler "
                         f"has only {sampler.num_steps} steps")
    check_segment_lengths(recipe, sampler.num_steps)
    selection = calibrated_selection(calib, recipe)
    stats = {p: calib.stats[p] for p in selection.quantized}
    return Calibration(stats=stats, segment_of_step=_segment_table(stats, recipe, sampler),
                       num_segments=recipe.num_segments, keep_float=selection.keep_float,
                       weight_only=selection.weight_only, roles=calib.roles)


def check_segment_lengths(recipe: Recipe, num_steps: int) -> None:
    """ValueError when ``recipe``'s similarity segments cannot all hold ``min_segment_steps`` of
    the sampler's ``num_steps`` steps."""
    if recipe.segment_split == "similarity" and \
            recipe.num_segments * recipe.min_segment_steps > num_steps:
        raise ValueError(f"recipe.min_segment_steps: {recipe.num_segments} segments of at least "
                         f"{recipe.min_segment_steps} steps need "
                         f"{recipe.num_segments * recipe.min_segment_steps} steps, the sampler "
                         f"has {num_steps}")


def _segment_table(stats: dict, recipe: Recipe, sampler) -> np.ndarray:
    """int32 ``[num_steps]``: uniform over training time or the similarity split of ``stats``."""
    if recipe.segment_split == "uniform":
        table = segments.uniform_segments(np.asarray(sampler.train_timesteps), recipe.num_segments,
                                          sampler.num_train_steps)
    else:
        table = segments.similarity_segments(stats, recipe.num_segments,
                                             recipe.min_segment_steps)
    return np.asarray(segments.check_segments(table, recipe.num_segments), np.int32)
