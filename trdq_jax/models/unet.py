"""Class-conditional ADM/DDPM-style UNet (Dhariwal & Nichol, 2021), channels-last ``[B, H, W, C]``.

Layout, with ``ch_l = base_channels * channel_mult[l]`` and ``E = 4 * base_channels``:

* ``conv_in`` (3x3, ``C -> ch_0``);
* per level ``l``: ``num_res_blocks`` residual blocks ``down_{l}_res_{i}`` (each followed by
  ``down_{l}_attn_{i}`` when the level's resolution is in ``attention_resolutions``), then a
  stride-2 3x3 conv ``down_{l}_downsample`` except after the last level;
* middle: ``mid_res_0``, ``mid_attn``, ``mid_res_1``;
* per level from the deepest up: ``num_res_blocks + 1`` residual blocks ``up_{l}_res_{i}`` on the
  concatenation ``[h, skip]`` (skips popped in reverse order of the down path), attention as on
  the way down, and a nearest x2 upsample + 3x3 conv ``up_{l}_upsample`` except at level 0;
* ``norm_out`` (GroupNorm) -> SiLU -> zero-initialised ``conv_out`` (3x3, ``ch_0 -> out``).

Residual blocks inject ``emb = t_embedder(t) + y_embedder(y)`` (``[B, E]``) by scale-shift norm:
``GroupNorm(h) * (1 + scale) + shift``. Attention blocks use the shared ``Attention`` over the
``H*W`` tokens, so ``share_cfg`` reaches all of them. Every submodule has a stable name: the
quantizer intercepts layers by module path.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from trdq_jax.config import UNetConfig
from trdq_jax.models.layers import (Attention, LabelEmbedder, TimestepEmbedder, broadcast_t,
                                    check_inputs, check_share_cfg)

_GROUPNORM_EPS = 1e-5  # PyTorch GroupNorm default, as in ADM


def _conv(features: int, kernel: int, name: str, dtype, param_dtype, stride: int = 1,
          zero_init: bool = False) -> nn.Conv:
    """Conv with PyTorch-style symmetric padding ``kernel // 2`` (``H -> H / stride``)."""
    pad = kernel // 2
    extra = dict(kernel_init=nn.initializers.zeros) if zero_init else {}
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=param_dtype,
                   name=name, **extra)


def _group_norm(num_groups: int, name: str, dtype, param_dtype) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, epsilon=_GROUPNORM_EPS, dtype=dtype,
                        param_dtype=param_dtype, name=name)


class ResBlock(nn.Module):
    """ADM residual block: ``[B, H, W, Cin]``, emb ``[B, E]`` -> ``[B, H, W, out_channels]``.

    ``norm_in -> SiLU -> conv_in``; ``emb_proj(SiLU(emb))`` gives ``(scale, shift)``;
    ``norm_out(h) * (1 + scale) + shift -> SiLU -> conv_out`` (zero-initialised); the skip is the
    identity, or a 1x1 ``skip`` conv when the channel count changes.
    """

    out_channels: int
    num_groups: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(_group_norm(self.num_groups, "norm_in", **kw)(x))
        h = _conv(self.out_channels, 3, "conv_in", **kw)(h)
        mod = nn.Dense(2 * self.out_channels, name="emb_proj", **kw)(nn.silu(emb))
        scale, shift = jnp.split(mod[:, None, None, :], 2, axis=-1)
        h = _group_norm(self.num_groups, "norm_out", **kw)(h) * (1 + scale) + shift
        h = _conv(self.out_channels, 3, "conv_out", zero_init=True, **kw)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "skip", **kw)(x)
        return x + h


class AttentionBlock(nn.Module):
    """GroupNorm -> self-attention over the ``H*W`` tokens -> residual. ``[B, H, W, C]`` in/out."""

    num_heads: int
    num_groups: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, share_cfg=False) -> jax.Array:
        b, height, width, ch = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _group_norm(self.num_groups, "norm", **kw)(x).reshape(b, height * width, ch)
        h = Attention(ch, self.num_heads, name="attn", **kw)(h, share_cfg=share_cfg)
        return x + h.reshape(b, height, width, ch)


