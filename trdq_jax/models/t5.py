"""The T5 v1.1 text encoder (Hugging Face ``T5EncoderModel``, gated-GELU) in Flax Linen.

The caption encoder of PixArt-alpha/Sigma and OpenSora is the encoder stack of T5 v1.1 XXL; this
module computes its ``last_hidden_state`` for inference (no dropout, no decoder, no cache).

Layout (module names follow the Hugging Face state-dict keys, ``name_N`` standing for
``name.N`` of a ``ModuleList``, so that ``trdq_jax.models.convert_t5`` converts by a table)::

    shared                      token embedding [vocab_size, d_model]
    block_i/layer_0/layer_norm  RMSNorm (T5LayerNorm)
    block_i/layer_0/SelfAttention/{q,k,v,o}           Dense, no bias
    block_0/layer_0/SelfAttention/relative_attention_bias   Embed [num_buckets, num_heads]
    block_i/layer_1/layer_norm  RMSNorm
    block_i/layer_1/DenseReluDense/{wi_0,wi_1,wo}     Dense, no bias
    final_layer_norm            RMSNorm

Per block: ``h = h + o(attn(norm(h)))``, then ``h = h + wo(gelu_new(wi_0(n)) * wi_1(n))`` with
``n = norm(h)``; after the last block the final RMSNorm. Facts that differ from most
transformers:

* RMSNorm (``T5LayerNorm``): ``weight * x / sqrt(mean(x^2) + eps)``: no mean subtraction, no
  bias, the mean of squares taken in float32 whatever ``dtype`` is.
* Attention scores are ``q k^T`` without the ``1 / sqrt(d_kv)`` scaling (T5 folds it into the
  initialization), plus the relative position bias, plus the padding mask as an additive
  ``finfo(float32).min`` on masked keys; the scores and the softmax are in float32.
* Only the first block owns ``relative_attention_bias``; the ``[1, num_heads, L, L]`` bias it
  computes is reused by every later block. Buckets are T5's bidirectional ones: half of the
  ``num_buckets`` for keys after the query, half for keys before (or at) it; within a half,
  distances below a quarter of ``num_buckets`` get a bucket each, larger ones share
  logarithmically wider buckets up to ``max_distance``, beyond which all fall into the last.
  They are computed with numpy in float32 in the order transformers' PyTorch code uses, so the
  bucket boundaries are the same ones.
* ``gelu_new`` is the tanh approximation of GELU.

Padded positions are not masked out of the output: a pad token's row attends to the sequence's
real tokens like any other query (as in transformers), so those rows hold finite values that
callers mask with the attention mask. A sequence with no real token at all attends uniformly.

Computation runs in ``cfg.dtype`` (activations and matmuls), parameters are stored in
``cfg.param_dtype``; the output ``last_hidden_state`` is float32. transformers clamps float16
activations that overflow; this module does not (use bfloat16 or float32).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax.config import DTYPES, ConfigError, _check_choice, _check_positive_int, _fail

FEED_FORWARD_PROJ = "gated-gelu"
DENSE_ACT_FN = "gelu_new"


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """The encoder of a Hugging Face ``T5Config`` (field names as there). Defaults: the encoder
    of T5 v1.1 XXL (``google/t5-v1_1-xxl``, PixArt's text encoder: 24 layers, d_model 4096,
    64 heads of 64, d_ff 10240, vocabulary 32128).

    ``feed_forward_proj`` must be ``"gated-gelu"`` (T5 v1.1, with ``dense_act_fn`` ``"gelu_new"``);
    ``"relu"`` (T5 v1.0: one ``wi``, no gate) is refused. ``relative_attention_num_buckets`` must
    be even and at least 4 (bidirectional buckets: half per direction, a quarter exact), and
    ``relative_attention_max_distance`` larger than a quarter of it.
    """

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = FEED_FORWARD_PROJ
    dense_act_fn: str = DENSE_ACT_FN
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        _check_positive_int(self, "vocab_size", "d_model", "d_kv", "d_ff", "num_layers",
                            "num_heads", "relative_attention_num_buckets",
                            "relative_attention_max_distance")
        buckets = self.relative_attention_num_buckets
        if buckets % 2 or buckets < 4:
            _fail(self, "relative_attention_num_buckets", "an even int >= 4 (bidirectional "
                  "buckets: half per direction)", buckets)
        if self.relative_attention_max_distance <= buckets // 4:
            _fail(self, "relative_attention_max_distance",
                  f"an int > relative_attention_num_buckets / 4 = {buckets // 4}",
                  self.relative_attention_max_distance)
        eps = self.layer_norm_epsilon
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (
                math.isfinite(eps) and 0 < eps < 1):
            _fail(self, "layer_norm_epsilon", "a number in (0, 1)", eps)
        if self.feed_forward_proj != FEED_FORWARD_PROJ:
            if self.feed_forward_proj == "relu":
                raise ConfigError("T5EncoderConfig.feed_forward_proj: 'relu' is T5 v1.0 (one "
                                  "ReLU wi, no gate), not supported; expected 'gated-gelu' "
                                  "(T5 v1.1)")
            _fail(self, "feed_forward_proj", f"{FEED_FORWARD_PROJ!r} (T5 v1.1)",
                  self.feed_forward_proj)
        if self.dense_act_fn != DENSE_ACT_FN:
            _fail(self, "dense_act_fn", f"{DENSE_ACT_FN!r} (what 'gated-gelu' means)",
                  self.dense_act_fn)
        _check_choice(self, "dtype", DTYPES)
        _check_choice(self, "param_dtype", DTYPES)

    @property
    def inner_dim(self) -> int:
        """``num_heads * d_kv``: the width of q, k, v (not necessarily ``d_model``)."""
        return self.num_heads * self.d_kv


# ----------------------------------------------------------------------------- position buckets


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int,
                             max_distance: int) -> np.ndarray:
    """T5's bidirectional bucket of ``key_position - query_position`` (int array, any shape) ->
    int32 buckets in ``[0, num_buckets)``; float32 arithmetic in transformers' order."""
    rel = np.asarray(relative_position, np.int64)
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):  # log(0) where the exact branch is taken anyway
        scaled = (np.log(dist.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact))
                  * np.float32(half - max_exact))
    large = max_exact + np.where(dist < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(dist < max_exact, dist, large)).astype(np.int32)


