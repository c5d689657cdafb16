"""TR-DQ quantization as pure transforms on parameter pytrees.

::

    recipe = tq.quant.get_recipe("trdq", w_bits=4, a_bits=8)
    calib = tq.quant.calibrate(model, params, recipe, sampler, labels=..., null_label=10, shape=...)
    qparams = tq.quant.quantize(params, calib, recipe)            # {"float": ..., "layers": ...}
    apply_fn = tq.quant.QuantizedDenoiser(model, backend="xla")     # for tq.sampling.sample
    sampler = sampler.with_segments(calib.segment_of_step, calib.num_segments)
"""
from trdq_jax.quant.calibrate import Calibration, calibrate
from trdq_jax.quant.calib_io import CalibrationError, load_calibration, save_calibration
from trdq_jax.quant.io import load_quantized, load_quantized_model, save_quantized
from trdq_jax.quant.qlinear import (BACKENDS, QLinear, qlinear_apply, qlinear_bytes,
                                    segment_invariant)
from trdq_jax.quant.recipe import (DEFAULT_KEEP_FLOAT, DEFAULT_WEIGHT_ONLY, RECIPES, Recipe,
                                   get_recipe)
from trdq_jax.quant.roles import layer_roles
from trdq_jax.quant.transform import (QuantizedDenoiser, Selection, calibrated_selection,
                                      float_bytes_of, quantize, quantize_layer,
                                      quantized_layer_paths, select_layers, weight_bytes)

__all__ = ["BACKENDS", "Calibration", "CalibrationError", "DEFAULT_KEEP_FLOAT",
           "DEFAULT_WEIGHT_ONLY", "QLinear", "QuantizedDenoiser", "RECIPES", "Recipe", "Selection",
           "calibrate", "calibrated_selection", "float_bytes_of", "get_recipe", "layer_roles",
           "load_calibration", "load_quantized", "load_quantized_model", "qlinear_apply",
           "qlinear_bytes", "quantize", "quantize_layer", "quantized_layer_paths",
           "save_calibration", "save_quantized", "segment_invariant", "select_layers",
           "weight_bytes"]
