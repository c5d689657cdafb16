"""The range figure (matplotlib) and the data it shows (``trdq_jax.quant.ranges``)."""
import hashlib
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from trdq_jax import files, plots
from trdq_jax.config import DiTConfig, ExperimentConfig, GenerationConfig, SamplerConfig
from trdq_jax.models import build_model, init_params, input_shape
from trdq_jax.quant import calibrate, get_recipe, quantize_layer
from trdq_jax.quant.ranges import (layer_ranges, plot_layers, range_curves,
                                   transformed_rows)
from trdq_jax.sampling import Sampler
from trdq_jax.sampling.generate import null_label

TINY = ExperimentConfig(  # the tiny DiT of tests/test_quant_cli.py
    name="tiny-dit",
    model=DiTConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=48, depth=1,
                    num_heads=2, num_classes=3, learn_sigma=False),
    sampler=SamplerConfig(solver="ddim", num_steps=6, cfg_scale=2.0),
    generation=GenerationConfig(batch_size=64))
OUTLIER_CHANNEL, OUTLIER_VALUE = 5, 30.0
BEFORE_RGB, AFTER_RGB = (214, 69, 65), (38, 110, 200)  # plots.BEFORE_COLOR, AFTER_COLOR


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _synthetic_ranges(steps=6, layers=("blocks_0/attn/qkv", "blocks_0/mlp/fc2")):
    rng = np.random.default_rng(0)
    out = {}
    for i, layer in enumerate(layers):
        before = rng.normal(size=(steps, 8, 16))
        before[..., 3] = 10.0 * (i + 1)  # an outlier channel
        out[layer] = (range_curves(before), range_curves(rng.normal(size=(steps, 8, 16))))
    return out


# ----------------------------------------------------------------------------- range data


def test_range_curves_match_brute_force():
    rows = np.random.default_rng(0).normal(size=(4, 7, 5)).astype(np.float32)
    curves = range_curves(rows)
    for s in range(4):
        x = rows[s].astype(np.float64)
        assert curves.low[s] == min(min(r) for r in x) and curves.high[s] == max(max(r) for r in x)
        np.testing.assert_allclose(curves.mean_absmax[s],
                                   np.mean([max(abs(x[:, k])) for k in range(5)]), rtol=1e-12)
    assert curves.absmax == np.abs(rows).max()
    with pytest.raises(ValueError, match=r"rows: expected a non-empty \[steps, R, K\]"):
        range_curves(rows[0])


def test_default_plot_layers_are_first_and_last_qkv_and_fc2():
    paths = [f"blocks_{i}/{m}" for i in range(3)
             for m in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")]
    assert plot_layers(paths) == ["blocks_0/attn/qkv", "blocks_0/mlp/fc2", "blocks_2/attn/qkv",
                                  "blocks_2/mlp/fc2"]
    unet = ["down_0_attn_0/attn/qkv", "down_0_attn_0/attn/proj", "mid_attn/attn/qkv"]
    assert plot_layers(unet) == ["down_0_attn_0/attn/qkv", "mid_attn/attn/qkv"]
    assert plot_layers(paths, r"blocks_1/mlp") == ["blocks_1/mlp/fc1", "blocks_1/mlp/fc2"]
    with pytest.raises(ValueError, match="^pattern: 'nothing' matches no quantized layer"):
        plot_layers(paths, "nothing")


def _outlier_params():
    """Init params perturbed so that the zero-initialised adaLN/final layers do something, and
    channel 5 of the fc2 input is gelu(30) = 30 for every token: a planted outlier."""
    rng = np.random.default_rng(1)  # numpy noise: one jax.random compile per shape is slow
    params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32),
                          init_params(TINY.model, jax.random.key(0)))
    fc1 = params["blocks_0"]["mlp"]["fc1"]
    fc1["kernel"] = fc1["kernel"].at[:, OUTLIER_CHANNEL].set(0.0)
    fc1["bias"] = fc1["bias"].at[OUTLIER_CHANNEL].set(OUTLIER_VALUE)
    return params


def test_smoothing_and_rotation_shrink_a_planted_outlier(tmp_path):
    params = _outlier_params()
    recipe = get_recipe("trdq_smoothing", 4, 8, num_segments=2)
    labels = np.repeat(np.arange(TINY.model.num_classes, dtype=np.int32), 2)
    calib = calibrate(build_model(TINY.model), params, recipe, Sampler.from_config(TINY.sampler),
                      labels=labels, null_label=null_label(TINY.model),
                      shape=input_shape(TINY.model, len(labels)), seed=1000)
    table = calib.segment_of_step
    layers = plot_layers(list(calib.stats))
    assert layers == ["blocks_0/attn/qkv", "blocks_0/mlp/fc2"]
    ranges, qs = {}, {}
    for path in layers:
        node = params
        for key in path.split("/"):
            node = node[key]
        qs[path] = quantize_layer(node["kernel"], node["bias"], calib.stats[path], table, 2,
                                  recipe)
        ranges[path] = layer_ranges(calib.stats[path], qs[path], table)

    # the data behind the fc2 panel, checked against numpy
    stats = calib.stats["blocks_0/mlp/fc2"]
    before, after = ranges["blocks_0/mlp/fc2"]
    np.testing.assert_allclose(before.high, OUTLIER_VALUE, rtol=1e-5)
    np.testing.assert_allclose(before.low, stats.rows.astype(np.float64).min(axis=(1, 2)))
    q = qs["blocks_0/mlp/fc2"]
    rotated = transformed_rows(stats, q, table)
    assert q.smooth.shape == (1, 4 * 48)  # one smoothing shared by the segments
    smoothed = stats.rows.astype(np.float64) / np.asarray(q.smooth[0], np.float64)
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1),  # a rotation keeps row norms
                               np.linalg.norm(smoothed, axis=-1), rtol=1e-4)
    np.testing.assert_allclose(after.high, rotated.max(axis=(1, 2)))
    assert after.absmax < 0.25 * before.absmax, (after.absmax, before.absmax)

    # ... and drawn: two panels in one row, one boundary between the two segments
    size = plots.save_range_figure(tmp_path / "ranges.png", ranges, table, title="tiny")
    assert Image.open(tmp_path / "ranges.png").size == size == (1120, 400)
    assert len(plots.segment_boundaries(table)) == 1
    assert files.file_kind(tmp_path / "ranges.png") == "figure"


