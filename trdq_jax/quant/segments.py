"""Step -> time-segment tables ``int32 [num_steps]`` (sampling order) for ``Sampler.with_segments``.

Every table numbers its segments in sampling order: segment 0 holds the first steps sampled
(the noisiest), the last segment the final, cleanest steps.

``uniform_segments`` splits the training-time axis evenly (the released TR-DQ configuration);
``similarity_segments`` groups adjacent sampling steps whose activation statistics look alike.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from trdq_jax.quant.capture import LayerStats
from trdq_jax.sampling.solvers import uniform_segment_table

__all__ = ["check_segments", "similarity_segments", "uniform_segment_table", "uniform_segments"]


def _check_count(name: str, value, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= hi:
        raise ValueError(f"{name}: expected an int in [1, {hi}], got {value!r}")
    return int(value)


def uniform_segments(train_timesteps, num_segments: int, num_train_steps: int) -> np.ndarray:
    """``S - 1 - min(t * S // T, S - 1)`` per step (segment 0 = the noisiest interval of the
    training axis), int32 ``[steps]``; ``train_timesteps`` int ``[steps]`` in
    ``[0, num_train_steps)`` (``Sampler.train_timesteps``). Validating wrapper of
    ``uniform_segment_table``."""
    t = np.asarray(train_timesteps)
    if t.ndim != 1 or t.size == 0 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"train_timesteps: expected a non-empty 1-D int array, "
                         f"got {t.dtype} {t.shape}")
    num_train_steps = _check_count("num_train_steps", num_train_steps, 2 ** 31 - 1)
    num_segments = _check_count("num_segments", num_segments, num_train_steps)
    if t.min() < 0 or t.max() >= num_train_steps:
        raise ValueError(f"train_timesteps: expected values in [0, {num_train_steps}), got "
                         f"[{t.min()}, {t.max()}]")
    return uniform_segment_table(t, num_segments, num_train_steps)


def step_features(stats: Mapping[str, LayerStats]) -> np.ndarray:
    """One vector per step, float64 ``[steps, sum_l K_l]``: ``log(absmax)`` of every layer
    (sorted by path), divided by ``sqrt(K_l)`` so that each layer weighs the same whatever its
    width. Zeros are floored at ``1e-6`` times the layer's peak so the log stays finite."""
    if not stats:
        raise ValueError("stats: expected at least one layer")
    steps = {np.asarray(s.absmax).shape[0] for s in stats.values()}
    if len(steps) != 1:
        raise ValueError("stats: expected every layer to cover the same steps, got "
                         f"{sorted(steps)}")
    parts = []
    for path in sorted(stats):
        absmax = np.asarray(stats[path].absmax, np.float64)
        if absmax.ndim != 2 or not np.all(np.isfinite(absmax)) or np.any(absmax < 0):
            raise ValueError(f"stats: layer {path!r} needs a finite, non-negative absmax "
                             f"[steps, K], got shape {absmax.shape}")
        floor = max(absmax.max() * 1e-6, np.finfo(np.float64).tiny)
        parts.append(np.log(np.maximum(absmax, floor)) / np.sqrt(absmax.shape[1]))
    return np.concatenate(parts, axis=1)


def _segment_costs(features: np.ndarray) -> np.ndarray:
    """``cost[i, j]`` = within-segment squared distance to the mean of steps ``i .. j-1``
    (``inf`` where ``j <= i``), float64 ``[steps + 1, steps + 1]``, via prefix sums."""
    f = features - features.mean(axis=0)  # centring keeps the prefix sums well conditioned
    n = f.shape[0]
    sums = np.concatenate([np.zeros((1, f.shape[1])), np.cumsum(f, axis=0)])
    squares = np.concatenate([[0.0], np.cumsum(np.einsum("sd,sd->s", f, f))])
    i, j = np.triu_indices(n + 1, k=1)
    seg_sum = sums[j] - sums[i]
    cost = np.full((n + 1, n + 1), np.inf)
    cost[i, j] = np.maximum(squares[j] - squares[i]
                            - np.einsum("pd,pd->p", seg_sum, seg_sum) / (j - i), 0.0)
    return cost


def optimal_contiguous_partition(features: np.ndarray, num_segments: int,
                                 min_length: int = 1) -> np.ndarray:
    """Exact dynamic programme, ``O(S * steps^2)``: the contiguous split of the rows of
    ``features [steps, D]`` into ``num_segments`` runs of at least ``min_length`` rows each,
    minimising the total within-run squared distance to the run mean. Returns int32
    ``[steps]`` run ids 0, 1, ... (ties go to the earliest boundary)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features: expected a non-empty [steps, D] array, got {features.shape}")
    n = features.shape[0]
    num_segments = _check_count("num_segments", num_segments, n)
    if isinstance(min_length, bool) or not isinstance(min_length, (int, np.integer)) \
            or min_length < 1:
        raise ValueError(f"min_length: expected a positive int, got {min_length!r}")
    if num_segments * min_length > n:
        raise ValueError(f"min_length: {num_segments} segments of at least {min_length} steps "
                         f"need {num_segments * min_length} steps, the trajectory has {n}")
    cost = _segment_costs(features)
    i, j = np.indices(cost.shape)
    cost[j - i < min_length] = np.inf
    # best[s, j]: least cost of the first j steps in s + 1 runs; start[s, j]: the last run's start
    best = np.full((num_segments, n + 1), np.inf)
    start = np.zeros((num_segments, n + 1), np.int64)
    best[0] = cost[0]
    for s in range(1, num_segments):
        for j in range(s + 1, n + 1):
            candidates = best[s - 1, s:j] + cost[s:j, j]
            start[s, j] = s + int(np.argmin(candidates))
            best[s, j] = candidates[start[s, j] - s]
    table = np.empty(n, np.int32)
    end = n
    for s in range(num_segments - 1, -1, -1):
        begin = start[s, end] if s else 0
        table[begin:end] = s
        end = begin
    return table


def similarity_segments(stats: Mapping[str, LayerStats], num_segments: int,
                        min_length: int = 1) -> np.ndarray:
    """Data-driven contiguous segments: adjacent steps whose per-channel activation ranges are
    alike share a segment. Steps are ``step_features(stats)`` (log abs-max per channel) and the
    split is ``optimal_contiguous_partition``. Returns int32 ``[steps]`` in sampling order,
    non-decreasing from 0 to ``num_segments - 1``, every segment at least ``min_length``
    steps."""
    return optimal_contiguous_partition(step_features(stats), num_segments, min_length)


def check_segments(table, num_segments: int) -> np.ndarray:
    """Validate a step -> segment table: ints ``[steps]`` in ``[0, num_segments)`` with every
    segment visited by at least one step. Returns it as int32."""
    table = np.asarray(table)
    if table.ndim != 1 or table.size == 0 or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(f"table: expected a non-empty 1-D int array, got {table.dtype} "
                         f"{table.shape}")
    num_segments = _check_count("num_segments", num_segments, table.size)
    if table.min() < 0 or table.max() >= num_segments:
        raise ValueError(f"table: expected values in [0, {num_segments}), got "
                         f"[{table.min()}, {table.max()}]")
    empty = sorted(set(range(num_segments)) - set(table.tolist()))
    if empty:
        raise ValueError(f"table: segments {empty} are visited by no step "
                         f"(num_segments={num_segments})")
    return table.astype(np.int32)
