"""The Stable Diffusion VAE (diffusers' ``AutoencoderKL``) in Flax Linen, channels-last.

Images are NHWC ``[B, H, W, in_channels]`` in ``[-1, 1]``; latents are
``[B, H / f, W / f, latent_channels]`` with ``f = cfg.downsample_factor``
(``2 ** (len(block_out_channels) - 1)``); H and W must be multiples of ``f``.

Layout (module names follow diffusers' state-dict keys, ``name_N`` standing for ``name.N``, so
that ``trdq_jax.models.convert_vae`` converts by a table):

* ``encoder``: ``conv_in`` (3x3) -> per level ``i`` a ``down_blocks_i`` of ``layers_per_block``
  ``resnets_j`` and, on all but the last level, ``downsamplers_0.conv`` (3x3, stride 2, after
  padding right/bottom by one: PyTorch's ``F.pad(x, (0, 1, 0, 1))``) -> ``mid_block``
  (``resnets_0``, single-head ``attentions_0`` when ``mid_block_add_attention``, ``resnets_1``)
  -> ``conv_norm_out`` -> SiLU -> ``conv_out`` (3x3, to ``2 * latent_channels``: mean, logvar);
* ``quant_conv`` (1x1, ``2L -> 2L``) when ``use_quant_conv``;
* ``post_quant_conv`` (1x1, ``L -> L``) when ``use_post_quant_conv``;
* ``decoder``: ``conv_in`` (3x3, ``L -> block_out_channels[-1]``) -> ``mid_block`` -> per level,
  widest first, an ``up_blocks_i`` of ``layers_per_block + 1`` ``resnets_j`` and, on all but the
  last, ``upsamplers_0.conv`` (nearest 2x, then 3x3) -> ``conv_norm_out`` -> SiLU ->
  ``conv_out`` (3x3, to ``out_channels``).

A resnet is ``norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2`` plus the input, through a 1x1
``conv_shortcut`` when the channel count changes. Every GroupNorm has ``norm_num_groups`` groups
and eps 1e-6. The attention block is ``group_norm`` -> ``to_q``/``to_k``/``to_v`` (Dense, one
head over all ``C`` channels, softmax in float32) -> ``to_out_0`` -> plus the input.

Computation runs in ``cfg.dtype``, parameters are stored in ``cfg.param_dtype``.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from trdq_jax.config import VAEConfig

GROUPNORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this


def _conv(features: int, kernel: int, name: str | None, dtype, param_dtype, stride: int = 1,
          padding=None) -> nn.Conv:
    pad = kernel // 2
    padding = ((pad, pad), (pad, pad)) if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   dtype=dtype, param_dtype=param_dtype, name=name)


def _norm(groups: int, name: str, dtype, param_dtype) -> nn.GroupNorm:
    # use_fast_variance=False: E[(x - mean)^2], as PyTorch, not E[x^2] - mean^2 (which loses
    # digits when the mean is large against the spread)
    return nn.GroupNorm(num_groups=groups, epsilon=GROUPNORM_EPS, dtype=dtype,
                        param_dtype=param_dtype, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` without time embedding: ``[B, H, W, Cin] -> [B, H, W, out]``."""

    out_channels: int
    groups: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(_norm(self.groups, "norm1", **kw)(x))
        h = _conv(self.out_channels, 3, "conv1", **kw)(h)
        h = nn.silu(_norm(self.groups, "norm2", **kw)(h))
        h = _conv(self.out_channels, 3, "conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "conv_shortcut", **kw)(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the ``H*W`` positions with a GroupNorm in front and the
    input added back: ``[B, H, W, C] -> [B, H, W, C]``."""

    groups: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _norm(self.groups, "group_norm", **kw)(x).reshape(b, hgt * wid, c)
        q = nn.Dense(c, name="to_q", **kw)(h)
        k = nn.Dense(c, name="to_k", **kw)(h)
        v = nn.Dense(c, name="to_v", **kw)(h)
        logits = jnp.einsum("bqc,bkc->bqk", q.astype(jnp.float32), k.astype(jnp.float32))
        probs = jax.nn.softmax(logits / jnp.sqrt(jnp.float32(c)), axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", probs, v)
        out = nn.Dense(c, name="to_out_0", **kw)(out)
        return x + out.reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
    """``resnets_0`` -> ``attentions_0`` (when ``add_attention``) -> ``resnets_1``."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock(self.channels, self.groups, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = AttentionBlock(self.groups, name="attentions_0", **kw)(x)
        return ResnetBlock(self.channels, self.groups, name="resnets_1", **kw)(x)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv ``conv``: ``[B, H, W, C] ->
    [B, H/2, W/2, C]``."""

    channels: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv(self.channels, 3, "conv", self.dtype, self.param_dtype, stride=2,
                     padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv ``conv``: ``[B, H, W, C] -> [B, 2H, 2W, C]``."""

    channels: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, "conv", self.dtype, self.param_dtype)(x)