# ----------------------------------------------------------------------------- the figure


def test_range_figure_is_a_marked_colourful_png_of_the_returned_size(tmp_path):
    out = tmp_path / "sub" / "ranges.png"  # missing parents are created
    size = plots.save_range_figure(out, _synthetic_ranges(), [0, 0, 0, 1, 1, 1], title="t")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == size == (1120, 400)
        assert image.text["trdq_jax.kind"] == "figure"
        assert image.text["Software"].startswith("trdq_jax ")
        rgb = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    assert files.file_kind(out) == "figure"
    assert len(np.unique(rgb, axis=0)) > 100  # bands, lines, text: far more than a flat colour
    for color in (BEFORE_RGB, AFTER_RGB):  # the mean lines are drawn in the full colours
        assert (np.abs(rgb - color).max(axis=1) <= 8).sum() > 200, color
    assert not list(tmp_path.rglob("*trdq-tmp*"))  # the temporary was renamed into place
    if "matplotlib.pyplot" in sys.modules:  # no figure left in pyplot's global registry
        assert not sys.modules["matplotlib.pyplot"].get_fignums()


@pytest.mark.parametrize("table, boundaries", [([0, 0, 0, 0, 0, 0], []),
                                                ([0, 0, 0, 1, 1, 1], [2.5]),
                                                ([0, 1, 1, 2, 2, 3], [0.5, 2.5, 4.5])])
def test_one_dashed_line_per_segment_boundary(table, boundaries):
    assert plots.segment_boundaries(table) == boundaries
    fig = plots.range_figure(_synthetic_ranges(), table, title="t", columns=1)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        dashed = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert dashed == boundaries
        assert "max |x|: " in ax.get_title() and " -> " in ax.get_title()
        assert ax.get_xlabel() and ax.get_ylabel()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:4] == ["before: min..max", "before: mean channel abs-max",
                          "after: min..max", "after: mean channel abs-max"]
    assert ("time-segment boundary" in labels) == bool(boundaries)
    assert fig.get_suptitle() == "t"


def test_columns_set_the_grid():
    ranges = _synthetic_ranges(layers=("a", "b", "c"))
    assert tuple(plots.range_figure(ranges, range(6), title="t").canvas.get_width_height()) \
        == (1120, 730)  # 2 columns, 2 rows
    assert tuple(plots.range_figure(ranges, range(6), title="t", columns=5)
                 .canvas.get_width_height()) == (1680, 400)  # never more columns than panels


@pytest.mark.parametrize("kwargs, match", [
    ({"ranges": {}}, "^ranges: expected at least one"),
    ({"segment_of_step": [0, 0, 1, 1]}, r"^segment_of_step: 4 steps, but the before curves"),
    ({"columns": 0}, "^columns: expected a positive int, got 0"),
    ({"path": "ranges.jpg"}, "^path: expected a .png file"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, match):
    args = {"path": "ranges.png", "ranges": _synthetic_ranges(),
            "segment_of_step": [0, 0, 0, 1, 1, 1], **kwargs}
    args["path"] = tmp_path / args["path"]
    with pytest.raises(ValueError, match=match):
        plots.save_range_figure(args["path"], args["ranges"], args["segment_of_step"],
                                title="t", columns=kwargs.get("columns", 2))
    assert not list(tmp_path.iterdir())  # nothing written


def test_overwrite_replaces_only_our_figure(tmp_path):
    out, ranges, table = tmp_path / "ranges.png", _synthetic_ranges(), [0, 0, 0, 1, 1, 1]
    plots.save_range_figure(out, ranges, table, title="first")
    old = _sha(out)
    with pytest.raises(files.OutputError, match="pass --overwrite / overwrite=True"):
        plots.save_range_figure(out, ranges, table, title="second")
    assert _sha(out) == old
    plots.save_range_figure(out, ranges, table, title="second", overwrite=True)
    assert _sha(out) != old and files.file_kind(out) == "figure"

    foreign = tmp_path / "photo.png"  # a PNG this project did not write
    Image.new("RGB", (4, 4), (1, 2, 3)).save(foreign)
    old = _sha(foreign)
    with pytest.raises(files.OutputError, match="not written by trdq_jax"):
        plots.save_range_figure(foreign, ranges, table, title="t", overwrite=True)
    assert _sha(foreign) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png", "ranges.png"]
