"""``viz.save_grid`` and ``viz.save_comparison_grid``: layout, marker, atomic overwrite."""
import hashlib

import numpy as np
import pytest
from PIL import Image

from trdq_jax import files
from trdq_jax.viz import save_comparison_grid, save_grid, to_uint8


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


def test_grids_are_marked_figures_and_overwrite_only_with_permission(tmp_path):
    out = tmp_path / "g.png"
    save_grid(out, [np.zeros((1, 8, 8, 1))], ["a"])
    assert files.file_kind(out) == "figure"
    old = hashlib.sha256(out.read_bytes()).hexdigest()
    with pytest.raises(files.OutputError, match="exists"):
        save_grid(out, [np.ones((1, 8, 8, 1))], ["a"])
    assert hashlib.sha256(out.read_bytes()).hexdigest() == old
    save_grid(out, [np.ones((1, 8, 8, 1))], ["a"], overwrite=True)
    assert np.asarray(Image.open(out))[2:34, 62:94].min() == 255  # the new, white tile
    with pytest.raises(ValueError, match="^path: expected a .png file"):
        save_grid(tmp_path / "g.jpg", [np.zeros((1, 8, 8, 1))], ["a"])
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # no temporaries left


def test_comparison_grid_size_tiles_and_marker(tmp_path):
    white, black = np.ones((2, 8, 8, 1)), -np.ones((2, 8, 8, 1))
    settings = {"float": [black, black], "W8A8": [white, black], "W4A8": [black, white]}
    out = tmp_path / "c.png"
    size = save_comparison_grid(out, settings, ["digit 0", "digit 1"], title="t")
    # label column 70 + 3 panels of 2 tiles (32 px + 2 pad) + 2 gaps of 16 + 2; 46 + 2 * 34 + 2
    assert size == (70 + 3 * 68 + 32 + 2, 46 + 68 + 2)
    img = np.asarray(Image.open(out))
    assert img.shape == (116, 308, 3)
    assert (img[46:78, 70:102] == 0).all()                       # float, row 0: black tiles
    assert (img[46:78, 70 + 68 + 16:70 + 68 + 48] == 255).all()  # W8A8, row 0: white
    assert (img[:46] < 128).any() and (img[:, :70] < 128).any()  # title, names, row labels
    assert files.file_kind(out) == "figure"
    old = hashlib.sha256(out.read_bytes()).hexdigest()
    with pytest.raises(files.OutputError):
        save_comparison_grid(out, settings, ["digit 0", "digit 1"], title="u")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == old
    assert save_comparison_grid(out, settings, ["digit 0", "digit 1"], title="u",
                                overwrite=True) == size
    assert hashlib.sha256(out.read_bytes()).hexdigest() != old
    with pytest.raises(ValueError, match=r"^settings\['W8A8'\]: expected 2 rows, got 1"):
        save_comparison_grid(out, {"float": [black, black], "W8A8": [white]},
                             ["digit 0", "digit 1"], title="t")
