"""Plain Flax Linen diffusion models; they know nothing about quantization.

All three families share one call signature::

    model.apply({'params': params}, x, t, y, train=False, share_cfg=False) -> out

with ``x`` channels-last (``[B, H, W, C]`` images or ``[B, F, H, W, C]`` videos), ``t`` ``[B]``
time steps in training units and ``y`` ``[B]`` int labels.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from trdq_jax.config import ClassifierConfig, DiTConfig, ModelConfig, UNetConfig, VideoDiTConfig
from trdq_jax.models.dit import DiT, dit_config, pos_embed_size
from trdq_jax.models.zoo import load

__all__ = ["DiT", "build_model", "dit_config", "dummy_inputs", "init_params", "load", "param_count",
           "pos_embed_size"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The Flax module for a model config."""
    if isinstance(cfg, DiTConfig):
        return DiT(cfg)
    if isinstance(cfg, VideoDiTConfig):
        from trdq_jax.models.video_dit import VideoDiT
        return VideoDiT(cfg)
    if isinstance(cfg, UNetConfig):
        from trdq_jax.models.unet import UNet
        return UNet(cfg)
    if isinstance(cfg, ClassifierConfig):
        from trdq_jax.eval.classifier import DigitsClassifier
        return DigitsClassifier(cfg)
    raise TypeError(f"cfg: expected a model config, got {type(cfg).__name__}")


def input_shape(cfg: ModelConfig, batch: int = 1) -> tuple[int, ...]:
    """Channels-last input shape of one batch for this config."""
    spatial = (cfg.input_size, cfg.input_size)
    if isinstance(cfg, VideoDiTConfig):
        spatial = (cfg.num_frames, *spatial)
    return (batch, *spatial, cfg.in_channels)


def dummy_inputs(cfg: ModelConfig, batch: int = 1):
    """Zero ``(x, t, y)`` of the right shapes and dtypes, for ``init`` and ``eval_shape``."""
    return (jnp.zeros(input_shape(cfg, batch), jnp.float32), jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch,), jnp.int32))


def init_params(cfg: ModelConfig, rng: jax.Array):
    """Freshly initialised parameter pytree (the ``'params'`` collection)."""
    inputs = dummy_inputs(cfg)
    if isinstance(cfg, ClassifierConfig):
        inputs = inputs[:1]  # classifiers take images only
    # jit: eager init dispatches (and compiles) every op separately, seconds even for tiny models
    return jax.jit(build_model(cfg).init)(rng, *inputs)["params"]


def abstract_params(cfg: ModelConfig):
    """``jax.ShapeDtypeStruct`` tree of the params: nothing is allocated."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def param_count(params) -> int:
    """Number of scalars in a (possibly abstract) parameter tree."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))
