"""PIL figures and ``trdq plot-ranges``: sizes, tick maths, and the data the range plot shows."""
import json

import numpy as np
import pytest
from PIL import Image

from trdq_jax import checkpoint, plots
from trdq_jax.cli import main
from trdq_jax.models import build_model
from trdq_jax.quant import get_recipe, quantize_layer
from trdq_jax.quant_cli import plot_layers, run_calibration
from tests.test_quant_cli import TINY, tiny_params

OUTLIER_CHANNEL, OUTLIER_VALUE = 5, 30.0


def test_nice_ticks_are_round_and_cover_the_range():
    np.testing.assert_allclose(plots.nice_ticks(0, 10), [0, 2, 4, 6, 8, 10])
    np.testing.assert_allclose(plots.nice_ticks(-0.37, 1.2), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(plots.nice_ticks(3, 3), [3.0, 3.2, 3.4, 3.6, 3.8, 4.0])
    with pytest.raises(ValueError, match="lo, hi: expected finite"):
        plots.nice_ticks(0, float("nan"))


def test_range_curves_match_brute_force():
    rows = np.random.default_rng(0).normal(size=(4, 7, 5)).astype(np.float32)
    curves = plots.range_curves(rows)
    for s in range(4):
        x = rows[s].astype(np.float64)
        assert curves.low[s] == min(min(r) for r in x) and curves.high[s] == max(max(r) for r in x)
        np.testing.assert_allclose(curves.mean_absmax[s],
                                   np.mean([max(abs(x[:, k])) for k in range(5)]), rtol=1e-12)
    assert curves.absmax == np.abs(rows).max()
    with pytest.raises(ValueError, match=r"rows: expected a non-empty \[steps, R, K\]"):
        plots.range_curves(rows[0])


def test_panel_figure_and_comparison_grid_sizes(tmp_path):
    x = np.arange(5.0)
    panel = plots.Panel("p", x, bands=(plots.Band("b", (200, 0, 0), x - 1, x + 1),),
                        lines=(plots.Line("l", (0, 0, 200), x),), xlabel="step", ylabel="v",
                        vlines=(2.5,))
    assert plots.save_panels(tmp_path / "f.png", [panel] * 3, title="t") == (1120, 724)
    assert Image.open(tmp_path / "f.png").size == (1120, 724)
    white, black = np.ones((2, 8, 8, 1)), -np.ones((2, 8, 8, 1))
    size = plots.save_comparison_grid(
        tmp_path / "g.png", {"float": [black, black], "W8A8": [white, black],
                             "W4A8": [black, white]}, ["digit 0", "digit 1"], title="t")
    # label column 70 + 3 panels of 2 tiles (32 px + 2 pad) + 2 gaps of 16 + 2; 46 + 2 * 34 + 2
    assert size == (70 + 3 * 68 + 32 + 2, 46 + 68 + 2)
    img = np.asarray(Image.open(tmp_path / "g.png"))
    assert img.shape == (116, 308, 3)
    assert (img[46:78, 70:102] == 0).all()            # float, row 0: black tiles
    assert (img[46:78, 70 + 68 + 16:70 + 68 + 48] == 255).all()  # W8A8, row 0: white
    assert not list(tmp_path.glob(".*tmp*"))           # atomic writes leave no temporaries


def test_default_plot_layers_are_first_and_last_qkv_and_fc2():
    paths = [f"blocks_{i}/{m}" for i in range(3)
             for m in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")]
    assert plot_layers(paths) == ["blocks_0/attn/qkv", "blocks_0/mlp/fc2", "blocks_2/attn/qkv",
                                  "blocks_2/mlp/fc2"]
    unet = ["down_0_attn_0/attn/qkv", "down_0_attn_0/attn/proj", "mid_attn/attn/qkv"]
    assert plot_layers(unet) == ["down_0_attn_0/attn/qkv", "mid_attn/attn/qkv"]
    assert plot_layers(paths, r"blocks_1/mlp") == ["blocks_1/mlp/fc1", "blocks_1/mlp/fc2"]
    with pytest.raises(ValueError, match="--layers: 'nothing' matches no quantized layer"):
        plot_layers(paths, "nothing")


def _outlier_params():
    """Channel 5 of the fc2 input is gelu(30) = 30 for every token: a planted outlier."""
    params = tiny_params()
    fc1 = params["blocks_0"]["mlp"]["fc1"]
    fc1["kernel"] = fc1["kernel"].at[:, OUTLIER_CHANNEL].set(0.0)
    fc1["bias"] = fc1["bias"].at[OUTLIER_CHANNEL].set(OUTLIER_VALUE)
    return params


def test_plot_ranges_shrinks_a_planted_outlier(tmp_path, capsys):
    ck = tmp_path / "ck"
    params = _outlier_params()
    checkpoint.save(ck, params, TINY)
    assert main(["plot-ranges", "--checkpoint", str(ck), "--segments", "2",
                 "--out", str(tmp_path / "ranges.png")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(printed["layers"]) == ["blocks_0/attn/qkv", "blocks_0/mlp/fc2"]
    assert Image.open(tmp_path / "ranges.png").size == (1120, 394)  # 2 panels, one row

    # the data behind the fc2 panel, recomputed in process and checked against numpy
    recipe = get_recipe("trdq", 4, 8, num_segments=2)
    calib = run_calibration(build_model(TINY.model), params, TINY, recipe, per_class=2)
    stats, table = calib.stats["blocks_0/mlp/fc2"], calib.segment_of_step
    fc2 = params["blocks_0"]["mlp"]["fc2"]
    q = quantize_layer(fc2["kernel"], fc2["bias"], stats, table, 2, recipe)
    before, after = plots.layer_ranges(stats, q, table)
    np.testing.assert_allclose(before.high, OUTLIER_VALUE, rtol=1e-5)
    np.testing.assert_allclose(before.low, stats.rows.astype(np.float64).min(axis=(1, 2)))
    rotated = plots.transformed_rows(stats, q, table)
    assert q.smooth.shape == (1, 4 * 48)  # trdq: one smoothing shared by the segments
    smoothed = stats.rows.astype(np.float64) / np.asarray(q.smooth[0], np.float64)
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1),  # a rotation keeps row norms
                               np.linalg.norm(smoothed, axis=-1), rtol=1e-4)
    np.testing.assert_allclose(after.high, rotated.max(axis=(1, 2)))
    assert after.absmax < 0.25 * before.absmax, (after.absmax, before.absmax)
    reported = printed["layers"]["blocks_0/mlp/fc2"]
    assert reported == {"before_absmax": round(before.absmax, 4),
                        "after_absmax": round(after.absmax, 4)}
