"""Digits images: split sizes, stratification, value mapping, upscaling, caching."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.datasets

from trdq_jax.data import load_dataset, load_digits


@pytest.fixture(scope="module")
def raw():
    bunch = sklearn.datasets.load_digits()
    return bunch.images.astype(np.float64), bunch.target


def _row_keys(images):
    return sorted(row.tobytes() for row in np.ascontiguousarray(images).reshape(len(images), -1))


def test_all_split_maps_pixels_linearly_to_unit_range(raw):
    images, labels = load_digits("all")
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
    assert labels.shape == (1797,) and labels.dtype == np.int32
    np.testing.assert_allclose(images[..., 0], raw[0] / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels, raw[1])
    assert images.min() == -1.0 and images.max() == 1.0


def test_train_test_sizes_partition_and_stratification(raw):
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    assert len(train_x) == len(train_y) == 1497 and len(test_x) == len(test_y) == 300
    # the two splits together are exactly the full dataset (as a multiset of (image, label))
    joined = np.concatenate([np.concatenate([train_x.reshape(1497, -1), train_y[:, None]], 1),
                             np.concatenate([test_x.reshape(300, -1), test_y[:, None]], 1)])
    full = np.concatenate([raw[0].reshape(1797, -1) / 8.0 - 1.0, raw[1][:, None]], 1)
    assert _row_keys(joined.astype(np.float32)) == _row_keys(full.astype(np.float32))
    # each class holds its proportional share of the 300 test digits, within one
    class_counts = np.bincount(raw[1], minlength=10)
    expected = 300 * class_counts / class_counts.sum()
    assert np.all(np.abs(np.bincount(test_y, minlength=10) - expected) < 1.0)
    np.testing.assert_array_equal(np.bincount(train_y, minlength=10) + np.bincount(test_y, minlength=10),
                                  class_counts)


def test_split_is_deterministic_across_cache_clears():
    from trdq_jax.data import digits as module
    first = [a.copy() for a in load_digits("test")]
    module._cached_digits.cache_clear()
    module._split_indices.cache_clear()
    module._raw_digits.cache_clear()
    second = load_digits("test")
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_cached_arrays_are_read_only():
    images, labels = load_digits("train")
    assert load_digits("train")[0] is images
    with pytest.raises(ValueError):
        images[0, 0, 0, 0] = 5.0


@pytest.mark.parametrize("size", [16, 24])
def test_upscale_matches_jax_bilinear_resize(size):
    small, _ = load_digits("test")
    big, labels = load_digits("test", image_size=size)
    assert big.shape == (300, size, size, 1) and len(labels) == 300
    reference = jax.image.resize(jnp.asarray(small, jnp.float32), (300, size, size, 1), "bilinear",
                                 antialias=False)
    np.testing.assert_allclose(big, np.asarray(reference), atol=1e-5)
    assert big.min() >= -1.0 and big.max() <= 1.0


def test_load_dataset_dispatches():
    for name, ndim in [("digits", 4), ("moving_digits", 5)]:
        x, y = load_dataset(name, "test")
        assert x.ndim == ndim and len(x) == len(y) == 300
    np.testing.assert_array_equal(load_dataset("digits", "test", image_size=16)[0],
                                  load_digits("test", 16)[0])


@pytest.mark.parametrize("kwargs, name", [
    (dict(split="val"), "split"), (dict(split="train", image_size=12), "image_size"),
    (dict(split="train", image_size=0), "image_size")])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        load_digits(**kwargs)
    with pytest.raises(ValueError, match="name"):
        load_dataset("cifar", "train")