class UNet(nn.Module):
    """ADM-style UNet.

    ``apply({'params': p}, x, t, y, train=False, share_cfg=False)``:
      x: ``[B, H, W, C]`` float, ``H = W = input_size``.
      t: ``[B]`` or scalar time steps in training units.
      y: ``[B]`` int labels; ``num_classes`` is the null label when ``class_dropout_prob > 0``.
      train: label dropout (needs a ``'dropout'`` rng); the model has no other dropout.
      share_cfg: the batch is ``[cond; uncond]``; every attention of the uncond half reuses the
        cond half's attention probabilities (True), or
        only the attentions whose module paths a frozenset holds (``"mid_attn/attn"``).
    Returns ``[B, H, W, out_channels]`` float32.
    """

    config: UNetConfig

    @nn.compact
    def __call__(self, x, t, y, train: bool = False, share_cfg=False):
        cfg = self.config
        check_share_cfg(share_cfg)
        num_label_values = cfg.num_classes + int(cfg.class_dropout_prob > 0)
        check_inputs(x, t, y, spatial_shape=(cfg.input_size, cfg.input_size),
                     channels=cfg.in_channels, num_label_values=num_label_values,
                     layout="[B, H, W, C]")
        if share_cfg and x.shape[0] % 2:
            raise ValueError(f"share_cfg: expected an even batch [cond; uncond], "
                             f"got batch {x.shape[0]}")
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        emb_dim = 4 * cfg.base_channels
        res = lambda ch, name: ResBlock(ch, cfg.num_groups, name=name, **kw)  # noqa: E731
        attn = lambda name: AttentionBlock(cfg.num_heads, cfg.num_groups, name=name, **kw)  # noqa
        num_levels = len(cfg.channel_mult)
        widths = [cfg.base_channels * m for m in cfg.channel_mult]

        emb = TimestepEmbedder(emb_dim, frequency_embedding_size=cfg.base_channels,
                               name="t_embedder", **kw)(broadcast_t(t, x.shape[0]))
        emb = emb + LabelEmbedder(cfg.num_classes, emb_dim, cfg.class_dropout_prob,
                                  param_dtype=pdtype, name="y_embedder")(y, train).astype(emb.dtype)

        h = _conv(widths[0], 3, "conv_in", **kw)(x.astype(dtype))
        skips = [h]
        for level in range(num_levels):
            has_attn = cfg.input_size >> level in cfg.attention_resolutions
            for i in range(cfg.num_res_blocks):
                h = res(widths[level], f"down_{level}_res_{i}")(h, emb)
                if has_attn:
                    h = attn(f"down_{level}_attn_{i}")(h, share_cfg)
                skips.append(h)
            if level < num_levels - 1:
                h = _conv(widths[level], 3, f"down_{level}_downsample", stride=2, **kw)(h)
                skips.append(h)

        h = res(widths[-1], "mid_res_0")(h, emb)
        h = attn("mid_attn")(h, share_cfg)
        h = res(widths[-1], "mid_res_1")(h, emb)

        for level in reversed(range(num_levels)):
            has_attn = cfg.input_size >> level in cfg.attention_resolutions
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(widths[level], f"up_{level}_res_{i}")(h, emb)
                if has_attn:
                    h = attn(f"up_{level}_attn_{i}")(h, share_cfg)
            if level > 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest x2
                h = _conv(widths[level], 3, f"up_{level}_upsample", **kw)(h)

        h = nn.silu(_group_norm(cfg.num_groups, "norm_out", **kw)(h))
        h = _conv(cfg.out_channels, 3, "conv_out", zero_init=True, **kw)(h)
        return h.astype(jnp.float32)
