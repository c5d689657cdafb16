"""Class-conditional DiT with adaLN-Zero (Peebles & Xie, 2023), NHWC.

Parameter paths mirror the official PyTorch state dict one-to-one (``blocks_3/attn/qkv/kernel``
<-> ``blocks.3.attn.qkv.weight``), see ``trdq_jax.models.convert``. The official code stores the
fixed sin-cos ``pos_embed`` as a frozen ``nn.Parameter``. ``DiTConfig.pos_embed`` chooses:
"sincos" (default) computes it from the config and it is no parameter; "stored" holds it as a
top-level ``pos_embed`` param ``[1, num_patches, hidden]`` (initialised to the sin-cos table),
what a converted official checkpoint uses, so that it samples with its own (e.g. float16-rounded)
table. A stored table is frozen: ``stop_gradient``, and ``train=True`` is refused.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from trdq_jax.config import DiTConfig, exact_width
from trdq_jax.models.layers import (Attention, LabelEmbedder, Mlp, TimestepEmbedder,
                                    broadcast_t, check_inputs, check_share_cfg, modulate,
                                    sincos_2d)

_ZERO = nn.initializers.zeros


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block. Input/output ``[B, L, D]``, conditioning ``c`` ``[B, D]``."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array, share_cfg=False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = nn.Dense(6 * self.hidden_size, kernel_init=_ZERO, name="adaLN_modulation_1",
                       **kw)(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        norm = lambda name: nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False,  # noqa
                                         name=name, **kw)
        h = modulate(norm("norm1")(x), shift_msa, scale_msa)
        x = x + gate_msa[:, None] * Attention(self.hidden_size, self.num_heads, name="attn",
                                              **kw)(h, share_cfg=share_cfg)
        h = modulate(norm("norm2")(x), shift_mlp, scale_mlp)
        width = exact_width(self.hidden_size, self.mlp_ratio)  # not int(): 112 * (61/112) -> 60
        if width is None:
            raise ValueError(f"mlp_ratio: expected hidden_size * mlp_ratio to be a whole MLP "
                             f"width, got {self.hidden_size} * {self.mlp_ratio} = "
                             f"{self.hidden_size * self.mlp_ratio}")
        mlp = Mlp(width, self.hidden_size, name="mlp", **kw)
        return x + gate_mlp[:, None] * mlp(h)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + linear to ``patch*patch*out_channels`` per token."""

    hidden_size: int
    patch_size: int
    out_channels: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = nn.Dense(2 * self.hidden_size, kernel_init=_ZERO, name="adaLN_modulation_1",
                       **kw)(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = modulate(nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False,
                                  name="norm_final", **kw)(x), shift, scale)
        return nn.Dense(self.patch_size ** 2 * self.out_channels, kernel_init=_ZERO,
                        name="linear", **kw)(x)


def patchify_conv(features: int, patch: int, dtype, param_dtype) -> nn.Conv:
    """timm ``PatchEmbed.proj``: a stride-``patch`` conv; kernel ``[p, p, C, D]``."""
    return nn.Conv(features, (patch, patch), strides=(patch, patch), padding="VALID",
                   dtype=dtype, param_dtype=param_dtype,
                   kernel_init=nn.initializers.xavier_uniform(), name="proj")


def unpatchify(x: jax.Array, patch: int, channels: int) -> jax.Array:
    """``[B, h*w, p*p*C]`` tokens (row-major) -> ``[B, h*p, w*p, C]`` images."""
    h = int(round(x.shape[1] ** 0.5))
    return rearrange(x, "b (h w) (p q c) -> b (h p) (w q) c", h=h, p=patch, q=patch, c=channels)


