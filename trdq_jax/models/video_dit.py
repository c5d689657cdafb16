"""Class-conditional spatio-temporal DiT (Latte-style), channels-last videos ``[B, F, H, W, C]``.

Each of the ``depth`` layers is a pair of adaLN-Zero ``DiTBlock``s: a spatial block attending
over the ``(H/p)*(W/p)`` patch tokens of one frame, then a temporal block attending over the
``F`` frames at one patch position (``temporal_attention="frames"``, Latte) or over all ``F*L``
tokens of the video (``"video"``, full 3-D attention). All reuse the image ``DiTBlock``; the
spatial and "frames" blocks fold the other axis into the batch, so the conditioning vector is
repeated along that axis (as Latte does).

Position embeddings are fixed constants, not parameters: DiT's 2-D sin-cos table is added to the
tokens of every frame, and a 1-D sin-cos table over frame indices is added once, just before the
first temporal block (Latte's ``temp_embed``), so spatial blocks see every frame alike.

Parameter paths: ``x_embedder/proj``, ``t_embedder``, ``y_embedder``, ``spatial_blocks_{i}``,
``temporal_blocks_{i}``, ``final_layer``; inside blocks the DiT names (``attn/qkv`` ...).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from trdq_jax.config import VideoDiTConfig
from trdq_jax.models.dit import DiTBlock, FinalLayer, PatchEmbed, unpatchify
from trdq_jax.models.layers import (LabelEmbedder, TimestepEmbedder, broadcast_t, check_inputs,
                                    check_share_cfg, sincos_1d, sincos_2d)


def _frames_to_positions(h: jax.Array) -> jax.Array:
    """``[B, F, L, D]`` -> ``[B*L, F, D]``: one sequence of frames per patch position."""
    return rearrange(h, "b f l d -> (b l) f d")


def _positions_to_frames(h: jax.Array, batch: int) -> jax.Array:
    """Inverse of ``_frames_to_positions``: ``[B*L, F, D]`` -> ``[B, F, L, D]``."""
    return rearrange(h, "(b l) f d -> b f l d", b=batch)


class VideoDiT(nn.Module):
    """Spatio-temporal Diffusion Transformer.

    ``apply({'params': p}, x, t, y, train=False, share_cfg=False)``:
      x: ``[B, F, H, W, C]`` float, ``H = W = input_size``; ``F = num_frames`` for videos, or
        fewer (``F = 1``: still images, as joint image-video training feeds them). Frame ``k``
        always gets temporal position ``k``.
      t: ``[B]`` or scalar time steps in training units.
      y: ``[B]`` int labels; ``num_classes`` is the null label when ``class_dropout_prob > 0``.
      train: label dropout (needs a ``'dropout'`` rng).
      share_cfg: the batch is ``[cond; uncond]``; every spatial and temporal attention of the
        uncond half reuses the cond half's attention probabilities (True), or
        only the attentions whose module paths a frozenset holds (``"mid_attn/attn"``).
    Returns ``[B, F, H, W, out_channels]`` float32.
    """

    config: VideoDiTConfig

    @nn.compact
    def __call__(self, x, t, y, train: bool = False, share_cfg=False):
        cfg = self.config
        check_share_cfg(share_cfg)
        num_label_values = cfg.num_classes + int(cfg.class_dropout_prob > 0)
        frames = np.shape(x)[1] if np.ndim(x) == 5 else cfg.num_frames
        if not 1 <= frames <= cfg.num_frames:
            raise ValueError(f"x: expected 1 to num_frames={cfg.num_frames} frames in axis 1 of "
                             f"[B, F, H, W, C], got shape {np.shape(x)}")
        check_inputs(x, t, y, spatial_shape=(frames, cfg.input_size, cfg.input_size),
                     channels=cfg.in_channels, num_label_values=num_label_values,
                     layout="[B, F, H, W, C]")
        batch = x.shape[0]
        if share_cfg and batch % 2:
            # Checked here: folding frames/positions into the batch could make an odd B even.
            raise ValueError(f"share_cfg: expected an even batch [cond; uncond], got batch {batch}")
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        grid = cfg.input_size // cfg.patch_size
        num_tokens = grid * grid

        per_frame = rearrange(x.astype(dtype), "b f h w c -> (b f) h w c")
        h = PatchEmbed(cfg.hidden_size, cfg.patch_size, name="x_embedder", **kw)(per_frame)
        h = h + jnp.asarray(sincos_2d(cfg.hidden_size, grid), dtype)[None]
        h = rearrange(h, "(b f) l d -> b f l d", b=batch)
        temporal_pos = jnp.asarray(sincos_1d(cfg.hidden_size, np.arange(frames)), dtype)

        c = TimestepEmbedder(cfg.hidden_size, name="t_embedder", **kw)(broadcast_t(t, batch))
        c = c + LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob,
                              param_dtype=pdtype, name="y_embedder")(y, train).astype(c.dtype)
        c_per_frame = jnp.repeat(c, frames, axis=0)         # [B*F, D], batch-major like h
        c_per_position = (jnp.repeat(c, num_tokens, axis=0)  # [B*L, D]
                          if cfg.temporal_attention == "frames" else None)

        block = lambda name: DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio,  # noqa: E731
                                      name=name, **kw)
        for i in range(cfg.depth):
            hs = rearrange(h, "b f l d -> (b f) l d")
            hs = block(f"spatial_blocks_{i}")(hs, c_per_frame, share_cfg=share_cfg)
            h = rearrange(hs, "(b f) l d -> b f l d", b=batch)
            if i == 0:
                h = h + temporal_pos[None, :, None]
            temporal = block(f"temporal_blocks_{i}")
            if cfg.temporal_attention == "video":
                hv = temporal(rearrange(h, "b f l d -> b (f l) d"), c, share_cfg=share_cfg)
                h = rearrange(hv, "b (f l) d -> b f l d", f=frames)
            else:
                ht = temporal(_frames_to_positions(h), c_per_position, share_cfg=share_cfg)
                h = _positions_to_frames(ht, batch)

        h = rearrange(h, "b f l d -> (b f) l d")
        h = FinalLayer(cfg.hidden_size, cfg.patch_size, cfg.out_channels, name="final_layer",
                       **kw)(h, c_per_frame)
        out = unpatchify(h, cfg.patch_size, cfg.out_channels)
        return rearrange(out, "(b f) h w c -> b f h w c", b=batch).astype(jnp.float32)
