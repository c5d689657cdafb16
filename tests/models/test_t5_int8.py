"""Weight-only int8 and bfloat16 T5 encoders (``trdq_jax.models.t5_int8``) against the float one.

Three encoders: the tiny Hugging Face fixture (``tests/models/fixtures/tiny_t5``, see test_t5.py);
a random one with T5-XXL's proportions scaled down (d_model 512, 8 heads of 64, d_ff 1280 =
2.5 d_model as XXL's 10240 / 4096, 6 layers, vocabulary 1000 so that the embedding is 2.8% of
the parameters as XXL's 32128 x 4096 is of its 4.76B); and XXL's own shapes, counted through
``jax.eval_shape`` without allocating anything.

The byte bound of the issue (int8 <= 0.52 x bf16, whole tree) is a statement about Dense-
dominated encoders: int8 halves the Dense kernels only, the embedding stays bf16. It holds on
XXL (0.514) and on the XXL-proportioned one (0.517); the fixture, whose embedding is 15% of its
parameters, is at 0.63, checked against the formula instead. (The 256-wide, vocabulary-2000
config with 6 layers has a 10% embedding share, hence 0.56: not XXL's proportions.)
"""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trdq_jax.models.convert_t5 import load_t5_encoder
from trdq_jax.models.t5 import T5EncoderConfig, abstract_t5_params, encode, init_t5_params
from trdq_jax.models.t5_int8 import (DENSE_NAMES, _block, _dense_layers, _embed, encode_int8,
                                     quantize_t5_weights, t5_bytes, to_bfloat16)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
T5_DIR = FIXTURES / "tiny_t5"
COS = 0.999
SCALED_XXL = T5EncoderConfig(vocab_size=1000, d_model=512, d_kv=64, d_ff=1280, num_layers=6,
                             num_heads=8)


@pytest.fixture(scope="module")
def io():
    return dict(np.load(FIXTURES / "tiny_t5_io.npz"))


@pytest.fixture(scope="module")
def tiny():
    return load_t5_encoder(T5_DIR)


@pytest.fixture(scope="module")
def scaled():
    cfg = SCALED_XXL
    params = init_t5_params(cfg, jax.random.PRNGKey(0))
    # T5's own initialization (transformers' T5PreTrainedModel._init_weights) folds the missing
    # 1 / sqrt(d_kv) of the attention scores into q: std (d_model * d_kv) ** -0.5, the others
    # fan_in ** -0.5 as init_t5_params draws them. Without it random scores have std
    # sqrt(d_kv) = 8, the softmax is nearly one-hot and any perturbation flips it.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x / np.sqrt(cfg.d_kv) if jax.tree_util.keystr(path).endswith(
            "['q']['kernel']") else x, params)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, cfg.vocab_size, (3, 24)).astype(np.int32)
    mask = (np.arange(24)[None] < np.array([[24], [13], [5]])).astype(np.int32)
    return cfg, params, ids, mask


def min_cosine(a, b, mask) -> float:
    """The smallest per-token cosine similarity over the real (non-padded) positions."""
    a = np.asarray(a, np.float64)[mask.astype(bool)]
    b = np.asarray(b, np.float64)[mask.astype(bool)]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(cos.min())


def dense_kernels(params):
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if path[-1].key == "kernel":
            yield tuple(p.key for p in path[:-1]), np.asarray(leaf, np.float32)


def get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def expected_ratio(cfg: T5EncoderConfig) -> float:
    """int8 / bf16 bytes from the shapes alone: Dense codes 1 byte + 4 per output channel,
    every other parameter 2 bytes, against 2 bytes for everything."""
    d, dense, channels = cfg.d_model, 0, 0
    for k, n in [(d, cfg.inner_dim)] * 3 + [(cfg.inner_dim, d)] + [(d, cfg.d_ff)] * 2 + \
            [(cfg.d_ff, d)]:
        dense, channels = dense + k * n, channels + n
    dense, channels = dense * cfg.num_layers, channels * cfg.num_layers
    other = cfg.vocab_size * d + cfg.relative_attention_num_buckets * cfg.num_heads + \
        d * (2 * cfg.num_layers + 1)
    return (dense + 4 * channels + 2 * other) / (2 * dense + 2 * other)


# ----------------------------------------------------------------------------- the codes


