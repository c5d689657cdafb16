"""Moving-digit videos: constant integer velocity, digit on canvas, determinism."""
import numpy as np
import pytest

from trdq_jax.data import classifier_frames, load_digits, load_moving_digits


def _centre_of_mass(frames):
    """``[..., H, W]`` -> ``[..., 2]`` (row, col) centre of mass of ``frame + 1`` (background 0)."""
    mass = frames.astype(np.float64) + 1.0
    rows = np.arange(frames.shape[-2], dtype=np.float64)
    cols = np.arange(frames.shape[-1], dtype=np.float64)
    total = mass.sum(axis=(-2, -1))
    return np.stack([(mass.sum(-1) * rows).sum(-1) / total, (mass.sum(-2) * cols).sum(-1) / total], -1)


@pytest.mark.parametrize("num_frames, canvas", [(8, 16), (4, 20)])
def test_digit_moves_at_constant_velocity_inside_canvas(num_frames, canvas):
    videos, labels = load_moving_digits("test", num_frames=num_frames, canvas_size=canvas, seed=3)
    digits, digit_labels = load_digits("test")
    assert videos.shape == (300, num_frames, canvas, canvas, 1) and videos.dtype == np.float32
    np.testing.assert_array_equal(labels, digit_labels)
    assert videos.min() >= -1.0 and videos.max() <= 1.0

    com = _centre_of_mass(videos[..., 0])                        # [N, F, 2]
    steps = np.diff(com, axis=1)                                  # [N, F-1, 2]
    np.testing.assert_allclose(steps, np.broadcast_to(steps[:, :1], steps.shape), atol=1e-9)
    np.testing.assert_allclose(steps[:, 0], np.round(steps[:, 0]), atol=1e-9)
    velocity = np.round(steps[:, 0]).astype(int)
    assert np.all(np.abs(velocity).sum(-1) > 0), "every digit moves"
    assert np.abs(velocity).max() <= (canvas - 8) // (num_frames - 1)

    # each frame holds exactly the original digit at some corner, and -1 everywhere else
    digit_com = _centre_of_mass(digits[..., 0])
    for i in range(0, 300, 37):
        for f in range(num_frames):
            corner = np.round(com[i, f] - digit_com[i]).astype(int)
            assert np.all(corner >= 0) and np.all(corner <= canvas - 8), "digit leaves the canvas"
            frame = videos[i, f, ..., 0]
            r, c = corner
            np.testing.assert_array_equal(frame[r:r + 8, c:c + 8], digits[i, ..., 0])
            outside = frame.copy()
            outside[r:r + 8, c:c + 8] = -1.0
            assert np.all(outside == -1.0)


def test_same_seed_same_videos_other_seed_other_motion():
    a, _ = load_moving_digits("train", seed=1)
    b, _ = load_moving_digits("train", seed=1)
    c, _ = load_moving_digits("train", seed=2)
    np.testing.assert_array_equal(a, b)
    assert np.mean(np.any(a != c, axis=(1, 2, 3, 4))) > 0.5


def test_video_of_a_digit_does_not_depend_on_the_split():
    all_videos, _ = load_moving_digits("all", seed=5)
    test_videos, test_labels = load_moving_digits("test", seed=5)
    all_images, _ = load_digits("all")
    test_images, _ = load_digits("test")
    # locate each test digit in the full set by its pixels
    keys = {img.tobytes(): i for i, img in enumerate(all_images)}
    for j in range(0, 300, 29):
        i = keys[test_images[j].tobytes()]
        np.testing.assert_array_equal(test_videos[j], all_videos[i])


@pytest.mark.parametrize("kwargs, name", [
    (dict(split="x"), "split"), (dict(split="test", num_frames=1), "num_frames"),
    (dict(split="test", num_frames=8, canvas_size=14), "canvas_size"),
    (dict(split="test", seed=-1), "seed")])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        load_moving_digits(**kwargs)


def test_classifier_frames_is_eight_or_what_the_canvas_allows():
    assert [classifier_frames(c) for c in (9, 12, 14, 15, 16, 32)] == [2, 5, 7, 8, 8, 8]
    for canvas in (9, 12, 16):  # the count it gives is always a valid video length
        videos, _ = load_moving_digits("test", num_frames=classifier_frames(canvas),
                                       canvas_size=canvas)
        assert videos.shape[1:4] == (classifier_frames(canvas), canvas, canvas)
    for bad in (8, 12.0, True):
        with pytest.raises(ValueError, match="canvas_size"):
            classifier_frames(bad)
