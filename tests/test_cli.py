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
    assert "trdq convert: error: path: no checkpoint file" in capsys.readouterr().err
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
    dense = [params[f"blocks_{i}"][m][n] for i in range(6)
             for m, n in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))]
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
