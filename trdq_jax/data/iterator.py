"""Infinite, resumable shuffled mini-batches over in-memory arrays."""
from __future__ import annotations

from typing import Iterator

import numpy as np


def batch_iterator(arrays: tuple, batch_size: int, seed: int,
                   start_step: int = 0) -> Iterator[tuple[np.ndarray, ...]]:
    """Yield ``tuple(a[idx] for a in arrays)`` forever, one shuffled batch per step.

    Epoch ``e`` visits the examples in the order ``np.random.default_rng((seed, e)).permutation(N)``
    and is cut into ``N // batch_size`` full batches; the last ``N % batch_size`` examples of that
    order are skipped (a different remainder each epoch). Step ``k`` therefore lies in epoch
    ``k // (N // batch_size)`` and depends only on ``(seed, k)``: starting at ``start_step=k``
    yields exactly what starting at 0 and skipping ``k`` batches would, so a killed training run
    resumes on the same data stream.

    Args:
      arrays: non-empty tuple of arrays sharing the leading length ``N`` (e.g. ``(images, labels)``).
      batch_size: examples per batch, ``1 <= batch_size <= N``.
      seed: int seeding every epoch's permutation.
      start_step: index of the first batch to yield, ``>= 0``.
    Yields:
      a tuple of numpy arrays, each ``[batch_size, ...]`` with the dtype of its source.
    """
    if not isinstance(arrays, (tuple, list)) or not arrays:
        raise ValueError(f"arrays: expected a non-empty tuple of arrays, got {type(arrays).__name__}")
    arrays = tuple(np.asarray(a) for a in arrays)
    lengths = {a.shape[0] if a.ndim else None for a in arrays}
    if len(lengths) != 1 or None in lengths:
        raise ValueError(f"arrays: expected one shared leading length, got shapes "
                         f"{[a.shape for a in arrays]}")
    (num_examples,) = lengths
    if (not isinstance(batch_size, int) or isinstance(batch_size, bool)
            or not 1 <= batch_size <= num_examples):
        raise ValueError(f"batch_size: expected an int in [1, {num_examples}], got {batch_size!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    if not isinstance(start_step, (int, np.integer)) or isinstance(start_step, bool) or start_step < 0:
        raise ValueError(f"start_step: expected a non-negative int, got {start_step!r}")
    return _generate(arrays, batch_size, int(seed), int(start_step))


def _generate(arrays: tuple[np.ndarray, ...], batch_size: int, seed: int, step: int):
    steps_per_epoch = arrays[0].shape[0] // batch_size
    epoch, position = divmod(step, steps_per_epoch)
    while True:
        order = np.random.default_rng((seed, epoch)).permutation(arrays[0].shape[0])
        for k in range(position, steps_per_epoch):
            index = order[k * batch_size:(k + 1) * batch_size]
            yield tuple(a[index] for a in arrays)
        epoch, position = epoch + 1, 0
