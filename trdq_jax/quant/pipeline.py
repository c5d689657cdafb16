"""End-to-end helpers around ``calibrate`` / ``quantize`` for a model with its ``ExperimentConfig``:
the calibration labels and seed, a fingerprint of the float weights, the quantized-size summary.

Calibration labels are ``per_class`` samples of every class drawn from ``DEFAULT_CALIB_SEED``,
a seed the evaluation commands (seed 0 by default) do not use.
"""
from __future__ import annotations

import jax
import numpy as np

from trdq_jax.config import ExperimentConfig
from trdq_jax.models.factory import input_shape
from trdq_jax.quant.calibrate import calibrate
from trdq_jax.quant.recipe import RECIPES, Recipe, get_recipe
from trdq_jax.quant.transform import float_bytes_of, quantized_layer_paths, weight_bytes
from trdq_jax.sampling.generate import null_label
from trdq_jax.sampling.solvers import Sampler

DEFAULT_CALIB_SEED = 1000


def named_recipe(name: str, w_bits: int = 8, a_bits: int = 8,
                 segments: int | None = None) -> Recipe:
    """``get_recipe(name, w_bits, a_bits)`` with ``num_segments = segments`` when given (one
    segment also means one shared weight copy). Errors name ``name`` / ``w_bits`` /
    ``a_bits`` / ``segments``."""
    if name not in RECIPES:
        raise ValueError(f"recipe: unknown {name!r}; expected one of {sorted(RECIPES)}")
    for arg, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
        if isinstance(bits, bool) or not isinstance(bits, int) or not (
                2 <= bits <= 8 or bits == 16):
            raise ValueError(f"{arg}: expected bits in 2..8 (or 16 = float), got {bits!r}")
    if segments is not None and (isinstance(segments, bool) or not isinstance(segments, int)
                                 or segments < 1):
        raise ValueError(f"segments: expected a positive int, got {segments!r}")
    overrides = {} if segments is None else {"num_segments": segments}
    if segments == 1 and RECIPES[name].per_segment_weights:
        overrides["per_segment_weights"] = False  # one segment: one weight copy
    return get_recipe(name, w_bits, a_bits, **overrides)


