"""Real handwritten digits (scikit-learn's 8x8 UCI digits) as images and as moving-digit videos.

The 1,797 digits ship inside scikit-learn, so nothing is downloaded. Pixel values 0..16 map
linearly to [-1, 1] (0 -> -1 is the background). The train/test split is stratified and fixed:
``_TEST_SIZE = 300`` digits are held out, ``_SPLIT_SEED = 0`` seeds the per-class shuffles, and
each class contributes its share of the 300 rounded by largest remainder (29 to 31 per class).
The "all" split keeps scikit-learn's original order; "train" and "test" keep that order too
(ascending original index), so a split is a fixed subset, not a shuffle.

Returned arrays are cached and read-only; copy them before editing in place.
"""
from __future__ import annotations

import functools

import numpy as np

SPLITS = ("train", "test", "all")
DATASETS = ("digits", "moving_digits")
DIGIT_SIZE = 8
_TEST_SIZE = 300
_SPLIT_SEED = 0


def load_digits(split: str, image_size: int = DIGIT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split.

    Args:
      split: "train" (1,497 digits), "test" (300) or "all" (1,797).
      image_size: output side, a multiple of 8; sizes above 8 are bilinear upscales
        (half-pixel centres, edge clamped, like ``jax.image.resize(..., "bilinear")``).
    Returns:
      ``images`` float32 ``[N, image_size, image_size, 1]`` in [-1, 1] and ``labels`` int32 ``[N]``.
    """
    _check_split(split)
    if (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < DIGIT_SIZE
            or image_size % DIGIT_SIZE):
        raise ValueError(f"image_size: expected a positive multiple of {DIGIT_SIZE}, got {image_size!r}")
    return _cached_digits(split, image_size)


def load_moving_digits(split: str, num_frames: int = 8, canvas_size: int = 16,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One video per digit of ``split``: the 8x8 digit slides at a constant integer velocity.

    Every digit gets its own velocity ``(vy, vx)``, drawn uniformly from the non-zero integer
    vectors with ``|vy|, |vx| <= (canvas_size - 8) // (num_frames - 1)``, and a start corner drawn
    uniformly among those that keep the whole digit on the canvas in every frame. Motions are drawn
    for all 1,797 digits in their original order from ``numpy.random.default_rng(seed)``, so a
    digit's video does not depend on the split it is read from.

    Args:
      split: "train", "test" or "all" (the same digits as ``load_digits``).
      num_frames: frames per video, at least 2.
      canvas_size: canvas side, at least ``8 + num_frames - 1`` so that one pixel per frame fits.
      seed: non-negative int; the same seed gives the same videos.
    Returns:
      ``videos`` float32 ``[N, num_frames, canvas_size, canvas_size, 1]`` in [-1, 1] with background
      -1, and ``labels`` int32 ``[N]`` (the digit class).
    """
    _check_split(split)
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 2:
        raise ValueError(f"num_frames: expected an int >= 2, got {num_frames!r}")
    if (not isinstance(canvas_size, int) or isinstance(canvas_size, bool)
            or canvas_size < DIGIT_SIZE + num_frames - 1):
        raise ValueError(f"canvas_size: expected an int >= 8 + num_frames - 1 = "
                         f"{DIGIT_SIZE + num_frames - 1} so the digit can move, got {canvas_size!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    videos, labels = _cached_moving_all(num_frames, canvas_size, seed)
    index = _split_indices()[split]
    return _read_only(videos[index]), _read_only(labels[index])


def classifier_frames(canvas_size: int) -> int:
    """Frames per video when moving digits train or test a per-frame classifier on a
    ``canvas_size`` canvas: 8, or ``canvas_size - 7`` (the most the canvas allows) when smaller,
    so the frames cover the places the digit can be."""
    if (not isinstance(canvas_size, int) or isinstance(canvas_size, bool)
            or canvas_size < DIGIT_SIZE + 1):
        raise ValueError(f"canvas_size: expected an int >= {DIGIT_SIZE + 1}, got {canvas_size!r}")
    return min(8, canvas_size - DIGIT_SIZE + 1)


def load_dataset(name: str, split: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch on ``TrainConfig.dataset``: "digits" -> ``load_digits``, "moving_digits" ->
    ``load_moving_digits``; ``kwargs`` go to the loader (e.g. ``image_size``, ``num_frames``)."""
    if name == "digits":
        return load_digits(split, **kwargs)
    if name == "moving_digits":
        return load_moving_digits(split, **kwargs)
    raise ValueError(f"name: expected one of {DATASETS}, got {name!r}")


# ----------------------------------------------------------------------------- private


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: float32 ``[N, 8, 8]`` in [-1, 1] and int32 ``[N]`` labels."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    images = (bunch.images.astype(np.float64) / 16.0 * 2.0 - 1.0).astype(np.float32)
    return _read_only(images), _read_only(bunch.target.astype(np.int32))


@functools.lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    """Sorted original indices of each split (stratified, seeded, largest-remainder quotas)."""
    _, labels = _raw_digits()
    classes, counts = np.unique(labels, return_counts=True)
    exact = _TEST_SIZE * counts / counts.sum()
    quota = np.floor(exact).astype(int)
    shortfall = _TEST_SIZE - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:shortfall]] += 1
    rng = np.random.default_rng(_SPLIT_SEED)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q]
                           for c, q in zip(classes, quota)])
    is_test = np.zeros(len(labels), bool)
    is_test[test] = True
    return {"all": _read_only(np.arange(len(labels))),
            "train": _read_only(np.flatnonzero(~is_test)),
            "test": _read_only(np.flatnonzero(is_test))}


def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, size_in]`` float64 1-D bilinear interpolation weights (half-pixel centres)."""
    centres = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
    centres = np.clip(centres, 0.0, size_in - 1)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    frac = centres - low
    weights = np.zeros((size_out, size_in))
    np.add.at(weights, (np.arange(size_out), low), 1.0 - frac)
    np.add.at(weights, (np.arange(size_out), high), frac)
    return weights


@functools.lru_cache(maxsize=8)
def _cached_digits(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _raw_digits()
    index = _split_indices()[split]
    images = images[index].astype(np.float64)
    if image_size != DIGIT_SIZE:
        resize = _bilinear_matrix(DIGIT_SIZE, image_size)
        images = np.einsum("ph,nhw,qw->npq", resize, images, resize)
    images = np.clip(images, -1.0, 1.0).astype(np.float32)[..., None]
    return _read_only(images), _read_only(labels[index].copy())


def _draw_motions(rng: np.random.Generator, count: int, num_frames: int,
                  canvas_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Start corners and velocities, both int ``[count, 2]`` as (row, col)."""
    room = canvas_size - DIGIT_SIZE  # largest top-left coordinate
    speed = room // (num_frames - 1)
    axis = np.arange(-speed, speed + 1)
    choices = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    choices = choices[np.any(choices != 0, axis=1)]
    velocity = choices[rng.integers(0, len(choices), size=count)]
    travel = (num_frames - 1) * velocity
    low = np.maximum(0, -travel)           # so that start + travel >= 0
    high = np.minimum(room, room - travel)  # so that start + travel <= room
    start = low + np.floor(rng.random((count, 2)) * (high - low + 1)).astype(int)
    return start, velocity


@functools.lru_cache(maxsize=4)
def _cached_moving_all(num_frames: int, canvas_size: int,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    digits, labels = _raw_digits()
    count = len(digits)
    start, velocity = _draw_motions(np.random.default_rng(seed), count, num_frames, canvas_size)
    videos = np.full((count, num_frames, canvas_size, canvas_size, 1), -1.0, np.float32)
    for frame in range(num_frames):
        corner = start + frame * velocity
        for i in range(count):
            r, c = corner[i]
            videos[i, frame, r:r + DIGIT_SIZE, c:c + DIGIT_SIZE, 0] = digits[i]
    return videos, labels
