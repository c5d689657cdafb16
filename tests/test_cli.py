"""The ``trdq`` command line: help texts, info, convert, error reporting, and the demo."""
import json

import numpy as np
import pytest

from PIL import Image

from trdq_jax import checkpoint
from trdq_jax.cli import build_parser, main
from trdq_jax.models import zoo
from tests.models import official_dit


@pytest.mark.parametrize("command", [[], ["info"], ["demo"], ["sample"], ["train"], ["convert"],
                                     ["eval"], ["calibrate"], ["quantize"], ["plot-ranges"]])
def test_help_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(command + ["--help"])
    assert e.value.code == 0
    assert "usage: trdq" in capsys.readouterr().out


def test_info_lists_bundled_models(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "digits-dit" in out and "backend cpu" in out


def test_convert_official_checkpoint(tmp_path, capsys):
    dims = dict(depth=1, hidden=32, in_ch=4, patch=2, num_classes=3, mlp_hidden=128, out_ch=8,
                n_tokens=16)
    sd = official_dit.random_state_dict(np.random.default_rng(0), **dims)
    np.savez(tmp_path / "dit.npz", **sd)
    assert main(["convert", "--input", str(tmp_path / "dit.npz"), "--out", str(tmp_path / "ck"),
                 "--num-heads", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["hidden_size"] == 32 and printed["config"]["num_classes"] == 3
    params, cfg = checkpoint.restore(tmp_path / "ck")
    np.testing.assert_array_equal(params["blocks_0"]["attn"]["proj"]["kernel"],
                                  sd["blocks.0.attn.proj.weight"].T)


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["convert", "--input", str(tmp_path / "none.npz"), "--out", str(tmp_path)]) == 2
    assert "trdq convert: error: --input: no checkpoint file" in capsys.readouterr().err
    cfg = tmp_path / "c.py"
    cfg.write_text("from trdq_jax.config import *\n"
                   "def get_config():\n    return ExperimentConfig(name='c', model=DiTConfig())\n")
    assert main(["train", "--config", str(cfg), "--set", "model.nope=1",
                 "--workdir", str(tmp_path / "w")]) == 2
    assert "has no field 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_writes_grid_and_reports(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--per-class", "2"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_samples"] == 20
    assert (tmp_path / "grid.png").stat().st_size > 0
    md = (tmp_path / "report.md").read_text()
    assert "| per_sample_ms |" in md and "| W4A8 |" in md and "grid_quantized.png" in md

    # TR-DQ section: same 20 labels (2 per class) from the same noise as the float samples
    quant = report["quantized"]
    assert quant["num_samples"] == 20 and quant["calibration"]["seed"] == 1000
    assert set(quant["settings"]) == {"W8A8", "W4A8"}
    saved = np.load(tmp_path / "samples_quantized.npz")
    np.testing.assert_array_equal(saved["labels"], np.tile(np.arange(10), 2))
    float_ = np.clip(saved["float"].astype(np.float64), -1, 1)
    _, params, _ = zoo.load("digits-dit")
    # every Dense but the output projection (the patch embedding is a conv, the labels a table)
    dense = [params[f"blocks_{i}"][m][n] for i in range(6)
             for m, n in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))]
    dense += [params[f"blocks_{i}"]["adaLN_modulation_1"] for i in range(6)]
    dense += [params["final_layer"]["adaLN_modulation_1"], params["t_embedder"]["mlp_0"],
              params["t_embedder"]["mlp_2"]]
    bf16_bytes = 2 * sum(d["kernel"].size + d["bias"].size for d in dense)
    for name, entry in quant["settings"].items():
        q = np.clip(saved[name.lower()].astype(np.float64), -1, 1)
        mse = ((q - float_) ** 2).mean(axis=(1, 2, 3))
        np.testing.assert_allclose(entry["psnr_db_vs_float"], np.mean(10 * np.log10(4 / mse)),
                                   rtol=1e-6)
        assert entry["bf16_bytes"] == bf16_bytes
        assert entry["ratio_to_bf16"] == round(entry["weight_bytes"] / bf16_bytes, 4)
        assert 0 <= entry["class_match"]["accuracy"] <= 1 and entry["digits_fid"] > 0
        assert entry["calibration_plus_quantization_s"] > entry["seconds"] > 0
    w8, w4 = quant["settings"]["W8A8"], quant["settings"]["W4A8"]
    assert w8["psnr_db_vs_float"] > 35 and w8["psnr_db_vs_float"] > w4["psnr_db_vs_float"] > 15
    assert w4["ratio_to_bf16"] < 0.30 < w8["ratio_to_bf16"] < 0.6
    # float | W8A8 | W4A8 panels of 2 tiles (8x8 at 4x + 2 px), 10 class rows
    assert Image.open(tmp_path / "grid_quantized.png").size == (70 + 3 * 68 + 32 + 2,
                                                                46 + 10 * 34 + 2)


