"""One calibration of the tiny DiT for the quantization tests: every recipe's calibration is
derived from its statistics (``derive_calibration``) instead of running the model again."""
import pytest

import trdq_jax.quant as Q
from trdq_jax.models import build_model
from trdq_jax.quant.calibrate import derive_calibration
from trdq_jax.quant.pipeline import run_calibration
from trdq_jax.sampling import Sampler
from tests.test_quant_cli import TINY, tiny_params


@pytest.fixture(scope="session")
def tiny_calibrated():
    """``(model, params, calibrate_for)``: ``calibrate_for(recipe)`` is the recipe's
    ``Calibration`` of the tiny DiT (one sample per class, 16 rows per step)."""
    params = tiny_params()
    model = build_model(TINY.model)
    shared = run_calibration(model, params, TINY, Q.get_recipe("quarot", 4, 8, num_segments=2),
                             per_class=1, rows_per_step=16)
    sampler = Sampler.from_config(TINY.sampler)
    return model, params, lambda recipe: derive_calibration(shared, recipe, sampler)
