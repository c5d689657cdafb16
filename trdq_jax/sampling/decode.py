"""From a latent denoiser's samples to pixels: the autoencoder stored with a checkpoint.

A latent model (DiT-XL/2, PixArt, ...) samples scaled latents ``[B, h, w, latent_channels]``;
its checkpoint may hold the float VAE that decodes them (``trdq_jax.checkpoint.save(...,
vae=(VAEConfig, params))``, ``trdq convert --vae``). This module pairs the two:

- ``check_vae_for(model_cfg, vae_cfg)`` refuses a VAE whose latent channels differ from the
  denoiser's sample channels;
- ``pixel_shape(model_cfg, vae_cfg)`` is one decoded image ``(H, W, C)``;
- ``make_decoder(vae_cfg, vae_params, chunk)`` is a jitted ``latents -> uint8 pixels``: the
  decode runs on the device where the sampler left the latents (sharded over the batch as they
  are), in chunks of ``chunk`` samples so that the decoder's activations (about 0.2 GB per
  sample at 256x256 for the SD-VAE) stay bounded whatever the batch.

Calibration and quantization stay in latent space; only the pictures go through the VAE.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from trdq_jax.config import VAEConfig

DEFAULT_DECODE_CHUNK = 8


def load_vae(path, config=None) -> tuple[VAEConfig, dict]:
    """``(VAEConfig, params)`` of what users hold: a diffusers ``AutoencoderKL`` directory
    (``config.json`` + safetensors: ``stabilityai/sd-vae-ft-ema``, a pipeline's ``vae/``) or
    an LDM / Stable Diffusion checkpoint file (its ``first_stage_model.*`` keys). LDM files
    carry no config: ``config`` (a diffusers ``config.json`` path) gives it, else the SD-VAE's
    (``VAEConfig()``). Errors name the path (``trdq_jax.models.convert_vae``)."""
    import json
    import pathlib
    from trdq_jax.models.convert import ConversionError
    from trdq_jax.models.convert_vae import (load_diffusers_vae, load_ldm_vae,
                                             vae_config_from_diffusers)
    path = pathlib.Path(path).expanduser()
    if path.is_dir() or not path.exists():
        if config is not None:
            raise ValueError("config: a diffusers directory has its own config.json; give a "
                             "config only with an LDM checkpoint file")
        return load_diffusers_vae(path)
    cfg = None
    if config is not None:
        config = pathlib.Path(config).expanduser()
        try:
            cfg = vae_config_from_diffusers(json.loads(config.read_text(encoding="utf-8")),
                                            repr(str(config)))
        except FileNotFoundError:
            raise FileNotFoundError(f"config: no such file {str(config)!r}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"config: {str(config)!r} is not JSON ({e})") from None
    try:
        return load_ldm_vae(path, cfg)
    except ConversionError as e:
        if cfg is not None or "does not match" not in str(e):
            raise
        raise ConversionError(f"{str(path)!r} does not hold the SD-VAE (read as VAEConfig() "
                              "since an LDM file carries no config): give the diffusers "
                              "config.json of your VAE (--vae-config); "
                              + " ".join(str(e).split())[:300]) from None


def latent_shape(model_cfg) -> tuple[int, ...]:
    """One sample of ``model_cfg``'s denoiser, channels last (without the batch axis)."""
    from trdq_jax.models import input_shape
    return tuple(input_shape(model_cfg, 1)[1:])


def check_vae_for(model_cfg, vae_cfg: VAEConfig, arg: str = "vae") -> None:
    """``ValueError`` naming ``arg`` unless ``vae_cfg`` decodes ``model_cfg``'s samples: images
    ``[h, w, latent_channels]`` (a video model's frames are not decoded here)."""
    if not isinstance(vae_cfg, VAEConfig):
        raise TypeError(f"{arg}: expected a VAEConfig, got {type(vae_cfg).__name__}")
    shape = latent_shape(model_cfg)
    name = getattr(model_cfg, "name", None) or getattr(model_cfg, "family", "model")
    if len(shape) != 3:
        raise ValueError(f"{arg}: the VAE decodes images [h, w, c]; the {name} samples have "
                         f"shape {list(shape)}")
    if shape[-1] != vae_cfg.latent_channels:
        raise ValueError(f"{arg}: the VAE's latent_channels={vae_cfg.latent_channels} disagree "
                         f"with the denoiser's {shape[-1]} sample channels (in_channels of "
                         f"{name}): a VAE of another model?")


def pixel_shape(model_cfg, vae_cfg: VAEConfig) -> tuple[int, int, int]:
    """``(H, W, C)`` of one decoded sample: the latent grid times the VAE's downsample factor."""
    h, w, _ = latent_shape(model_cfg)
    f = vae_cfg.downsample_factor
    return h * f, w * f, vae_cfg.out_channels


def to_uint8_pixels(images: jax.Array) -> jax.Array:
    """``[-1, 1]`` floats -> uint8 as the official DiT sampler writes its FID samples:
    ``clip(127.5 * x + 128, 0, 255)`` truncated (= round half up of ``(x + 1) * 127.5``)."""
    return jnp.clip(127.5 * images.astype(jnp.float32) + 128.0, 0.0, 255.0).astype(jnp.uint8)


def make_decoder(vae_cfg: VAEConfig, vae_params, chunk: int | None = DEFAULT_DECODE_CHUNK):
    """``decode(latents float32 [B, h, w, c]) -> uint8 [B, H, W, C]``, jitted.

    ``chunk``: samples decoded at once (``lax.map`` over chunks, so peak memory is one chunk's
    activations, not the batch's); None decodes the whole batch in one go. A batch that is not
    a multiple of ``chunk`` is padded inside (the padding is dropped). The latents keep their
    sharding: called on the sampler's output, the decode runs where the samples are.
    """
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk: expected a positive int or None, got {chunk!r}")
    params = jax.tree.map(jnp.asarray, vae_params)  # on the device once, an argument of the
    # program (not constants compiled into it: one program serves any VAE of this config)
    return lambda latents: _decode(params, latents, vae_cfg, chunk)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _decode(params, latents, vae_cfg: VAEConfig, chunk: int | None):
    from trdq_jax.models.vae import decode_latents
    n = latents.shape[0]
    if chunk is None or n <= chunk:
        return to_uint8_pixels(decode_latents(params, vae_cfg, latents))
    pad = -n % chunk
    padded = jnp.concatenate([latents, jnp.repeat(latents[-1:], pad, axis=0)]) if pad \
        else latents
    # step s decodes samples s, s + steps, s + 2 steps, ...: on a batch sharded over the
    # data axis every device then decodes its own samples at every step
    steps = padded.shape[0] // chunk
    blocks = padded.reshape(chunk, steps, *latents.shape[1:]).swapaxes(0, 1)
    out = jax.lax.map(lambda z: to_uint8_pixels(decode_latents(params, vae_cfg, z)), blocks)
    return out.swapaxes(0, 1).reshape(-1, *out.shape[2:])[:n]