def test_grid_rows_for_images_and_videos():
    from trdq_jax.sampling.generate import grid_rows
    images = np.arange(12.0).reshape(12, 1, 1, 1)
    labels = np.array([0, 1] * 6)
    rows = grid_rows(images, labels, 3, max_cols=4)
    np.testing.assert_array_equal(rows[0][:, 0, 0, 0], [0, 2, 4, 6])
    assert rows[2].shape == (0, 1, 1, 1)
    videos = np.arange(4 * 3.0).reshape(4, 3, 1, 1, 1)  # video i, frame f = 3 i + f
    rows = grid_rows(videos, np.array([1, 0, 1, 0]), 3)
    np.testing.assert_array_equal(rows[0][:, 0, 0, 0], [3, 4, 5])  # first video of class 0
    np.testing.assert_array_equal(rows[1][:, 0, 0, 0], [0, 1, 2])
    assert rows[2].shape == (0, 1, 1, 1)


def test_demo_on_a_video_model(tmp_path, monkeypatch):
    # A tiny untrained video DiT stands in for the bundled one (the real one costs minutes);
    # the judge is the real bundled moving-digits classifier.
    import jax

    from trdq_jax.config import ExperimentConfig, SamplerConfig, VideoDiTConfig
    from trdq_jax.demo import run_demo
    from trdq_jax.models import build_model, init_params
    cfg = ExperimentConfig(
        name="tiny-vdit", sampler=SamplerConfig(solver="ddim", num_steps=4, cfg_scale=2.0),
        model=VideoDiTConfig(num_frames=2, input_size=12, in_channels=1, patch_size=4,
                             hidden_size=32, depth=1, num_heads=2, num_classes=10,
                             learn_sigma=False, temporal_attention="video"))
    tiny = (build_model(cfg.model), init_params(cfg.model, jax.random.key(0)), cfg)
    real_load = zoo.load
    monkeypatch.setattr(zoo, "available", lambda: ["tiny-vdit", "moving-digits-classifier"])
    monkeypatch.setattr(zoo, "load", lambda n: tiny if n == "tiny-vdit" else real_load(n))
    report = run_demo(tmp_path, model_name="tiny-vdit", per_class=1, quant_per_class=1)
    assert report["num_samples"] == 10 and report["classifier"] == "moving-digits-classifier"
    assert "frame_accuracy" in report["class_match"]
    assert set(report["quantized"]["settings"]) == {"W8A8", "W4A8"}
    width, height = Image.open(tmp_path / "grid.png").size
    assert width > 2 * 12 * 4 and height > 10 * 12 * 4  # 10 rows of the 2 frames of one video


def test_plot_ranges_writes_its_figure(tmp_path, capsys):
    from trdq_jax import files
    from tests.test_quant_cli import TINY, tiny_params
    ck = checkpoint.save(tmp_path / "ck", tiny_params(), TINY)
    out = tmp_path / "figs" / "ranges.png"
    argv = ["plot-ranges", "--checkpoint", str(ck), "--per-class", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert files.file_kind(out) == "figure"
    assert tuple(printed["size"]) == Image.open(out).size
    assert set(printed["layers"]) == {"blocks_0/attn/qkv", "blocks_0/mlp/fc2"}
    before = out.read_bytes()
    assert main(argv) == 2  # an existing figure needs --overwrite
    assert "exists (a trdq_jax figure); pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(argv + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["ranges.png"]


def test_debug_shows_the_traceback_and_bugs_say_so(tmp_path, capsys, monkeypatch):
    argv = ["convert", "--input", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o")]
    for debug_argv in (["--debug"] + argv, argv + ["--debug"]):
        with pytest.raises(ValueError, match="--input: no checkpoint file") as e:
            main(debug_argv)
        assert isinstance(e.value.__cause__, FileNotFoundError)  # the library's own error too
    monkeypatch.setenv("TRDQ_DEBUG", "1")
    with pytest.raises(ValueError):
        main(argv)
    monkeypatch.delenv("TRDQ_DEBUG")
    capsys.readouterr()

    from trdq_jax.cli import models

    def broken(args):
        raise KeyError("oops")
    monkeypatch.setattr(models, "_info", broken)
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert err == ("trdq info: internal error: KeyError: 'oops' (a bug; rerun with --debug for "
                   "the traceback)\n")

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(models, "_info", interrupted)
    assert main(["info"]) == 130
    assert "interrupted" in capsys.readouterr().err
