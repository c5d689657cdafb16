"""Building blocks shared by the DiT, video DiT and UNet.

Module and parameter names follow facebookresearch/DiT (and timm) so that a checkpoint converts
with a table: ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``t_embedder.mlp_0`` ...
Flax names replace the ``.N`` of ``nn.Sequential`` indices by ``_N``.
"""
from __future__ import annotations

import math

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- fixed embeddings


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal time embedding as in DiT/ADM: ``[cos(t f), sin(t f)]``.

    Args:
      t: ``[B]`` float or int time steps (training-step units, e.g. 0..999).
      dim: embedding width.
    Returns:
      ``[B, dim]`` float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """``[len(positions), dim]`` float64: ``[sin(p w), cos(p w)]`` with ``w = 1/10000^(2i/dim)``."""
    if dim % 2:
        raise ValueError(f"dim: expected an even width, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.asarray(positions, np.float64).reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """DiT's fixed 2-D position embedding, ``[grid_size**2, dim]`` float64, row-major tokens.

    The first half of the channels encodes the column (w) index and the second half the row (h)
    index, exactly as ``get_2d_sincos_pos_embed`` of the official code.
    """
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    w_idx, h_idx = np.meshgrid(grid_w, grid_h)  # w varies fastest, like the reference
    return np.concatenate([sincos_1d(dim // 2, w_idx), sincos_1d(dim // 2, h_idx)], axis=1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation: ``x * (1 + scale) + shift`` with ``[B, D]`` shift/scale over ``[B, ..., D]``."""
    expand = (slice(None),) + (None,) * (x.ndim - 2) + (slice(None),)
    return x * (1 + scale[expand]) + shift[expand]


# ----------------------------------------------------------------------------- modules


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> MLP(SiLU). Params ``mlp_0``, ``mlp_2`` like the official Sequential."""

    hidden_size: int
    frequency_embedding_size: int = 256
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        dense = lambda name: nn.Dense(self.hidden_size, dtype=self.dtype,  # noqa: E731
                                      param_dtype=self.param_dtype,
                                      kernel_init=nn.initializers.normal(0.02), name=name)
        h = timestep_embedding(t, self.frequency_embedding_size)
        return dense("mlp_2")(nn.silu(dense("mlp_0")(h)))


class LabelEmbedder(nn.Module):
    """Class-label table with one extra "null" row (index ``num_classes``) when CFG dropout is on.

    Label dropout happens only when ``train=True`` and a ``'dropout'`` rng is given.
    """

    num_classes: int
    hidden_size: int
    dropout_prob: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, labels: jax.Array, train: bool = False) -> jax.Array:
        use_null = self.dropout_prob > 0
        table = nn.Embed(self.num_classes + int(use_null), self.hidden_size,
                         param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embedding_table")
        if train and use_null:
            drop = jax.random.bernoulli(self.make_rng("dropout"), self.dropout_prob, labels.shape)
            labels = jnp.where(drop, self.num_classes, labels)
        return table(labels)


class Mlp(nn.Module):
    """timm ``Mlp``: fc1 -> GELU(tanh) -> fc2."""

    hidden_features: int
    out_features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=nn.initializers.xavier_uniform())
        x = nn.Dense(self.hidden_features, name="fc1", **kw)(x)
        x = nn.gelu(x, approximate=True)
        return nn.Dense(self.out_features, name="fc2", **kw)(x)


def check_share_cfg(share_cfg) -> None:
    """``share_cfg`` is a bool (every attention shares, or none) or a frozenset of attention
    module paths (``"blocks_3/attn"``) that share; anything else is a ValueError."""
    if isinstance(share_cfg, bool):
        return
    if not isinstance(share_cfg, frozenset) or not all(isinstance(p, str) for p in share_cfg):
        raise ValueError(f"share_cfg: expected a bool or a frozenset of attention module paths "
                         f"(e.g. frozenset({{'blocks_0/attn'}})), got {share_cfg!r}")


def shares(share_cfg, path: str) -> bool:
    """Whether the attention at module path ``path`` shares under ``share_cfg``."""
    check_share_cfg(share_cfg)
    return share_cfg if isinstance(share_cfg, bool) else path in share_cfg


def shared_cfg_attention(q_cond: jax.Array, k_cond: jax.Array, v: jax.Array) -> jax.Array:
    """Attention-Sharing: the uncond half reuses the cond half's attention probabilities.

    The batch is ``[cond; uncond]`` (``2B``). Only the cond half has queries and keys: ``QKᵀ``
    and the softmax are computed for it alone, so that work is really skipped for the uncond
    half; then ``out_cond = P_cond V_cond`` and ``out_uncond = P_cond V_uncond``.

    Args:
      q_cond, k_cond: ``[B, L, H, Dh]``.
      v: ``[2B, L, H, Dh]``.
    Returns:
      ``[2B, L, H, Dh]`` in v's dtype.
    """
    half = q_cond.shape[0]
    if v.shape[0] != 2 * half:
        raise ValueError(f"share_cfg: expected v of batch 2 x {half} [cond; uncond], got batch "
                         f"{v.shape[0]}")
    scale = 1.0 / math.sqrt(q_cond.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q_cond, k_cond,
                        preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, H, Lq, Lk]
    # one batched product for both halves: P_cond times [V_cond | V_uncond] along the head dim
    out = jnp.einsum("bhqk,bkhe->bqhe", probs, jnp.concatenate([v[:half], v[half:]], axis=-1))
    dh = v.shape[-1]
    return jnp.concatenate([out[..., :dh], out[..., dh:]])


class FusedQKV(nn.Dense):
    """The fused ``qkv`` projection: an ``nn.Dense`` of ``3 * dim`` features (same parameters,
    same checkpoint keys) that can also compute the value columns alone (``value``), which is
    all the uncond half needs where it shares the cond half's attention probabilities."""

    def value(self, x: jax.Array) -> jax.Array:
        """``x [..., K] -> v [..., dim]``: the last third of the outputs, ``x W[:, 2dim:] + b``."""
        dim = self.features // 3
        params = self.variables["params"]
        kernel = params["kernel"][:, 2 * dim:]
        bias = params["bias"][2 * dim:] if self.use_bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                                precision=self.precision)
        return y + bias if bias is not None else y


