"""``viz.save_grid``: layout of the PNG grid."""
import numpy as np
import pytest
from PIL import Image

from trdq_jax.viz import save_grid, to_uint8


def test_to_uint8_maps_the_data_range():
    np.testing.assert_array_equal(to_uint8(np.array([-1.0, 0.0, 1.0, 3.0])), [0, 128, 255, 255])


def test_grid_size_and_tiles(tmp_path):
    rows = [np.full((3, 8, 8, 1), -1.0), np.ones((2, 8, 8, 1))]
    save_grid(tmp_path / "g.png", rows, ["a", "b"], scale=2, pad=1, label_width=10)
    img = np.asarray(Image.open(tmp_path / "g.png"))
    assert img.shape == (1 + 2 * (16 + 1), 10 + 3 * (16 + 1) + 1, 3)
    np.testing.assert_array_equal(img[1:17, 11:27], 0)        # row 0, first tile: black
    np.testing.assert_array_equal(img[18:34, 11:27], 255)     # row 1, first tile: white


def test_long_title_widens_a_narrow_grid(tmp_path):
    title = "moving-digits-vdit, DDIM 50 steps, CFG 5.0, seed 0"
    save_grid(tmp_path / "g.png", [np.zeros((1, 8, 8, 1))], ["class 0"], title=title)
    img = np.asarray(Image.open(tmp_path / "g.png"))
    band = img[:16]  # the title band
    ink = np.nonzero((band < 128).any(axis=(0, 2)))[0]
    assert ink.size and ink.max() < img.shape[1] - 1  # the last ink column is inside the image
    assert img.shape[1] > 60 + 32 + 4  # wider than the grid alone


def test_rows_and_labels_must_agree(tmp_path):
    with pytest.raises(ValueError, match="^row_labels: expected 1 labels"):
        save_grid(tmp_path / "g.png", [np.zeros((1, 8, 8, 1))], ["a", "b"])