def test_codes_against_numpy_reference(tiny, scaled):
    for cfg, params in (tiny, scaled[:2]):
        qparams = quantize_t5_weights(params, cfg)
        kernels = list(dense_kernels(params))
        assert len(kernels) == 7 * cfg.num_layers
        assert {path[-1] for path, _ in kernels} == set(DENSE_NAMES)
        for path, w in kernels:
            leaf = get(qparams, path)
            assert set(leaf) == {"codes", "scale"}
            codes, scale = np.asarray(leaf["codes"]), np.asarray(leaf["scale"])
            assert codes.dtype == np.int8 and codes.shape == w.shape
            assert scale.dtype == np.float32 and scale.shape == w.shape[1:]
            assert codes.min() >= -127 and codes.max() <= 127
            ref_scale = np.abs(w.astype(np.float64)).max(axis=0) / 127.0  # independent
            np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
            assert (np.abs(codes).max(axis=0) == 127).all()  # the range is used to the end
            err = np.abs(codes * ref_scale - w)
            # half a step, up to the float32 rounding of w / scale (|w / scale| <= 127: a
            # quotient of x.4999999 may round to x.5 and then away)
            assert (err <= (0.5 + 1e-4) * ref_scale).all(), path
            ref_codes = np.rint(w / ref_scale)
            assert (codes != ref_codes).mean() < 1e-4  # only exact halves may round otherwise
        for path, leaf in jax.tree_util.tree_flatten_with_path(qparams)[0]:
            if path[-1].key not in ("codes", "scale"):
                assert leaf.dtype == jnp.bfloat16, path
    # float32 for the rest on request; bf16 input kernels are quantized as given
    cfg, params = tiny
    q32 = quantize_t5_weights(params, cfg, rest_dtype="float32")
    assert q32["shared"]["embedding"].dtype == jnp.float32
    qb = quantize_t5_weights(to_bfloat16(params, cfg)[0], cfg)
    assert qb["block_0"]["layer_0"]["SelfAttention"]["q"]["codes"].dtype == jnp.int8


# ----------------------------------------------------------------------------- bytes


def test_bytes_on_fixture_and_xxl_shapes(tiny, scaled):
    cfg, params = tiny
    bf16 = t5_bytes(to_bfloat16(params, cfg)[0])
    int8 = t5_bytes(quantize_t5_weights(params, cfg))
    assert bf16 == t5_bytes(params) // 2 == 2 * sum(x.size for x in jax.tree_util.tree_leaves(
        params))
    ratio = int8 / bf16
    print(f"\nfixture: int8 {int8} B, bf16 {bf16} B, ratio {ratio:.4f}")
    assert ratio == pytest.approx(expected_ratio(cfg), rel=1e-12)
    assert 0.6 < ratio < 0.65  # the embedding (100 x 32) is 15% of the fixture's parameters

    cfg, params = scaled[:2]
    ratio = t5_bytes(quantize_t5_weights(params, cfg)) / t5_bytes(to_bfloat16(params, cfg)[0])
    print(f"scaled XXL proportions: ratio {ratio:.4f}")
    assert ratio == pytest.approx(expected_ratio(cfg), rel=1e-12) and ratio <= 0.52

    xxl = T5EncoderConfig()  # T5 v1.1 XXL's encoder, shapes only
    abstract = abstract_t5_params(xxl)
    n = sum(x.size for x in jax.tree_util.tree_leaves(abstract))
    assert 4.7e9 < n < 4.8e9
    q_abstract = jax.eval_shape(lambda p: quantize_t5_weights(p, xxl), abstract)
    abstract_bf16 = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), abstract)
    ratio = t5_bytes(q_abstract) / t5_bytes(abstract_bf16)
    print(f"T5-XXL: int8 {t5_bytes(q_abstract) / 1e9:.3f} GB, bf16 "
          f"{t5_bytes(abstract_bf16) / 1e9:.3f} GB, ratio {ratio:.4f}")
    assert ratio == pytest.approx(expected_ratio(xxl), rel=1e-12) and ratio <= 0.52


# ----------------------------------------------------------------------------- accuracy


def test_forward_copy_matches_flax_encoder(tiny, io):
    """encode_int8 on the unquantized tree is t5.encode (the functional forward is a copy)."""
    cfg, params = tiny
    ids, mask = io["input_ids"], io["attention_mask"]
    ref = np.asarray(encode(params, cfg, ids, mask))
    out = np.asarray(encode_int8(params, cfg, ids, mask))
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()  # padded rows included


