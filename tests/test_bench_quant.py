"""benchmarks/bench_quant.py's paired comparison of two rows."""
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_quant  # noqa: E402


def test_paired_gain_is_mean_difference_and_its_standard_error():
    first = {"psnr_values": np.array([30.0, 40.0, 50.0, np.inf])}
    row = {"psnr_values": np.array([31.0, 42.0, 53.0, np.inf])}  # an exact sample on both
    # differences 1, 2, 3 (inf - inf dropped): mean 2, sample SD 1, SE 1 / sqrt(3)
    assert bench_quant.paired_gain(row, first) == "+2.00 +- 0.58"
    assert bench_quant.paired_gain(first, first) == "(reference)"
    assert bench_quant.paired_gain({"psnr_values": np.array([31.0, np.inf, np.inf, np.inf])},
                                   first) == "n/a"


def test_validation_templates_avoid_the_judged_and_calibration_phrasings():
    from trdq_jax.data.captions import HELDOUT_TEMPLATES, TRAIN_TEMPLATES
    for per_class in (1, 2, 3):
        held = bench_quant.validation_templates(per_class)
        judged = HELDOUT_TEMPLATES[:per_class]
        assert held and not set(held) & (set(judged) | set(TRAIN_TEMPLATES))