@functools.lru_cache(maxsize=64)
def _bucket_table(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    pos = np.arange(length)
    return relative_position_bucket(pos[None, :] - pos[:, None], num_buckets, max_distance)


# ----------------------------------------------------------------------------- modules


def _dtype(name: str):
    return jnp.dtype(name)


class T5LayerNorm(nn.Module):
    """RMSNorm without mean subtraction or bias; the mean of squares in float32."""

    eps: float
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],),
                           _dtype(self.param_dtype))
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(_dtype(self.dtype))
        return scale.astype(_dtype(self.dtype)) * y


class T5Attention(nn.Module):
    """Self-attention with T5's relative position bias; ``has_relative_attention_bias`` on the
    first block only, which returns the bias for the others."""

    cfg: T5EncoderConfig
    has_relative_attention_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask_bias: jax.Array, position_bias: jax.Array | None):
        cfg = self.cfg
        b, length, _ = x.shape
        kw = dict(use_bias=False, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype))
        heads = lambda a: a.reshape(b, length, cfg.num_heads, cfg.d_kv)  # noqa: E731
        q = heads(nn.Dense(cfg.inner_dim, name="q", **kw)(x))
        k = heads(nn.Dense(cfg.inner_dim, name="k", **kw)(x))
        v = heads(nn.Dense(cfg.inner_dim, name="v", **kw)(x))
        if position_bias is None:
            if not self.has_relative_attention_bias:
                raise ValueError("T5Attention: a block without relative_attention_bias needs the "
                                 "first block's position_bias")
            table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                             dtype=jnp.float32, param_dtype=_dtype(cfg.param_dtype),
                             name="relative_attention_bias")
            buckets = _bucket_table(length, cfg.relative_attention_num_buckets,
                                    cfg.relative_attention_max_distance)
            position_bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]
            position_bias = position_bias.astype(jnp.float32)  # [1, H, L, L]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores + position_bias + mask_bias
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, cfg.inner_dim)
        return nn.Dense(cfg.d_model, name="o", **kw)(out), position_bias


class T5LayerSelfAttention(nn.Module):
    cfg: T5EncoderConfig
    has_relative_attention_bias: bool = False

    @nn.compact
    def __call__(self, h, mask_bias, position_bias):
        cfg = self.cfg
        normed = T5LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype,
                             name="layer_norm")(h)
        out, position_bias = T5Attention(cfg, self.has_relative_attention_bias,
                                         name="SelfAttention")(normed, mask_bias, position_bias)
        return h + out, position_bias


class T5DenseGatedActDense(nn.Module):
    """``wo(gelu_new(wi_0(x)) * wi_1(x))``."""

    cfg: T5EncoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        kw = dict(use_bias=False, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype))
        gate = jax.nn.gelu(nn.Dense(cfg.d_ff, name="wi_0", **kw)(x), approximate=True)
        return nn.Dense(cfg.d_model, name="wo", **kw)(gate * nn.Dense(cfg.d_ff, name="wi_1",
                                                                      **kw)(x))


class T5LayerFF(nn.Module):
    cfg: T5EncoderConfig

    @nn.compact
    def __call__(self, h):
        cfg = self.cfg
        normed = T5LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype,
                             name="layer_norm")(h)
        return h + T5DenseGatedActDense(cfg, name="DenseReluDense")(normed)


class T5Block(nn.Module):
    cfg: T5EncoderConfig
    has_relative_attention_bias: bool = False

    @nn.compact
    def __call__(self, h, mask_bias, position_bias):
        h, position_bias = T5LayerSelfAttention(self.cfg, self.has_relative_attention_bias,
                                                name="layer_0")(h, mask_bias, position_bias)
        return T5LayerFF(self.cfg, name="layer_1")(h), position_bias


