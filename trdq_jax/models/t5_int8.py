"""Weight-only int8 and bfloat16 for the Flax T5 v1.1 encoder (``trdq_jax.models.t5``).

T5-XXL's encoder is 4.76B parameters: 19 GB in float32, 9.5 GB in bfloat16, 4.9 GB weight-only
int8. Two lighter forms of the same encoder:

* **bfloat16**: ``to_bfloat16(params, cfg) -> (params_bf16, cfg_bf16)``, every leaf cast to
  bfloat16 and ``cfg`` with ``dtype = param_dtype = "bfloat16"``; run it with
  ``t5.encode`` as usual (RMSNorm statistics, attention scores and softmax stay float32 there).
* **int8**: ``quantize_t5_weights(params, cfg) -> qparams``. Every Dense kernel of the encoder
  (``q, k, v, o`` of each block's self-attention, ``wi_0, wi_1, wo`` of its feed-forward)
  becomes ``{"codes": int8 [K, N], "scale": float32 [N]}``: symmetric round-to-nearest codes in
  ``[-127, 127]`` with one scale per output channel (``scale = max_k |w[k, n]| / 127``, from
  ``trdq_jax.quant.quantizers.quantize_weight``, the project's quantizer). The token embedding
  ``shared``, the relative attention bias table and the RMSNorm scales stay floating point in
  ``rest_dtype`` (bfloat16 by default: 2 bytes each; ``"float32"``: 4). The tree keeps the
  layout of ``params`` (``block_i/layer_0/SelfAttention/q/{codes,scale}`` where ``params`` has
  ``.../q/kernel``), so it shards and saves like the float tree.

Bytes. Scales are float32 (4 bytes per output channel, ``4 / K`` of the kernel's code bytes:
0.1% at XXL's K = 4096; bfloat16 scales would save that 0.05% of the tree at the price of a
coarser scale, so they are not offered). ``t5_bytes(tree)`` sums ``size * itemsize`` over the
leaves (arrays or ``jax.ShapeDtypeStruct``). With ``D`` Dense parameters and ``E`` other ones,
int8 / bf16 = ``(D + 4 * channels + 2E) / (2D + 2E)``: 0.514 on XXL's shapes (E = the
32128 x 4096 embedding, 2.8% of the parameters), but 0.63 on the tiny test fixture whose
embedding is 15% of its parameters; the Dense kernels are what halves.

``encode_int8(qparams, cfg, input_ids, attention_mask)`` computes the same function as
``t5.encode`` (a functional copy of ``T5Encoder``'s forward pass, checked against it to float
rounding on an unquantized tree) with each Dense as ``(x @ codes) * scale``: the int8 codes are
converted to ``cfg.dtype`` (exact: integers up to 256 are exact in bfloat16), multiplied with
float32 accumulation, and the per-output-channel scale is applied to the product's columns
(``x @ (codes * s) = (x @ codes) * s`` exactly; applying it after avoids rounding ``codes * s``
to bfloat16). This is weight-only: activations are not quantized, so there is no int8 x int8
dot (that needs activation scales, which is what the project's W8A8 recipes calibrate).
It also accepts a plain float tree (Dense leaves ``{"kernel": w}``) or a mix.

Memory (the T5-XXL note).

* ``quantize_t5_weights`` works one kernel at a time: each kernel goes through one jitted
  quantizer call (compiled once per shape, 4 shapes per encoder), so the only float32
  temporary is one kernel (XXL's largest, ``wi_0``, 4096 x 10240: 168 MB). Peak = the input
  tree as given + the int8 tree being built + one kernel in float32. Load the checkpoint with
  ``param_dtype="bfloat16"`` (``load_t5_encoder(d, param_dtype="bfloat16")``) and XXL peaks near
  9.5 + 4.9 GB; the float32 encoder (19 GB) never exists. Input leaves may be numpy arrays
  (e.g. straight from safetensors), which are moved to the device one at a time.
* ``encode_int8`` keeps the int8 tree as the resident weights and runs the encoder as one
  jitted call per block (compiled once: every block has the same shapes; the embedding, the
  position bias and the final norm are three more small calls). Each call converts only its
  own block's codes, so the dequantized temporaries are at most one block's kernels in
  ``cfg.dtype`` (XXL in bfloat16: 386 MB), and usually less where the backend fuses the
  convert into the dot. One jit over the whole unrolled encoder was tried first and does not
  give this: XLA's CPU backend schedules every parameter-only convert up front (compiled
  temporaries = a float32 copy of all the Dense kernels, measured on 1, 3 and 6 layers, and
  ``lax.optimization_barrier`` did not stop it), i.e. the double materialisation this module
  is meant to avoid. The test checks one block's compiled temporaries against one block's
  kernels. Called inside a caller's ``jax.jit`` the blocks inline into one program and that
  guarantee is XLA's scheduling again. Per-block calls also compile in the time of one block,
  not 24.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax.models.t5 import T5EncoderConfig, _bucket_table, abstract_t5_params
from trdq_jax.quant.quantizers import quantize_weight

BITS = 8
QMAX = 2 ** (BITS - 1) - 1  # 127: symmetric codes in [-127, 127]
DENSE_NAMES = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")
REST_DTYPES = ("bfloat16", "float32")


# ----------------------------------------------------------------------------- bytes


def t5_bytes(tree) -> int:
    """Bytes of every leaf of ``tree`` (``size * itemsize``; arrays, numpy arrays or
    ``jax.ShapeDtypeStruct``), the whole tree: codes, scales, embeddings, norms."""
    return int(sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
                   for leaf in jax.tree_util.tree_leaves(tree)))


# ----------------------------------------------------------------------------- bfloat16


def to_bfloat16(params, cfg: T5EncoderConfig):
    """``(params, cfg) -> (params in bfloat16, cfg with dtype = param_dtype = "bfloat16")``,
    for ``t5.encode``; leaf by leaf (no second full-size float copy)."""
    _check_tree(params, cfg, "params")
    bf16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(jnp.bfloat16), params)
    return bf16, dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")


# ----------------------------------------------------------------------------- quantization


@jax.jit
def _quantize_kernel(w):
    codes, scale, _ = quantize_weight(w, BITS, symmetric=True)
    return codes, scale


def _check_tree(params, cfg: T5EncoderConfig, name: str):
    want = abstract_t5_params(cfg)
    got_paths = {jax.tree_util.keystr(p): tuple(np.shape(x))
                 for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    want_paths = {jax.tree_util.keystr(p): tuple(x.shape)
                  for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
    if got_paths != want_paths:
        missing = sorted(set(want_paths) - set(got_paths))
        extra = sorted(set(got_paths) - set(want_paths))
        shape = sorted(k for k in set(want_paths) & set(got_paths)
                       if want_paths[k] != got_paths[k])
        raise ValueError(f"{name}: not the float parameter tree of T5Encoder(cfg): missing "
                         f"{missing[:3]}, unexpected {extra[:3]}, mis-shaped {shape[:3]}")


def quantize_t5_weights(params, cfg: T5EncoderConfig, *, rest_dtype: str = "bfloat16") -> dict:
    """Weight-only int8 of a ``T5Encoder(cfg)`` params tree (float32, bfloat16 or float16
    leaves, jax or numpy). Dense ``{"kernel": w}`` -> ``{"codes": int8 [K, N] in [-127, 127],
    "scale": float32 [N]}`` (per output channel, symmetric, round to nearest); every other leaf
    cast to ``rest_dtype`` ("bfloat16" or "float32"). One kernel at a time (see the module
    docstring for peak memory). Raises ``ValueError`` for a tree of another shape."""
    if rest_dtype not in REST_DTYPES:
        raise ValueError(f"rest_dtype: expected one of {REST_DTYPES}, got {rest_dtype!r}")
    _check_tree(params, cfg, "params")
    rest = jnp.dtype(rest_dtype)

    def walk(node, name):
        if isinstance(node, dict) or hasattr(node, "items"):
            if name in DENSE_NAMES and set(node) == {"kernel"}:
                codes, scale = _quantize_kernel(jnp.asarray(node["kernel"]))
                return {"codes": codes, "scale": scale}
            return {k: walk(v, k) for k, v in node.items()}
        return jnp.asarray(node).astype(rest)

    return walk(params, None)


# ----------------------------------------------------------------------------- forward pass


def _dense(x, p, dtype):
    """A bias-free Dense from ``{"kernel"}`` (float) or ``{"codes", "scale"}`` (int8)."""
    if "codes" in p:
        y = jnp.dot(x, p["codes"].astype(dtype), preferred_element_type=jnp.float32)
        return (y * p["scale"].astype(jnp.float32)).astype(dtype)
    # as flax.linen.Dense: both operands promoted to dtype
    return jnp.dot(x, jnp.asarray(p["kernel"]).astype(dtype)).astype(dtype)


def _rms_norm(x, scale, eps, dtype):
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return scale.astype(dtype) * (x32 * jax.lax.rsqrt(var + eps)).astype(dtype)


@functools.partial(jax.jit, static_argnums=(1,))
def _embed(qparams, cfg: T5EncoderConfig, input_ids, attention_mask):
    """-> (h [B, L, d_model] in cfg.dtype, mask_bias [B, 1, 1, L], position_bias [1, H, L, L])."""
    dtype = jnp.dtype(cfg.dtype)
    h = jnp.take(qparams["shared"]["embedding"].astype(dtype), input_ids, axis=0)
    keep = attention_mask.astype(jnp.bool_)[:, None, None, :]
    mask_bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    table = qparams["block_0"]["layer_0"]["SelfAttention"]["relative_attention_bias"]
    buckets = _bucket_table(input_ids.shape[1], cfg.relative_attention_num_buckets,
                            cfg.relative_attention_max_distance)
    position_bias = jnp.transpose(jnp.take(table["embedding"].astype(jnp.float32),
                                           jnp.asarray(buckets), axis=0), (2, 0, 1))[None]
    return h, mask_bias, position_bias


def _dense_layers(blk):
    """A block's tree without the bias table (block_0's), so every block has one structure
    and ``_block`` compiles once for all of them."""
    att = {k: v for k, v in blk["layer_0"]["SelfAttention"].items()
           if k != "relative_attention_bias"}
    return {"layer_0": {"layer_norm": blk["layer_0"]["layer_norm"], "SelfAttention": att},
            "layer_1": blk["layer_1"]}


@functools.partial(jax.jit, static_argnums=(1,))
def _block(blk, cfg: T5EncoderConfig, h, mask_bias, position_bias):
    """One encoder block: ``h + o(attn(norm(h)))``, then ``+ wo(gelu(wi_0(n)) * wi_1(n))``."""
    dtype = jnp.dtype(cfg.dtype)
    b, length, _ = h.shape
    eps = cfg.layer_norm_epsilon
    heads = lambda a: a.reshape(b, length, cfg.num_heads, cfg.d_kv)  # noqa: E731
    att = blk["layer_0"]["SelfAttention"]
    n = _rms_norm(h, blk["layer_0"]["layer_norm"]["scale"], eps, dtype)
    q, k, v = (heads(_dense(n, att[name], dtype)) for name in ("q", "k", "v"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores + position_bias + mask_bias, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, cfg.inner_dim)
    h = h + _dense(out, att["o"], dtype)
    ff = blk["layer_1"]["DenseReluDense"]
    n = _rms_norm(h, blk["layer_1"]["layer_norm"]["scale"], eps, dtype)
    gate = jax.nn.gelu(_dense(n, ff["wi_0"], dtype), approximate=True)
    return h + _dense(gate * _dense(n, ff["wi_1"], dtype), ff["wo"], dtype)


@functools.partial(jax.jit, static_argnums=(1,))
def _final(qparams_final, cfg: T5EncoderConfig, h):
    return _rms_norm(h, qparams_final["scale"], cfg.layer_norm_epsilon,
                     jnp.dtype(cfg.dtype)).astype(jnp.float32)


def _encode_int8(qparams, cfg: T5EncoderConfig, input_ids, attention_mask):
    h, mask_bias, position_bias = _embed(qparams, cfg, input_ids, attention_mask)
    for i in range(cfg.num_layers):  # one jitted call per block (see the module docstring)
        h = _block(_dense_layers(qparams[f"block_{i}"]), cfg, h, mask_bias, position_bias)
    return _final(qparams["final_layer_norm"], cfg, h)


def _check_inputs(cfg: T5EncoderConfig, input_ids, attention_mask):
    shape = tuple(getattr(input_ids, "shape", ()))
    if len(shape) != 2 or 0 in shape or not jnp.issubdtype(
            getattr(input_ids, "dtype", None), jnp.integer):
        raise ValueError(f"input_ids: expected a non-empty int array [B, L], got shape {shape} "
                         f"dtype {getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    if not isinstance(input_ids, jax.core.Tracer):
        arr = np.asarray(input_ids)
        if arr.min() < 0 or arr.max() >= cfg.vocab_size:
            raise ValueError(f"input_ids: ids must lie in [0, vocab_size={cfg.vocab_size}), got "
                             f"[{int(arr.min())}, {int(arr.max())}]")
    if attention_mask is None:
        attention_mask = jnp.ones(shape, jnp.int32)
    mshape = tuple(getattr(attention_mask, "shape", ()))
    mdtype = getattr(attention_mask, "dtype", None)
    if mshape != shape or not (jnp.issubdtype(mdtype, jnp.integer) or mdtype == jnp.bool_):
        raise ValueError(f"attention_mask: expected an int or bool array of shape {shape}, got "
                         f"shape {mshape} dtype {mdtype}")
    return jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask)


def _check_qtree(qparams, cfg: T5EncoderConfig):
    for i in range(cfg.num_layers):
        blk = qparams.get(f"block_{i}") if hasattr(qparams, "get") else None
        if blk is None:
            raise ValueError(f"qparams: no block_{i} (cfg.num_layers={cfg.num_layers})")
        for path in (("layer_0", "SelfAttention", n) for n in DENSE_NAMES[:4]), \
                (("layer_1", "DenseReluDense", n) for n in DENSE_NAMES[4:]):
            for a, m, n in path:
                leaf = blk[a][m][n]
                if "codes" in leaf and (leaf["codes"].dtype != jnp.int8
                                        or leaf["scale"].shape != leaf["codes"].shape[-1:]):
                    raise ValueError(f"qparams: block_{i}/{a}/{m}/{n}: expected int8 codes "
                                     f"[K, N] and a scale [N]")


def encode_int8(qparams, cfg: T5EncoderConfig, input_ids, attention_mask=None) -> jax.Array:
    """Checked, jitted encoder on a ``quantize_t5_weights`` tree (or a float one): ``input_ids``
    int ``[B, L]`` in ``[0, vocab_size)``, ``attention_mask`` ``[B, L]`` int/bool (None: all
    real) -> float32 ``[B, L, d_model]``, computed in ``cfg.dtype`` (``cfg.param_dtype`` is not
    used: leaves carry their own dtypes). Raises ``ValueError`` naming the argument."""
    _check_qtree(qparams, cfg)
    ids, mask = _check_inputs(cfg, input_ids, attention_mask)
    return _encode_int8(qparams, cfg, ids, mask)


__all__ = ["encode_int8", "quantize_t5_weights", "t5_bytes", "to_bfloat16"]