class Block(nn.Module):
    """``num_layers`` resnets to ``channels``, then an optional ``downsamplers_0`` /
    ``upsamplers_0``: diffusers' ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``."""

    channels: int
    num_layers: int
    groups: int
    resample: str | None = None  # "down", "up" or None
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock(self.channels, self.groups, name=f"resnets_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample(self.channels, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample(self.channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """``[B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels]`` (before quant_conv)."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        x = _conv(chans[0], 3, "conv_in", **kw)(x)
        for i, ch in enumerate(chans):
            last = i == len(chans) - 1
            x = Block(ch, cfg.layers_per_block, groups, None if last else "down",
                      name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock(chans[-1], groups, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        x = nn.silu(_norm(groups, "conv_norm_out", **kw)(x))
        return _conv(2 * cfg.latent_channels, 3, "conv_out", **kw)(x)


class Decoder(nn.Module):
    """``[B, h, w, latent_channels] -> [B, h*f, w*f, out_channels]`` (after post_quant_conv)."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        x = _conv(chans[-1], 3, "conv_in", **kw)(z)
        x = MidBlock(chans[-1], groups, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        for i, ch in enumerate(reversed(chans)):
            last = i == len(chans) - 1
            x = Block(ch, cfg.layers_per_block + 1, groups, None if last else "up",
                      name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(_norm(groups, "conv_norm_out", **kw)(x))
        return _conv(cfg.out_channels, 3, "conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """The SD-VAE. ``encode(x) -> (mean, logvar)``, ``decode(z) -> images``; ``__call__(x)`` is
    ``decode(encode(x)[0])`` (what ``init`` runs, so it creates every parameter)."""

    cfg: VAEConfig

    def setup(self):
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # setup() names submodules by attribute: name=None here
        self.quant_conv = (_conv(2 * cfg.latent_channels, 1, None, **kw)
                           if cfg.use_quant_conv else None)
        self.post_quant_conv = (_conv(cfg.latent_channels, 1, None, **kw)
                                if cfg.use_post_quant_conv else None)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x`` ``[B, H, W, in_channels]`` in [-1, 1] -> ``(mean, logvar)``, each
        ``[B, H/f, W/f, latent_channels]`` in ``cfg.dtype``; logvar clipped to [-30, 20]."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents ``z`` ``[B, h, w, latent_channels]`` -> images
        ``[B, h*f, w*f, out_channels]`` in ``cfg.dtype`` (not clipped)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x)[0])


# ----------------------------------------------------------------------------- functions


def _dummy_images(cfg: VAEConfig) -> jax.ShapeDtypeStruct:
    # parameters do not depend on the spatial size: the smallest valid one keeps init cheap
    f = cfg.downsample_factor
    return jax.ShapeDtypeStruct((1, f, f, cfg.in_channels), jnp.float32)


def init_vae_params(cfg: VAEConfig, rng: jax.Array) -> dict:
    """Random parameters for ``AutoencoderKL(cfg)`` in ``cfg.param_dtype``, jitted:
    kernels normal with variance ``1 / fan_in`` (``fan_in`` = all axes but the last: LeCun
    normal, untruncated), biases 0, GroupNorm scales 1. ``rng``: a PRNG key.

    All kernels come from one ``jax.random.normal`` draw, split by shape: a Flax ``model.init``
    makes one threefry call per parameter, which XLA on CPU takes tens of seconds to compile
    even for a tiny VAE.
    """
    return _init(cfg, rng)


@functools.partial(jax.jit, static_argnums=(0,))
def _init(cfg: VAEConfig, rng: jax.Array) -> dict:
    abstract = abstract_vae_params(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    sizes = [leaf.size for path, leaf in leaves if path[-1].key == "kernel"]
    draw = jax.random.normal(rng, (sum(sizes),), jnp.float32)
    out, start = [], 0
    for path, leaf in leaves:
        name = path[-1].key
        if name == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            value = draw[start:start + leaf.size].reshape(leaf.shape) / math.sqrt(fan_in)
            start += leaf.size
        else:
            value = jnp.full(leaf.shape, 1.0 if name == "scale" else 0.0, jnp.float32)
        out.append(value.astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def abstract_vae_params(cfg: VAEConfig) -> dict:
    """The params tree of ``AutoencoderKL(cfg)`` as ``jax.ShapeDtypeStruct`` leaves
    (``jax.eval_shape``: nothing is allocated or computed)."""
    model = AutoencoderKL(cfg)
    return jax.eval_shape(lambda key, x: model.init(key, x)["params"],
                          jax.random.PRNGKey(0), _dummy_images(cfg))


def _check_images(name: str, x, cfg: VAEConfig, channels: int, factor: int) -> None:
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 4 or shape[-1] != channels or shape[1] % factor or shape[2] % factor:
        raise ValueError(f"{name}: expected [B, H, W, {channels}] with H and W multiples of "
                         f"{factor}, got shape {shape}")


@functools.partial(jax.jit, static_argnums=(1,))
def _encode(params, cfg: VAEConfig, images):
    return AutoencoderKL(cfg).apply({"params": params}, images, method=AutoencoderKL.encode)


@functools.partial(jax.jit, static_argnums=(1,))
def _decode(params, cfg: VAEConfig, z):
    return AutoencoderKL(cfg).apply({"params": params}, z, method=AutoencoderKL.decode)


def encode_latents(params, cfg: VAEConfig, images, key: jax.Array | None = None) -> jax.Array:
    """Images ``[B, H, W, in_channels]`` in [-1, 1] -> *scaled* latents
    ``(z - shift_factor) * scaling_factor``, float32 ``[B, H/f, W/f, latent_channels]``.

    ``z`` is the posterior mean when ``key`` is None, else a sample
    ``mean + exp(0.5 * logvar) * N(0, 1)`` drawn with ``key``. Jitted once per ``cfg``.
    """
    _check_images("images", images, cfg, cfg.in_channels, cfg.downsample_factor)
    mean, logvar = _encode(params, cfg, jnp.asarray(images, cfg.dtype))
    z = mean.astype(jnp.float32)
    if key is not None:
        noise = jax.random.normal(key, z.shape, jnp.float32)
        z = z + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise
    return (z - cfg.shift_factor) * cfg.scaling_factor


def decode_latents(params, cfg: VAEConfig, latents) -> jax.Array:
    """Scaled latents ``[B, h, w, latent_channels]`` -> images, float32
    ``[B, h*f, w*f, out_channels]``, nominally in [-1, 1] but NOT clipped.

    Decodes ``z = latents / scaling_factor + shift_factor``. Jitted once per ``cfg``.
    """
    _check_images("latents", latents, cfg, cfg.latent_channels, 1)
    z = jnp.asarray(latents, jnp.float32) / cfg.scaling_factor + cfg.shift_factor
    return _decode(params, cfg, z.astype(cfg.dtype)).astype(jnp.float32)


def latents_to_uint8(images) -> jax.Array:
    """Decoded images in [-1, 1] (any shape, any float dtype) -> uint8 of the same shape.

    Exactly ``floor(clip((x + 1) * 127.5 + 0.5, 0, 255))`` computed in float32: round half up,
    so -1 -> 0, 0 -> 128 (127.5 rounds up), 1 -> 255; values outside [-1, 1] saturate at 0 /
    255. NaN maps to 0.
    """
    x = jnp.asarray(images, jnp.float32)
    y = jnp.clip((x + 1.0) * 127.5 + 0.5, 0.0, 255.0)
    return jnp.floor(jnp.where(jnp.isnan(y), 0.0, y)).astype(jnp.uint8)
