"""``trdq cfg-analysis``, ``--cfg-plan`` on sample and quantize: outputs, round trips."""
import json

import numpy as np
import pytest
from PIL import Image

from tests.test_quant_cli import TINY, tiny_params
from trdq_jax import checkpoint
from trdq_jax.cli import build_parser, main
from trdq_jax.models import build_model
from trdq_jax.sampling import Sampler, denoise_fn_for, sample
from trdq_jax.sampling.cfg_plan import load_plan


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    checkpoint.save(root / "ck", tiny_params(), TINY)
    assert main(["cfg-analysis", "--checkpoint", str(root / "ck"), "--per-class", "1",
                 "--thresholds", "0.05,1e9", "--max-phases", "2",
                 "--out", str(root / "an")]) == 0
    return root


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["cfg-analysis", "--help"])
    assert e.value.code == 0 and "--thresholds" in capsys.readouterr().out


def test_analysis_directory_holds_tables_heat_map_and_plans(analysed):
    an = analysed / "an"
    analysis = json.loads((an / "analysis.json").read_text())
    assert analysis["layers"] == ["blocks_0/attn"] and analysis["num_steps"] == 6
    err = np.asarray(analysis["share_error"])
    assert err.shape == (6, 1) and np.all(err > 0) and np.all(np.isfinite(err))
    sim = np.asarray(analysis["prob_similarity"])
    assert np.all((sim > 0) & (sim <= 1))
    pixels = np.asarray(Image.open(an / "heatmap.png").convert("L"), float)
    assert pixels.std() > 10  # a picture, not a flat colour
    names = sorted(p.stem for p in (an / "plans").iterdir())
    assert names == ["all", "threshold_0.05", "threshold_1e+09", "trdq_release"]
    everything = load_plan(an / "plans" / "threshold_1e+09.json")
    assert everything.shared_cells() == 6 and len(everything.phases()) == 1
    meta = json.loads((an / "metadata.json").read_text())
    assert meta["kind"] == "cfg_analysis" and meta["plans"]["all"]["shared_cells"] == 6


def test_sample_with_a_plan_file_equals_the_library_call(analysed, tmp_path):
    plan_file = analysed / "an" / "plans" / "threshold_1e+09.json"
    assert main(["sample", "--checkpoint", str(analysed / "ck"), "--per-class", "1",
                 "--cfg-plan", str(plan_file), "--out", str(tmp_path / "s")]) == 0
    got = np.load(tmp_path / "s" / "samples.npz")["samples"]
    meta = json.loads((tmp_path / "s" / "metadata.json").read_text())
    assert meta["share_cfg"] == "threshold_1e+09"
    model = build_model(TINY.model)
    want = sample(denoise_fn_for(model), tiny_params(), Sampler.from_config(TINY.sampler),
                  np.arange(3), seed=0, cfg_scale=2.0, null_label=3, shape=(3, 8, 8, 1),
                  share_cfg=True)  # the plan shares the only layer at every step
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)


def test_quantize_stores_the_plan_and_sample_uses_it(analysed, tmp_path):
    ck, q = analysed / "ck", tmp_path / "q"
    assert main(["quantize", "--checkpoint", str(ck), "--recipe", "minmax", "--per-class", "1",
                 "--rows-per-step", "8", "--cfg-plan", "all", "--out", str(q)]) == 0
    for flags, want in (([], "all"), (["--cfg-plan", "none"], False)):
        out = tmp_path / f"s{len(flags)}"
        assert main(["sample", "--quantized", str(q), "--per-class", "1", *flags,
                     "--out", str(out)]) == 0
        assert json.loads((out / "metadata.json").read_text())["share_cfg"] == want
    shared = np.load(tmp_path / "s0" / "samples.npz")["samples"]
    plain = np.load(tmp_path / "s2" / "samples.npz")["samples"]
    assert np.abs(shared - plain).max() > 1e-4
