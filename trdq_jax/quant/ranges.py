"""Activation ranges per sampling step, before and after a layer's smoothing + rotation: the
data behind ``trdq plot-ranges`` (drawn by ``trdq_jax.plots.save_range_figure``)."""
from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np

from trdq_jax.quant.qlinear import transform_activation


@dataclasses.dataclass(frozen=True)
class RangeCurves:
    """The range of a layer's input per sampling step, float64 ``[steps]`` each.

    low, high: min / max over the rows and channels of the step.
    mean_absmax: per-channel abs-max over the rows, averaged over channels.
    """
    low: np.ndarray
    high: np.ndarray
    mean_absmax: np.ndarray

    @property
    def absmax(self) -> float:
        """Largest magnitude over all steps."""
        return float(max(np.abs(self.low).max(), np.abs(self.high).max()))


def range_curves(rows) -> RangeCurves:
    """``rows [steps, R, K]`` -> ``RangeCurves`` (float64)."""
    rows = np.asarray(rows, np.float64)
    if rows.ndim != 3 or rows.size == 0:
        raise ValueError(f"rows: expected a non-empty [steps, R, K] array, got {rows.shape}")
    return RangeCurves(low=rows.min(axis=(1, 2)), high=rows.max(axis=(1, 2)),
                       mean_absmax=np.abs(rows).max(axis=1).mean(axis=1))


def transformed_rows(stats, q, segment_of_step) -> np.ndarray:
    """``stats.rows [steps, R, K]`` after ``q``'s smoothing + rotation, each step with its own
    segment's transform (``transform_activation``); float32, same shape."""
    rows = np.asarray(stats.rows, np.float32)
    table = np.asarray(segment_of_step)
    if table.shape != (rows.shape[0],):
        raise ValueError(f"segment_of_step: expected shape ({rows.shape[0]},), got {table.shape}")
    out = np.empty_like(rows)
    for segment in np.unique(table):
        steps = table == segment
        out[steps] = np.asarray(transform_activation(q, jnp.asarray(rows[steps]),
                                                     jnp.int32(segment)))
    return out


def layer_ranges(stats, q, segment_of_step) -> tuple[RangeCurves, RangeCurves]:
    """(before, after) range curves of one layer from its calibration rows ``stats.rows`` and
    its ``QLinear`` ``q``."""
    return range_curves(stats.rows), range_curves(transformed_rows(stats, q, segment_of_step))


def plot_layers(quantized: list[str], pattern: str | None = None) -> list[str]:
    """Layers to plot: those matching ``pattern`` (``re.search``), or by default the attention
    ``qkv`` and MLP ``fc2`` of the first and last block that have them (else the first and last
    quantized layers)."""
    if pattern:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"pattern: invalid regex {pattern!r}: {e}") from None
        chosen = [p for p in quantized if regex.search(p)]
        if not chosen:
            raise ValueError(f"pattern: {pattern!r} matches no quantized layer; "
                             f"layers: {quantized}")
        return chosen
    picks = []
    for suffix in ("attn/qkv", "mlp/fc2"):
        hits = [p for p in quantized if p.endswith(suffix)]
        picks += [hits[0], hits[-1]] if hits else []
    picks = picks or [quantized[0], quantized[-1]]
    return sorted(set(picks), key=quantized.index)
