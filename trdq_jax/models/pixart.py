"""Text-conditioned PixArt-α / PixArt-Σ transformer (Chen et al. 2023, 2024), NHWC.

``model.apply({"params": p}, x, t, cond, share_cfg=False)``:
  x: ``[B, H, W, C]`` float latents, ``H = W = config.input_size``.
  t: ``[B]`` or scalar time steps in training units (0..999).
  cond: a conditioning pytree (``trdq_jax.sampling.conditioning``), a dict of
    ``"caption"`` float ``[B, L, caption_channels]`` (T5 hidden states, ``L <= max_tokens``) and
    ``"mask"`` int/bool ``[B, L]`` (1 = a real token, 0 = padding); with
    ``config.use_micro_conditions`` also ``"resolution"`` float ``[B, 2]`` (image height and
    width in pixels) and ``"aspect_ratio"`` float ``[B, 1]`` (height / width). Instead of
    ``"caption"`` it may hold ``"kv"`` ``[B, depth, L, 2 * hidden]``: every block's
    cross-attention keys and values, computed once per prompt by ``caption_kv`` (they do not
    depend on ``x`` or ``t``, so a sampler computes them before its step loop).
  share_cfg: CFG Attention-Sharing in the *self*-attentions (as in ``DiT``; the batch is
    ``[cond; uncond]``); cross-attention always attends with each sample's own caption.
Returns ``[B, H, W, out_channels]`` float32 (``2C`` with learned sigma: eps then variance).

Module paths (what quantization code reads):

- ``x_embedder/proj``: patch embedding (a ``p x p`` stride-``p`` conv), plus the fixed 2-D
  sin-cos position table (no parameter; see ``pos_embed``);
- ``t_embedder/mlp_0``, ``t_embedder/mlp_2``: sinusoidal(256) -> Linear -> SiLU -> Linear, the
  embedded time step ``c`` ``[B, D]``; with micro-conditions ``csize_embedder/mlp_{0,2}`` and
  ``ar_embedder/mlp_{0,2}`` (the same kind of MLP into ``D // 3`` values) add
  ``[res_h, res_w, aspect]`` embeddings to ``c``;
- ``t_block``: adaLN-single, ``SiLU -> Linear(D, 6D)`` of ``c``, shared by every block;
- ``caption_projection/fc1``, ``caption_projection/fc2``: Linear -> GELU(tanh) -> Linear from
  the caption width to ``D``;
- ``blocks_{i}/scale_shift_table`` ``[6, D]``: added to the ``t_block`` output, giving
  ``shift, scale, gate`` of the self-attention and of the MLP;
- ``blocks_{i}/attn/qkv`` (fused ``[D, 3D]``: q, k, v columns) and ``blocks_{i}/attn/proj``:
  self-attention (``trdq_jax.models.layers.Attention``, as in the DiT);
- ``blocks_{i}/cross_attn/q``, ``blocks_{i}/cross_attn/kv`` (fused ``[D, 2D]``: k then v
  columns, applied to the projected caption) and ``blocks_{i}/cross_attn/proj``: cross-attention
  to the caption tokens with a key padding mask, no norm and no gate (as in PixArt);
- ``blocks_{i}/mlp/fc1``, ``blocks_{i}/mlp/fc2``: Linear -> GELU(tanh) -> Linear;
- ``final_layer/scale_shift_table`` ``[2, D]`` (plus ``c``: shift, scale) and
  ``final_layer/linear`` to ``p * p * out_channels`` per token.

Every LayerNorm is parameter-free with eps 1e-6. Padded caption tokens get an additive -10000
on their attention logits, exactly as diffusers does (so a caption whose mask is all zero
attends to every token, as there).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax.config import PixArtConfig
from trdq_jax.models.dit import PatchEmbed, unpatchify
from trdq_jax.models.layers import (Attention, Mlp, TimestepEmbedder, broadcast_t, check_inputs,
                                    check_share_cfg, count_nonfinite, modulate, sincos_1d)

_ZERO = nn.initializers.zeros
MASK_BIAS = -10000.0  # diffusers' additive bias on the logits of padded caption tokens


def pos_embed(cfg: PixArtConfig) -> np.ndarray:
    """The fixed 2-D sin-cos position table ``[num_patches, hidden]`` float32 of diffusers'
    ``PatchEmbed`` at its base size: patch positions ``arange(grid) / interpolation_scale``
    (computed in float32 as there), then sin/cos features in float64; the first half of the
    channels encodes the column (w), the second the row (h); tokens row-major."""
    grid = cfg.input_size // cfg.patch_size
    pos = np.arange(grid, dtype=np.float32) / np.float32(cfg.interpolation_scale)
    w_idx, h_idx = np.meshgrid(pos, pos)  # w varies fastest
    table = np.concatenate([sincos_1d(cfg.hidden_size // 2, w_idx),
                            sincos_1d(cfg.hidden_size // 2, h_idx)], axis=1)
    return table.astype(np.float32)


def _layer_norm(dtype, param_dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, use_fast_variance=False,
                        dtype=dtype, param_dtype=param_dtype)


def _table_init():
    def init(key, shape, dtype):
        return (jax.random.normal(key, shape) / np.sqrt(shape[-1])).astype(dtype)
    return init


class CrossAttention(nn.Module):
    """Multi-head attention of image tokens ``[B, N, D]`` to caption tokens whose keys and
    values (``kv`` ``[B, L, 2D]``) are computed by ``kv_of`` once per caption."""

    dim: int
    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=nn.initializers.xavier_uniform())
        self.q = nn.Dense(self.dim, **kw)
        self.kv = nn.Dense(2 * self.dim, **kw)
        self.proj = nn.Dense(self.dim, **{**kw, "kernel_init": _ZERO})

    def kv_of(self, y: jax.Array) -> jax.Array:
        """Projected caption ``[B, L, D]`` -> keys and values ``[B, L, 2D]`` (k then v)."""
        return self.kv(y)

    def __call__(self, x: jax.Array, kv: jax.Array, bias: jax.Array) -> jax.Array:
        n, length, _ = x.shape
        heads, head_dim = self.num_heads, self.dim // self.num_heads
        q = self.q(x).reshape(n, length, heads, head_dim)
        kv = kv.reshape(n, kv.shape[1], 2, heads, head_dim)
        k, v = kv[:, :, 0].astype(q.dtype), kv[:, :, 1].astype(q.dtype)
        out = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype))
        return self.proj(out.reshape(n, length, self.dim))


class PixArtBlock(nn.Module):
    """adaLN-single block: self-attention, cross-attention to the caption, MLP."""

    hidden_size: int
    num_heads: int
    mlp_width: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.scale_shift_table = self.param("scale_shift_table", _table_init(),
                                            (6, self.hidden_size), self.param_dtype)
        self.norm1 = _layer_norm(**kw)
        self.attn = Attention(self.hidden_size, self.num_heads, **kw)
        self.cross_attn = CrossAttention(self.hidden_size, self.num_heads, **kw)
        self.norm2 = _layer_norm(**kw)
        self.mlp = Mlp(self.mlp_width, self.hidden_size, **kw)

    def caption_kv(self, y: jax.Array) -> jax.Array:
        return self.cross_attn.kv_of(y)

    def __call__(self, x, t6, kv, bias, share_cfg=False):
        mod = self.scale_shift_table[None].astype(self.dtype) + t6.reshape(
            t6.shape[0], 6, self.hidden_size)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            mod[:, i] for i in range(6))
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa[:, None] * self.attn(h, share_cfg=share_cfg)
        x = x + self.cross_attn(x, kv, bias)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp[:, None] * self.mlp(h)


class PixArtFinalLayer(nn.Module):
    """LayerNorm, modulated by ``scale_shift_table [2, D] + c`` (shift, scale), then linear."""

    hidden_size: int
    patch_size: int
    out_channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.scale_shift_table = self.param("scale_shift_table", _table_init(),
                                            (2, self.hidden_size), self.param_dtype)
        self.norm_final = _layer_norm(self.dtype, self.param_dtype)
        self.linear = nn.Dense(self.patch_size ** 2 * self.out_channels, kernel_init=_ZERO,
                               dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x, c):
        mod = self.scale_shift_table[None].astype(self.dtype) + c[:, None]
        return self.linear(modulate(self.norm_final(x), mod[:, 0], mod[:, 1]))


# ----------------------------------------------------------------------------- conditioning


def _cond_keys(cfg: PixArtConfig, precomputed: bool) -> tuple[str, ...]:
    keys = ("kv" if precomputed else "caption", "mask")
    return keys + (("resolution", "aspect_ratio") if cfg.use_micro_conditions else ())


def check_pixart_cond(cond, cfg: PixArtConfig, batch: int | None = None,
                      arg: str = "cond") -> bool:
    """Raise ``ValueError`` naming the entry unless ``cond`` is a PixArt conditioning of
    ``cfg`` (shapes and dtypes always; mask values and finiteness where concrete). Returns
    whether it holds precomputed ``"kv"`` (else ``"caption"``)."""
    if not isinstance(cond, Mapping):
        raise ValueError(f"{arg}: expected a dict with 'caption' [B, L, {cfg.caption_channels}] "
                         f"and 'mask' [B, L], got {type(cond).__name__}")
    precomputed = "kv" in cond
    if precomputed and "caption" in cond:
        raise ValueError(f"{arg}: expected 'caption' or precomputed 'kv', got both")
    want = _cond_keys(cfg, precomputed)
    missing = [k for k in want if k not in cond]
    unexpected = sorted(str(k) for k in cond if k not in want)
    if missing or unexpected:
        micro = ("" if cfg.use_micro_conditions else
                 " (this config has use_micro_conditions=False)")
        raise ValueError(f"{arg}: expected the entries {list(want)}{micro}; "
                         + "; ".join(p for p in (f"missing {missing}" if missing else "",
                                                 f"unexpected {unexpected}" if unexpected else "")
                                     if p))
    shapes = {k: tuple(np.shape(cond[k])) for k in want}
    main = "kv" if precomputed else "caption"
    ndim = 4 if precomputed else 3
    if len(shapes[main]) != ndim:
        layout = (f"[B, depth={cfg.depth}, L, {2 * cfg.hidden_size}]" if precomputed
                  else f"[B, L, {cfg.caption_channels}]")
        raise ValueError(f"{arg}['{main}']: expected {ndim}-D {layout}, got shape {shapes[main]}")
    n, length = shapes[main][0], shapes[main][-2]
    if batch is not None and n != batch:
        raise ValueError(f"{arg}['{main}']: expected a batch of {batch} (x's), got {n}")
    if precomputed and shapes[main][1:2] + shapes[main][3:] != (cfg.depth, 2 * cfg.hidden_size):
        raise ValueError(f"{arg}['kv']: expected [B, {cfg.depth}, L, {2 * cfg.hidden_size}] "
                         f"(caption_kv of this config), got {shapes[main]}")
    if not precomputed and shapes[main][2] != cfg.caption_channels:
        raise ValueError(f"{arg}['caption']: expected caption embeddings of width "
                         f"caption_channels={cfg.caption_channels} [B, L, "
                         f"{cfg.caption_channels}], got width {shapes[main][2]} (shape "
                         f"{shapes[main]}): another text encoder than the model's?")
    if length < 1 or length > cfg.max_tokens:
        raise ValueError(f"{arg}['{main}']: expected 1 to max_tokens={cfg.max_tokens} caption "
                         f"tokens, got {length} (PixArt-α takes 120, PixArt-Σ 300: set "
                         f"max_tokens)")
    for key, value in cond.items():
        dtype = getattr(value, "dtype", None) or np.asarray(value).dtype
        if key == "mask":
            if shapes[key] != (n, length):
                raise ValueError(f"{arg}['mask']: expected [B, L] = [{n}, {length}], got "
                                 f"{shapes[key]}")
            if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)):
                raise ValueError(f"{arg}['mask']: expected int or bool (1 = token, 0 = padding),"
                                 f" got {dtype}")
            if not isinstance(value, jax.core.Tracer):
                values = np.unique(np.asarray(value))
                if not np.isin(values, (0, 1)).all():
                    raise ValueError(f"{arg}['mask']: expected 0/1 values, got {values[:8]}")
            continue
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{arg}['{key}']: expected a floating dtype, got {dtype}")
        if key in ("resolution", "aspect_ratio"):
            width = 2 if key == "resolution" else 1
            if shapes[key] not in ((n, width),) + (((n,),) if width == 1 else ()):
                raise ValueError(f"{arg}['{key}']: expected [B, {width}] = [{n}, {width}], got "
                                 f"{shapes[key]}")
        bad = count_nonfinite(value)
        if bad:
            raise ValueError(f"{arg}['{key}']: expected finite values, got {bad[0]} NaN and "
                             f"{bad[1]} infinite")
    return precomputed


class PixArt(nn.Module):
    """PixArt-α / Σ transformer; see the module docstring for the call and the paths."""

    config: PixArtConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(d, cfg.patch_size, **kw)
        self.t_embedder = TimestepEmbedder(d, **kw)
        self.t_block = nn.Dense(6 * d, kernel_init=nn.initializers.normal(0.02), **kw)
        if cfg.use_micro_conditions:
            self.csize_embedder = TimestepEmbedder(d // 3, **kw)
            self.ar_embedder = TimestepEmbedder(d // 3, **kw)
        self.caption_projection = Mlp(d, d, **kw)
        self.blocks = [PixArtBlock(d, cfg.num_heads, cfg.mlp_hidden_size, **kw)
                       for _ in range(cfg.depth)]
        self.final_layer = PixArtFinalLayer(d, cfg.patch_size, cfg.out_channels, **kw)

    def _embedded_time(self, t, cond, batch):
        c = self.t_embedder(broadcast_t(t, batch))
        if self.config.use_micro_conditions:
            res = jnp.asarray(cond["resolution"], jnp.float32).reshape(-1)
            ar = jnp.asarray(cond["aspect_ratio"], jnp.float32).reshape(-1)
            c = c + jnp.concatenate([self.csize_embedder(res).reshape(batch, -1),
                                     self.ar_embedder(ar).reshape(batch, -1)],
                                    axis=-1).astype(c.dtype)
        return c

    def precompute_cond(self, cond):
        """``cond`` with ``"caption"`` -> the same conditioning with ``"kv"`` instead: every
        block's cross-attention keys and values ``[B, depth, L, 2 * hidden]``. The samplers
        call it once before their step loop (``trdq_jax.sampling.conditioning.precompute``)."""
        if check_pixart_cond(cond, self.config):
            return dict(cond)
        caption = jnp.asarray(cond["caption"]).astype(jnp.dtype(self.config.dtype))
        y = self.caption_projection(caption)
        kv = jnp.stack([block.caption_kv(y) for block in self.blocks], axis=1)
        out = {k: v for k, v in cond.items() if k != "caption"}
        out["kv"] = kv
        return out

    def __call__(self, x, t, cond, share_cfg=False, train: bool = False):
        del train  # no dropout inside: caption dropout is the data's (trdq_jax.training.text)
        cfg = self.config
        check_share_cfg(share_cfg)
        # x and t as every model checks them (labels: none here, so a dummy that passes)
        check_inputs(x, t, np.zeros((x.shape[0],), np.int32) if x.ndim else x,
                     spatial_shape=(cfg.input_size, cfg.input_size), channels=cfg.in_channels,
                     num_label_values=1, layout="[B, H, W, C]")
        batch = x.shape[0]
        precomputed = check_pixart_cond(cond, cfg, batch)
        dtype = jnp.dtype(cfg.dtype)
        h = self.x_embedder(x.astype(dtype)) + jnp.asarray(pos_embed(cfg), dtype)[None]
        c = self._embedded_time(t, cond, batch)
        t6 = self.t_block(nn.silu(c))
        mask = jnp.asarray(cond["mask"]).astype(jnp.float32)
        bias = ((1.0 - mask) * MASK_BIAS)[:, None, None, :]  # [B, 1 head, 1 query, L]
        if precomputed:
            kv_all = jnp.asarray(cond["kv"])
            y = None
        else:
            y = self.caption_projection(jnp.asarray(cond["caption"]).astype(dtype))
        for i, block in enumerate(self.blocks):
            kv = kv_all[:, i] if precomputed else block.caption_kv(y)
            h = block(h, t6, kv, bias, share_cfg=share_cfg)
        h = self.final_layer(h, c)
        return unpatchify(h, cfg.patch_size, cfg.out_channels).astype(jnp.float32)


def caption_kv(params, cfg: PixArtConfig, cond) -> dict:
    """The conditioning ``cond`` (with ``"caption"``) with the caption replaced by its
    projection's cross-attention keys and values for every block, ``"kv"`` ``[B, depth, L,
    2 * hidden]`` (``"mask"`` and the micro-conditions kept). Passing the result as ``cond``
    gives the model's output unchanged, without recomputing them: compute it once per prompt
    (batch), outside a sampler's step loop. ``cond`` already holding ``"kv"`` is returned as
    it is."""
    return PixArt(cfg).apply({"params": params}, cond, method=PixArt.precompute_cond)


def dummy_cond(cfg: PixArtConfig, batch: int = 1, length: int | None = None) -> dict:
    """Zero caption embeddings with an all-ones mask (and 1:1 micro-conditions at the model's
    own resolution, 8 px per latent): the conditioning pytree for ``init`` / ``eval_shape``."""
    length = cfg.max_tokens if length is None else length
    cond = {"caption": jnp.zeros((batch, length, cfg.caption_channels), jnp.float32),
            "mask": jnp.ones((batch, length), jnp.int32)}
    if cfg.use_micro_conditions:
        side = 8.0 * cfg.input_size
        cond["resolution"] = jnp.full((batch, 2), side, jnp.float32)
        cond["aspect_ratio"] = jnp.ones((batch, 1), jnp.float32)
    return cond


# Published checkpoints: latent side, interpolation_scale, micro-conditions, caption tokens.
PIXART_PRESETS = {
    "alpha-256": (32, 0.5, False, 120),
    "alpha-512": (64, 1.0, False, 120),
    "alpha-1024-MS": (128, 2.0, True, 120),
    "sigma-256": (32, 0.5, False, 300),
    "sigma-512": (64, 1.0, False, 300),
    "sigma-1024-MS": (128, 2.0, False, 300),
    "sigma-2K-MS": (256, 4.0, False, 300),
}


def pixart_config(name: str, **overrides) -> PixArtConfig:
    """The XL/2 config (28 x 1152, 16 heads, T5-XXL captions) of a published checkpoint:
    ``pixart_config("alpha-1024-MS")``, ``pixart_config("sigma-512")``, ... (``PIXART_PRESETS``)."""
    if name not in PIXART_PRESETS:
        raise ValueError(f"name: expected one of {list(PIXART_PRESETS)}, got {name!r}")
    size, scale, micro, tokens = PIXART_PRESETS[name]
    fields = dict(input_size=size, interpolation_scale=scale, use_micro_conditions=micro,
                  max_tokens=tokens)
    fields.update(overrides)
    return PixArtConfig(**fields)