def calibration_labels(num_classes: int, per_class: int) -> np.ndarray:
    """int32 ``[num_classes * per_class]``: ``per_class`` of every class, class-major."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class: expected a positive int, got {per_class!r}")
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def spread_labels(num_classes: int, num_samples: int) -> np.ndarray:
    """int32 ``[num_samples]``: classes spread evenly over ``0 .. num_classes - 1``
    (``i * num_classes // num_samples``): distinct classes when ``num_samples <= num_classes``
    (e.g. 32 of ImageNet's 1000), about equally many of each otherwise."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
    return (np.arange(num_samples, dtype=np.int64) * num_classes // num_samples).astype(np.int32)


def run_calibration(model, params, cfg: ExperimentConfig, recipe: Recipe, *, per_class: int = 4,
                    seed: int = DEFAULT_CALIB_SEED, rows_per_step: int = 64,
                    num_samples: int | None = None, progress: bool = False,
                    prompts=None, text_encoder=None, prompt_cache=None):
    """``trdq_jax.quant.calibrate`` on ``per_class`` labels of every class (or, with
    ``num_samples``, that many samples of classes spread over all, ``spread_labels``) with
    ``cfg``'s sampler and guidance. Returns the ``Calibration``.

    A text-conditioned (PixArt) model calibrates on ``prompts`` (sample i takes prompt i mod P;
    ``per_class`` samples of each, or ``num_samples`` in all) encoded by ``text_encoder``
    (default ``cfg.train.text_encoder``; embeddings cached in ``prompt_cache``), with the
    empty-prompt null branch; the bundled text model defaults to its training phrasings of
    every digit (``trdq_jax.data.captions.TRAIN_TEMPLATES``)."""
    if recipe.num_segments > cfg.sampler.num_steps:
        raise ValueError(f"recipe: {recipe.num_segments} segments but the sampler has only "
                         f"{cfg.sampler.num_steps} steps")
    if isinstance(rows_per_step, bool) or not isinstance(rows_per_step, int) or rows_per_step < 1:
        raise ValueError(f"rows_per_step: expected a positive int, got {rows_per_step!r}")
    sampler = Sampler.from_config(cfg.sampler)
    if cfg.model.family == "pixart":
        cond, null = text_calibration(cfg, per_class, num_samples, prompts, text_encoder,
                                      prompt_cache)
        return calibrate(model, params, recipe, sampler, cond=cond, null_cond=null,
                         shape=input_shape(cfg.model, len(cond["mask"])), seed=seed,
                         rows_per_step=rows_per_step, progress=progress)
    if prompts is not None:
        raise ValueError(f"prompts: the model ({cfg.model.family}) is not conditioned on text")
    labels = (calibration_labels(cfg.model.num_classes, per_class) if num_samples is None
              else spread_labels(cfg.model.num_classes, num_samples))
    return calibrate(model, params, recipe, sampler, labels=labels,
                     null_label=null_label(cfg.model), shape=input_shape(cfg.model, len(labels)),
                     seed=seed, rows_per_step=rows_per_step, progress=progress)


def text_calibration(cfg, per_class, num_samples, prompts, text_encoder, prompt_cache):
    """``(cond, null_cond)`` of a text model's calibration set (see ``run_calibration``):
    caption embeddings ``[n, max_tokens, D]`` and masks ``[n, max_tokens]``, the empty prompt
    as the null branch."""
    from trdq_jax.data.captions import TRAIN_TEMPLATES, prompts_for
    from trdq_jax.sampling.prompts import (caption_conditioning, encode_prompts,
                                           null_conditioning)
    if prompts is None:
        if cfg.train.dataset != "captioned_digits":
            raise ValueError("prompts: a text-conditioned model calibrates on prompts; give "
                             "a list of them (e.g. captions like those it will draw)")
        labels = (calibration_labels(10, per_class) if num_samples is None
                  else spread_labels(10, num_samples))
        prompts = prompts_for(labels, TRAIN_TEMPLATES)
        per_sample = np.arange(len(prompts))
    else:
        count = len(prompts) * per_class if num_samples is None else num_samples
        per_sample = np.arange(count) % max(len(prompts), 1)
    encoder = text_encoder or cfg.train.text_encoder
    if not encoder:
        raise ValueError("text_encoder: the model's config names no text encoder; give its T5 "
                         "directory")
    emb, mask, _ = encode_prompts(list(prompts) + [""], encoder, cfg.model.max_tokens,
                                  cache_dir=prompt_cache)
    cond = caption_conditioning(emb[:-1][per_sample], mask[:-1][per_sample])
    return cond, null_conditioning(cond, "empty_prompt", empty=(emb[-1], mask[-1]))


def quantize_summary(params, qparams, recipe: Recipe, seconds: float) -> dict:
    """Bytes held by the quantized layers vs their bf16 size, the whole quantized model (layers
    + float remainder) vs the whole float model in bf16, and timing."""
    paths = quantized_layer_paths(qparams)
    model_bf16 = 2 * sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))
    held = weight_bytes(qparams)
    bf16 = float_bytes_of(params, paths)
    return {"recipe": recipe.name, "w_bits": recipe.w_bits, "a_bits": recipe.a_bits,
            "num_segments": recipe.num_segments, "quantized_layers": len(paths),
            "weight_bytes": held["quantized_layers"], "bf16_bytes": bf16,
            "ratio_to_bf16": round(held["quantized_layers"] / bf16, 4),
            "float_param_bytes": held["float_params"], "model_bytes": held["total"],
            "model_ratio_to_bf16": round(held["total"] / model_bf16, 4),
            "seconds": round(seconds, 3)}
