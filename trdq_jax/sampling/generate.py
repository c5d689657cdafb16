"""Batched generation on top of ``sample``: many labels in fixed-size batches, and grid rows."""
from __future__ import annotations

import numpy as np

from trdq_jax.config import ExperimentConfig


def null_label(model_cfg) -> int:
    """The label index that means "unconditional" (the extra CFG row of the label table)."""
    if model_cfg.class_dropout_prob <= 0:
        raise ValueError("model: trained without label dropout, so it has no null label for CFG")
    return model_cfg.num_classes


def generate(model, params, cfg: ExperimentConfig, labels, *, seed: int = 0,
             cfg_scale: float | None = None, batch_size: int | None = None,
             share_cfg=False, progress: bool = False, sampler=None,
             apply_fn=None, x_T=None) -> np.ndarray:
    """Sample ``len(labels)`` images/videos in batches; sample i depends only on ``(seed, i)``.

    ``apply_fn``: the denoiser (default ``denoise_fn_for(model)``; e.g. a
    ``trdq_jax.quant.QuantizedDenoiser`` with quantized ``params``); ``sampler`` defaults to
    ``cfg.sampler``'s. ``share_cfg``: a bool or a ``CFGPlan`` (see ``sample``). ``x_T``:
    optional initial noise of all ``len(labels)`` samples, shape ``(len(labels), ...spatial,
    C)``, sliced per batch (see ``sample``; the default is ``initial_noise(seed, shape)``).
    Returns float32 ``[N, ...spatial, C]`` (the first ``in_channels`` output channels).
    """
    from trdq_jax.models import input_shape
    from trdq_jax.sampling import Sampler, denoise_fn_for, sample

    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels: expected a non-empty 1-D array, got shape {labels.shape}")
    if x_T is not None:
        want = input_shape(cfg.model, len(labels))
        got = tuple(np.shape(x_T))
        if got != want:
            raise ValueError(f"x_T: expected shape {want} (len(labels) = {len(labels)} samples "
                             f"of the model's input), got {got}")
    sampler = sampler or Sampler.from_config(cfg.sampler)
    batch_size = batch_size or cfg.generation.batch_size
    apply_fn = apply_fn or denoise_fn_for(model)
    out = []
    starts = range(0, len(labels), batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="sampling", unit="batch")
    for start in starts:
        chunk = labels[start:start + batch_size]
        x = sample(apply_fn, params, sampler, chunk, seed=seed, cfg_scale=cfg_scale,
                   null_label=null_label(cfg.model), shape=input_shape(cfg.model, len(chunk)),
                   share_cfg=share_cfg, sample_offset=start,
                   x_T=None if x_T is None else x_T[start:start + batch_size])
        out.append(np.asarray(x))
    return np.concatenate(out)


def class_rows(samples: np.ndarray, labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Group samples by label: one ``[n_c, ...]`` array per class (for labelled grids)."""
    return [samples[labels == c] for c in range(num_classes)]


def grid_rows(samples: np.ndarray, labels: np.ndarray, num_classes: int,
              max_cols: int = 10) -> list[np.ndarray]:
    """One grid row ``[n, H, W, C]`` per class: its first ``max_cols`` images, or, for videos
    ``[N, F, H, W, C]``, the ``F`` frames of its first video (a class without samples gives an
    empty row)."""
    rows = class_rows(samples, labels, num_classes)
    if samples.ndim == 5:
        return [r[0] if len(r) else r.reshape((0,) + r.shape[2:]) for r in rows]
    return [r[:max_cols] for r in rows]