class T5Encoder(nn.Module):
    """``(input_ids [B, L] int, attention_mask [B, L] int/bool) -> last_hidden_state`` float32
    ``[B, L, d_model]``. ``attention_mask`` 1/True marks real tokens, 0/False padding (keys that
    no query attends to); None means all real. Token ids are not range-checked here (a gather
    clamps): ``encode`` checks them."""

    cfg: T5EncoderConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        cfg = self.cfg
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=_dtype(cfg.dtype),
                         param_dtype=_dtype(cfg.param_dtype), name="shared")
        h = embed(input_ids)
        keep = jnp.asarray(attention_mask).astype(jnp.bool_)[:, None, None, :]  # [B, 1, 1, L]
        mask_bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        position_bias = None
        for i in range(cfg.num_layers):
            h, position_bias = T5Block(cfg, has_relative_attention_bias=(i == 0),
                                       name=f"block_{i}")(h, mask_bias, position_bias)
        h = T5LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype,
                        name="final_layer_norm")(h)
        return h.astype(jnp.float32)


# ----------------------------------------------------------------------------- params


def _dummy_ids() -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, 2), jnp.int32)  # parameters do not depend on the length


def abstract_t5_params(cfg: T5EncoderConfig) -> dict:
    """The params tree of ``T5Encoder(cfg)`` as ``jax.ShapeDtypeStruct`` leaves
    (``jax.eval_shape``: nothing is allocated or computed)."""
    model = T5Encoder(cfg)
    return jax.eval_shape(lambda key, ids: model.init(key, ids)["params"],
                          jax.random.PRNGKey(0), _dummy_ids())


def init_t5_params(cfg: T5EncoderConfig, rng: jax.Array) -> dict:
    """Random parameters for ``T5Encoder(cfg)`` in ``cfg.param_dtype``, jitted: Dense kernels
    normal with variance ``1 / fan_in``, the token embedding and the relative attention bias
    standard normal, RMSNorm scales 1. ``rng``: a PRNG key.

    All random leaves come from one ``jax.random.normal`` draw, split by shape (a Flax
    ``model.init`` makes one threefry call per parameter, slow to compile on CPU).
    """
    return _init(cfg, rng)


@functools.partial(jax.jit, static_argnums=(0,))
def _init(cfg: T5EncoderConfig, rng: jax.Array) -> dict:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_t5_params(cfg))
    sizes = [leaf.size for path, leaf in leaves if path[-1].key != "scale"]
    draw = jax.random.normal(rng, (sum(sizes),), jnp.float32)
    out, start = [], 0
    for path, leaf in leaves:
        name = path[-1].key
        if name == "scale":
            value = jnp.ones(leaf.shape, jnp.float32)
        else:
            value = draw[start:start + leaf.size].reshape(leaf.shape)
            start += leaf.size
            if name == "kernel":
                value = value / math.sqrt(leaf.shape[0])
        out.append(value.astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- running


@functools.partial(jax.jit, static_argnums=(1,))
def _encode(params, cfg: T5EncoderConfig, input_ids, attention_mask):
    return T5Encoder(cfg).apply({"params": params}, input_ids, attention_mask)


def encode(params, cfg: T5EncoderConfig, input_ids, attention_mask=None) -> jax.Array:
    """Checked, jitted ``T5Encoder(cfg)``: ``input_ids`` int ``[B, L]`` with every id in
    ``[0, vocab_size)`` (checked when concrete), ``attention_mask`` ``[B, L]`` int/bool (None:
    all real) -> float32 ``[B, L, d_model]``. Raises ``ValueError`` naming the argument."""
    ids = input_ids
    shape = tuple(getattr(ids, "shape", ()))
    if len(shape) != 2 or 0 in shape or not jnp.issubdtype(getattr(ids, "dtype", None),
                                                           jnp.integer):
        raise ValueError(f"input_ids: expected a non-empty int array [B, L], got shape {shape} "
                         f"dtype {getattr(ids, 'dtype', type(ids).__name__)}")
    if not isinstance(ids, jax.core.Tracer):
        arr = np.asarray(ids)
        if arr.min() < 0 or arr.max() >= cfg.vocab_size:
            raise ValueError(f"input_ids: ids must lie in [0, vocab_size={cfg.vocab_size}), got "
                             f"[{int(arr.min())}, {int(arr.max())}] (a tokenizer of another "
                             "vocabulary?)")
    if attention_mask is None:
        attention_mask = jnp.ones(shape, jnp.int32)
    mshape = tuple(getattr(attention_mask, "shape", ()))
    mdtype = getattr(attention_mask, "dtype", None)
    if mshape != shape or not (jnp.issubdtype(mdtype, jnp.integer) or mdtype == jnp.bool_):
        raise ValueError(f"attention_mask: expected an int or bool array of shape {shape} (that "
                         f"of input_ids), got shape {mshape} dtype {mdtype}")
    return _encode(params, cfg, jnp.asarray(ids, jnp.int32), jnp.asarray(attention_mask))


__all__ = ["T5EncoderConfig", "T5Encoder", "abstract_t5_params", "encode", "init_t5_params",
           "relative_position_bucket"]
