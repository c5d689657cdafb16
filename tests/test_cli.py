"""The ``trdq`` command line: help texts, info, convert, error reporting, and the demo."""
import json

import numpy as np
import pytest

from trdq_jax import checkpoint
from trdq_jax.cli import build_parser, main
from tests.models import official_dit


@pytest.mark.parametrize("command", [[], ["info"], ["demo"], ["sample"], ["train"], ["convert"]])
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
    assert "| per_sample_ms |" in (tmp_path / "report.md").read_text()
