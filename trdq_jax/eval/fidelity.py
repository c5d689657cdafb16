"""How close a quantized model samples to its float source, in latents and in decoded pixels.

``compare_to_float(float_dir, quantized_dir, labels=..., seed=...)`` draws the same samples
(same labels, seed and initial noise) from both and reports PSNR (and SSIM on pictures) of the
quantized ones against the float ones:

- ``latent_psnr_db``: on the denoiser's samples; for a latent model these are VAE latents,
  whose range is not fixed, so the peak is the float samples' own spread (max - min over the
  batch), stated in ``latent_data_range``;
- ``pixel_psnr_db`` / ``pixel_ssim``: on the uint8 pictures the float VAE decodes from each
  (peak 255), what a user looks at. Only for a model whose checkpoint holds a VAE.

Digits models (no VAE) are judged by class match and digits-FID (``trdq_jax.eval.judge``);
this comparison works for them too (their samples are the pictures, range [-1, 1]).
"""
from __future__ import annotations

import numpy as np


def compare_to_float(float_dir, quantized_dir, *, labels=None, per_class: int = 1,
                     seed: int = 0, backend: str = "xla", cfg_scale: float | None = None,
                     progress: bool = True) -> dict:
    """PSNR of ``quantized_dir``'s samples against its float source ``float_dir``'s.

    labels: ints ``[N]`` (default ``eval_labels(num_classes, per_class)``: every class
    ``per_class`` times). The quantized checkpoint must be of the float one's model config;
    the VAE used for pixels is the float checkpoint's (the quantized one stores the same).
    """
    from trdq_jax import checkpoint
    from trdq_jax.eval.judge import eval_labels
    from trdq_jax.eval.metrics import psnr, ssim
    from trdq_jax.models.zoo import load_float_model
    from trdq_jax.quant.io import load_quantized_model, stored_cfg_plan
    from trdq_jax.sampling.generate import generate

    model, params, cfg, source = load_float_model(None, float_dir)
    qmodel, qparams, qcfg, qsource, sampler, apply_fn = load_quantized_model(quantized_dir,
                                                                             backend)
    if qcfg.model != cfg.model:
        raise ValueError(f"quantized_dir: {str(quantized_dir)!r} holds a quantized "
                         f"{qcfg.model.family} of another config than {str(float_dir)!r}")
    vae = checkpoint.restore_vae(float_dir)
    labels = (eval_labels(cfg.model.num_classes, per_class) if labels is None
              else np.asarray(labels, np.int32))
    kw = dict(seed=seed, cfg_scale=cfg_scale, progress=progress)
    reference = generate(model, params, cfg, labels, **kw)
    quantized = generate(qmodel, qparams, qcfg, labels, sampler=sampler, apply_fn=apply_fn,
                         share_cfg=stored_cfg_plan(quantized_dir) or False, **kw)
    spread = float(reference.max() - reference.min())
    spread = max(spread, float(quantized.max() - quantized.min()))
    out = {"float": source, "quantized": qsource, "num_samples": int(len(labels)),
           "seed": int(seed), "latent_data_range": round(spread, 6),
           "latent_psnr_db": psnr(reference, quantized, data_range=spread)[1]}
    if vae is not None:
        from trdq_jax.sampling.decode import make_decoder
        decode = make_decoder(*vae)
        a = np.asarray(decode(reference)).astype(np.float64)
        b = np.asarray(decode(quantized)).astype(np.float64)
        out["pixel_psnr_db"] = psnr(a, b, data_range=255.0)[1]
        out["pixel_ssim"] = ssim(a, b, data_range=255.0)[1]
        out["pixel_shape"] = list(a.shape[1:])
    return out
