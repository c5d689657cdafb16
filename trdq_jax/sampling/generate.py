"""Batched generation on top of ``sample``: many labels in fixed-size batches, and grid rows."""
from __future__ import annotations

import numpy as np

from trdq_jax.config import ExperimentConfig


def null_label(model_cfg) -> int:
    """The label index that means "unconditional" (the extra CFG row of the label table)."""
    if not hasattr(model_cfg, "class_dropout_prob"):
        raise ValueError(f"model: a {type(model_cfg).__name__} has no class labels, so no null "
                         "label; give the conditioning and its null_cond")
    if model_cfg.class_dropout_prob <= 0:
        raise ValueError("model: trained without label dropout, so it has no null label for CFG")
    return model_cfg.num_classes


def generate(model, params, cfg: ExperimentConfig, cond, *, seed: int = 0,
             cfg_scale: float | None = None, batch_size: int | None = None,
             share_cfg=False, progress: bool = False, sampler=None,
             apply_fn=None, x_T=None, null_cond=None, num_samples: int | None = None) -> np.ndarray:
    """Sample a batch of conditionings in batches; sample i depends only on ``(seed, i)``.

    cond: class labels ints ``[N]`` (the null label is the model config's), any conditioning
    pytree with leading axis N and its ``null_cond`` (``trdq_jax.sampling.conditioning``), or
    None with ``num_samples`` for an unconditional model.
    ``apply_fn``: the denoiser (default ``denoise_fn_for(model)``; e.g. a
    ``trdq_jax.quant.QuantizedDenoiser`` with quantized ``params``); ``sampler`` defaults to
    ``cfg.sampler``'s. ``share_cfg``: a bool or a ``CFGPlan`` (see ``sample``). ``x_T``:
    optional initial noise of all N samples, shape ``(N, ...spatial, C)``, sliced per batch (see
    ``sample``; the default is ``initial_noise(seed, shape)``).
    Returns float32 ``[N, ...spatial, C]`` (the first ``in_channels`` output channels).
    """
    from trdq_jax.models import input_shape
    from trdq_jax.sampling import Sampler, conditioning, denoise_fn_for, sample

    if cond is not None and null_cond is None:  # class labels: the config's null label
        cond = np.asarray(cond)
        if cond.ndim != 1 or cond.size == 0:
            raise ValueError(f"labels: expected a non-empty 1-D array, got shape {cond.shape}")
        null = {"null_label": null_label(cfg.model)}
    else:
        cond, null = conditioning.check_cond(cond), {"null_cond": null_cond}
    n = num_samples if cond is None else conditioning.batch_size(cond)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_samples: an unconditional model (cond None) needs the sample "
                         f"count, a positive int; got {num_samples!r}")
    if x_T is not None:
        want = input_shape(cfg.model, n)
        got = tuple(np.shape(x_T))
        if got != want:
            raise ValueError(f"x_T: expected shape {want} (len(labels) = {n} samples of the "
                             f"model's input), got {got}")
    sampler = sampler or Sampler.from_config(cfg.sampler)
    batch_size = batch_size or cfg.generation.batch_size
    apply_fn = apply_fn or denoise_fn_for(model)
    out = []
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="sampling", unit="batch")
    for start in starts:
        chunk = slice(start, min(start + batch_size, n))
        batch_null = {k: conditioning.take_null(v, cond, chunk) if k == "null_cond" else v
                      for k, v in null.items()}
        x = sample(apply_fn, params, sampler, conditioning.take(cond, chunk), seed=seed,
                   cfg_scale=cfg_scale, **batch_null,
                   shape=input_shape(cfg.model, chunk.stop - start), share_cfg=share_cfg,
                   sample_offset=start, x_T=None if x_T is None else x_T[chunk])
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