class Attention(nn.Module):
    """timm-style multi-head self-attention with fused ``qkv`` and ``proj`` projections.

    ``share_cfg`` (a bool, or a frozenset of attention module paths such as
    ``"blocks_3/attn"``: see ``shares``) switches on CFG Attention-Sharing for this layer (see
    ``shared_cfg_attention``): the batch is ``[cond; uncond]`` and the uncond half computes
    only its values. This is the one place where a model knows about CFG, because sharing
    changes the computation itself. Plain attention goes through
    ``jax.nn.dot_product_attention`` (fused kernels on GPU).

    Input/output ``[N, L, D]``.
    """

    dim: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, share_cfg=False) -> jax.Array:
        n, length, _ = x.shape
        head_dim = self.dim // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=nn.initializers.xavier_uniform())
        qkv_layer = FusedQKV(3 * self.dim, name="qkv", **kw)
        split = lambda a: a.reshape(a.shape[0], length, 3, self.num_heads, head_dim)  # noqa
        if shares(share_cfg, "/".join(self.path)) and not self.is_initializing():
            if n % 2:
                raise ValueError(f"share_cfg: expected an even batch [cond; uncond], got batch {n}")
            qkv_cond = split(qkv_layer(x[:n // 2]))
            v_uncond = qkv_layer.value(x[n // 2:]).reshape(n // 2, length, self.num_heads,
                                                           head_dim)
            v = jnp.concatenate([qkv_cond[:, :, 2], v_uncond.astype(qkv_cond.dtype)])
            out = shared_cfg_attention(qkv_cond[:, :, 0], qkv_cond[:, :, 1], v)
        else:
            qkv = split(qkv_layer(x))
            out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        out = out.reshape(n, length, self.dim)
        return nn.Dense(self.dim, name="proj", **kw)(out)


# ----------------------------------------------------------------------------- input checks


def check_inputs(x: jax.Array, t: jax.Array, y: jax.Array, *, spatial_shape: tuple[int, ...],
                 channels: int, num_label_values: int, layout: str) -> None:
    """Raise ``ValueError`` naming the argument when model inputs are malformed.

    Shapes and dtypes are always checked, and the batch must be non-empty. Values (labels in
    range, finite ``x`` and ``t``) are checked when they are concrete (outside ``jit``); inside
    ``jit`` they cannot be inspected and the check costs nothing, so the sampler and the CLI
    validate on the host before tracing.

    Args:
      x: ``[B, *spatial_shape, channels]`` floating, ``B >= 1``, finite.
      t: ``[B]`` (or scalar) time steps, finite.
      y: ``[B]`` integer labels in ``[0, num_label_values)``.
      layout: human-readable layout for messages, e.g. ``"[B, H, W, C]"``.
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x: expected a floating dtype, got {x.dtype}")
    expected = (x.shape[0], *spatial_shape, channels)
    if x.ndim != len(expected):
        raise ValueError(f"x: expected {len(expected)}-D input {layout} = {expected}, "
                         f"got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"x: expected a non-empty batch (B >= 1) in {layout}, got shape "
                         f"{tuple(x.shape)}")
    if tuple(x.shape[1:-1]) != tuple(spatial_shape):
        raise ValueError(f"x: expected spatial size {tuple(spatial_shape)} ({layout}), "
                         f"got {tuple(x.shape[1:-1])}")
    if x.shape[-1] != channels:
        raise ValueError(f"x: expected {channels} channels in the last axis ({layout}), "
                         f"got {x.shape[-1]}")
    if not isinstance(t, (jax.Array, np.ndarray)):
        t = np.asarray(t)  # Python scalars/lists; numpy keeps a captured constant concrete
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
        raise ValueError(f"t: expected shape [B]=[{x.shape[0]}] or a scalar, got {t.shape}")
    if not (jnp.issubdtype(t.dtype, jnp.floating) or jnp.issubdtype(t.dtype, jnp.integer)):
        raise ValueError(f"t: expected a numeric dtype, got {t.dtype}")
    for name, value in (("x", x), ("t", t)):
        bad = count_nonfinite(value)
        if bad:
            raise ValueError(f"{name}: expected finite values, got {bad[0]} NaN and {bad[1]} "
                             f"infinite of {int(np.size(value))} (shape {tuple(np.shape(value))})")
    if not isinstance(y, jax.core.Tracer):
        y = np.asarray(y)
    if y.shape != (x.shape[0],):
        raise ValueError(f"y: expected shape [B]=[{x.shape[0]}], got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y: expected integer class labels, got dtype {y.dtype}")
    if not isinstance(y, jax.core.Tracer):
        # numpy, not jnp: inside someone's jit a captured concrete y must not become a tracer
        lo, hi = int(np.min(np.asarray(y))), int(np.max(np.asarray(y)))
        if lo < 0 or hi >= num_label_values:
            raise ValueError(f"y: labels must lie in [0, {num_label_values - 1}] "
                             f"(the last index is the null/CFG label when dropout is on), "
                             f"got range [{lo}, {hi}]")


def count_nonfinite(value) -> tuple[int, int] | None:
    """``(num_nan, num_inf)`` of a concrete floating array with any non-finite entry, else None.

    None, at no cost, for tracers (inside ``jit`` values are unknown) and integer arrays. A
    concrete ``jax.Array`` is reduced where it lives (one bool comes back to the host), also when
    it is a constant captured inside someone's ``jit``.
    """
    if isinstance(value, jax.core.Tracer) or not jnp.issubdtype(value.dtype, jnp.inexact):
        return None
    if isinstance(value, jax.Array):
        with jax.ensure_compile_time_eval():
            if bool(jnp.isfinite(value).all()):
                return None
            return int(jnp.isnan(value).sum()), int(jnp.isinf(value).sum())
    value = np.asarray(value)
    if np.isfinite(value).all():
        return None
    return int(np.isnan(value).sum()), int(np.isinf(value).sum())


def broadcast_t(t: jax.Array, batch: int) -> jax.Array:
    """Scalar or ``[B]`` time steps -> ``[B]`` float32."""
    t = jnp.asarray(t, jnp.float32)
    return jnp.broadcast_to(t, (batch,)) if t.ndim == 0 else t