def test_fixture_int8_and_bf16_cosine(tiny, io):
    cfg, params = tiny
    ids, mask = io["input_ids"], io["attention_mask"]
    ref = io["last_hidden_state"]  # transformers, float64
    flt = np.asarray(encode(params, cfg, ids, mask))
    qparams = quantize_t5_weights(params, cfg)
    int8 = np.asarray(encode_int8(qparams, cfg, ids, mask))
    p16, c16 = to_bfloat16(params, cfg)
    bf16 = np.asarray(encode(p16, c16, ids, mask))
    int8_bf16 = np.asarray(encode_int8(qparams, c16, ids, mask))  # bf16 activations
    cos = {name: min_cosine(x, flt, mask) for name, x in
           [("int8", int8), ("bf16", bf16), ("int8+bf16 act", int8_bf16)]}
    print(f"\nfixture min cosine vs float: {cos}; int8 vs transformers "
          f"{min_cosine(int8, ref, mask):.6f}")
    assert cos["int8"] >= COS and cos["bf16"] >= COS and min_cosine(int8, ref, mask) >= COS
    # both approximations at once (not an acceptance item): 0.9988 on this 32-wide encoder
    assert cos["int8+bf16 act"] >= 0.998
    assert int8.dtype == np.float32 and np.isfinite(int8).all()


def test_scaled_xxl_int8_and_bf16_cosine(scaled):
    cfg, params, ids, mask = scaled
    flt = np.asarray(encode(params, cfg, ids, mask))
    qparams = quantize_t5_weights(params, cfg)
    int8 = np.asarray(encode_int8(qparams, cfg, ids, mask))
    p16, c16 = to_bfloat16(params, cfg)
    bf16 = np.asarray(encode(p16, c16, ids, mask))
    cos = {"int8": min_cosine(int8, flt, mask), "bf16": min_cosine(bf16, flt, mask)}
    print(f"\nscaled-XXL min cosine vs float: {cos}")
    assert all(c >= COS for c in cos.values())

    # memory: a block's compiled program holds at most that block's kernels dequantized
    h, mask_bias, position_bias = _embed(qparams, cfg, jnp.asarray(ids), jnp.asarray(mask))
    blk = _dense_layers(qparams["block_1"])
    stats = _block.lower(blk, cfg, h, mask_bias, position_bias).compile().memory_analysis()
    if stats is None:
        pytest.skip("no memory analysis on this backend")
    dense_f32 = sum(w.nbytes for _, w in dense_kernels(params))
    layer_f32 = dense_f32 // cfg.num_layers
    print(f"one block's temporaries {stats.temp_size_in_bytes} B; one block's kernels in "
          f"float32 {layer_f32} B, all {dense_f32} B")
    assert stats.temp_size_in_bytes < 1.2 * layer_f32


# ----------------------------------------------------------------------------- bad input


def test_bad_input(tiny, io):
    cfg, params = tiny
    with pytest.raises(ValueError, match="^rest_dtype: expected one of"):
        quantize_t5_weights(params, cfg, rest_dtype="float16")
    with pytest.raises(ValueError, match="^params: not the float parameter tree"):
        quantize_t5_weights(params, dataclasses.replace(cfg, num_layers=3))
    with pytest.raises(ValueError, match="^params: not the float parameter tree"):
        quantize_t5_weights({"shared": params["shared"]}, cfg)
    qparams = quantize_t5_weights(params, cfg)
    with pytest.raises(ValueError, match="^qparams: no block_2"):
        encode_int8(qparams, dataclasses.replace(cfg, num_layers=3), io["input_ids"])
    with pytest.raises(ValueError, match=r"^input_ids: ids must lie in \[0, vocab_size=100\)"):
        encode_int8(qparams, cfg, np.full((1, 4), 100, np.int32))
    with pytest.raises(ValueError, match="^attention_mask: expected an int or bool array"):
        encode_int8(qparams, cfg, io["input_ids"], io["attention_mask"][:, :5])


def test_bundled_encoder_int8_cosine():
    """The bundled digits-t5 (the encoder of digits-pixart) on every held-out caption and the
    empty prompt: weight-only int8 hidden states within cosine 0.999 of float."""
    from trdq_jax.data.captions import HELDOUT_TEMPLATES, caption
    from trdq_jax.models.text_encoder import load_text_encoder
    encoder = load_text_encoder("digits-t5")
    prompts = [caption(d, t) for t in HELDOUT_TEMPLATES for d in range(10)] + [""]
    from trdq_jax.models.convert_t5 import tokenize
    ids, mask, _ = tokenize(None, prompts, 24, tokenizer=encoder.tokenizer, cfg=encoder.cfg)
    flt = np.asarray(encode(encoder.params, encoder.cfg, ids, mask))
    int8 = np.asarray(encode_int8(quantize_t5_weights(encoder.params, encoder.cfg), encoder.cfg,
                                  ids, mask))
    cos = min_cosine(int8, flt, mask)
    print(f"\ndigits-t5 int8 min cosine vs float: {cos:.6f}")
    assert cos >= COS