class PatchEmbed(nn.Module):
    """NHWC image -> ``[B, num_patches, D]`` tokens, row-major over the patch grid."""

    hidden_size: int
    patch_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = patchify_conv(self.hidden_size, self.patch_size, self.dtype, self.param_dtype)(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class DiT(nn.Module):
    """Diffusion Transformer.

    ``apply({'params': p}, x, t, y, train=False, share_cfg=False)``:
      x: ``[B, H, W, C]`` float noisy latents/images, ``H = W = config.input_size``.
      t: ``[B]`` or scalar time steps in training units (0..num_train_steps-1).
      y: ``[B]`` int labels; ``num_classes`` is the null label when ``class_dropout_prob > 0``.
      train: label dropout (needs a ``'dropout'`` rng).
      share_cfg: treat the batch as ``[cond; uncond]`` and share attention probabilities: True
        in every attention, or a frozenset of the attention paths that share
        (``"blocks_3/attn"``; see ``trdq_jax.sampling.cfg_plan``).
    Returns ``[B, H, W, out_channels]`` (``2C`` with learned sigma: eps then variance values).
    """

    config: DiTConfig

    @nn.compact
    def __call__(self, x, t, y, train: bool = False, share_cfg=False):
        cfg = self.config
        check_share_cfg(share_cfg)
        num_label_values = cfg.num_classes + int(cfg.class_dropout_prob > 0)
        check_inputs(x, t, y, spatial_shape=(cfg.input_size, cfg.input_size),
                     channels=cfg.in_channels, num_label_values=num_label_values,
                     layout="[B, H, W, C]")
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        pos = sincos_2d(cfg.hidden_size, cfg.input_size // cfg.patch_size)
        h = PatchEmbed(cfg.hidden_size, cfg.patch_size, name="x_embedder", **kw)(x.astype(dtype))
        if cfg.pos_embed == "stored":
            if train:
                raise ValueError(
                    "train: a DiT with pos_embed='stored' (a converted checkpoint's frozen "
                    "table) is not trained: the optimizer's weight decay and the EMA would "
                    "change the table; train a config with pos_embed='sincos'")
            table = self.param("pos_embed", lambda _, shape, dtype: jnp.asarray(
                pos.reshape(shape), dtype), (1, cfg.num_patches, cfg.hidden_size), pdtype)
            h = h + jax.lax.stop_gradient(table).astype(dtype)
        else:
            h = h + jnp.asarray(pos, dtype)[None]
        c = TimestepEmbedder(cfg.hidden_size, name="t_embedder", **kw)(broadcast_t(t, x.shape[0]))
        c = c + LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob,
                              param_dtype=pdtype, name="y_embedder")(y, train).astype(c.dtype)
        for i in range(cfg.depth):
            h = DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, name=f"blocks_{i}",
                         **kw)(h, c, share_cfg=share_cfg)
        h = FinalLayer(cfg.hidden_size, cfg.patch_size, cfg.out_channels, name="final_layer",
                       **kw)(h, c)
        return unpatchify(h, cfg.patch_size, cfg.out_channels).astype(jnp.float32)


def pos_embed_size(cfg: DiTConfig) -> int:
    """Number of values in the official frozen ``pos_embed`` (``num_patches * hidden``). Part
    of the param tree only with ``cfg.pos_embed == "stored"``."""
    return cfg.num_patches * cfg.hidden_size


# Official sizes (DiT paper, Table 1): depth, hidden, heads.
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def dit_config(name: str, image_size: int = 256, num_classes: int = 1000, **overrides) -> DiTConfig:
    """Official configs by name, e.g. ``dit_config("XL/2")`` for DiT-XL/2 at 256x256 (latent 32).

    ``image_size`` is in pixels; the SD-VAE latent is 8x smaller with 4 channels.
    """
    try:
        size, patch = name.split("/")
        depth, hidden, heads = DIT_SIZES[size]
        patch = int(patch)
    except (ValueError, KeyError):
        raise ValueError(f"name: expected one of {[f'{s}/{p}' for s in DIT_SIZES for p in (2, 4, 8)]}, "
                         f"got {name!r}") from None
    if patch not in (2, 4, 8):
        raise ValueError(f"name: patch size must be 2, 4 or 8, got {patch}")
    if image_size % 8:
        raise ValueError(f"image_size: expected a multiple of 8 (VAE factor), got {image_size}")
    fields = dict(input_size=image_size // 8, in_channels=4, patch_size=patch, hidden_size=hidden,
                  depth=depth, num_heads=heads, num_classes=num_classes)
    fields.update(overrides)
    return DiTConfig(**fields)
