"""UNet: numerics against a hand-unrolled float64 numpy model, structure, CFG sharing, checks."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trdq_jax.config import UNetConfig
from trdq_jax.models import abstract_params, build_model, param_count
from trdq_jax.models.layers import Attention
from trdq_jax.models.unet import ResBlock

# Two levels (8x8 -> 4x4), one res block each, attention at 4x4 only.
TINY = UNetConfig(input_size=8, in_channels=2, base_channels=8, channel_mult=(1, 2),
                  num_res_blocks=1, attention_resolutions=(4,), num_heads=2, num_groups=4,
                  num_classes=3, class_dropout_prob=0.1, learn_sigma=True)
B, S, C = 2, TINY.input_size, TINY.in_channels


def _random_params(cfg, seed):
    """N(0, 0.2^2) in every parameter, drawn on the host for the abstract tree (nothing to
    compile; the zero-initialised output convs become non-zero)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype),
                        abstract_params(cfg))


@pytest.fixture(scope="module")
def params():
    return _random_params(TINY, 0)


def _inputs(seed=0, batch=B):
    x = jax.random.normal(jax.random.key(seed), (batch, S, S, C))
    t = jnp.linspace(5.0, 950.0, batch)
    y = jnp.arange(batch) % (TINY.num_classes + 1)  # includes the null label when batch >= 4
    return x, t, y


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg, share_cfg):
    model = build_model(cfg)
    return jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y, share_cfg=share_cfg))


def _apply(params, x, t, y, cfg=TINY, share_cfg=False):
    """Jitted forward (one compile per config and share_cfg value, keeps the file fast)."""
    return _jitted_apply(cfg, share_cfg)(params, x, t, y)


def _apply_eager(params, x, t, y, cfg=TINY, **kw):
    return build_model(cfg).apply({"params": params}, x, t, y, **kw)


# ----------------------------------------------------------------------------- numpy reference


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _dense(p, x):
    return x @ p["kernel"] + p["bias"]


def _conv(p, x, stride=1):
    """Cross-correlation with zero padding k//2, kernel ``[k, k, Cin, Cout]``, NHWC."""
    k = p["kernel"].shape[0]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_h = (x.shape[1] + 2 * pad - k) // stride + 1
    out_w = (x.shape[2] + 2 * pad - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, p["kernel"].shape[-1]))
    for di in range(k):
        for dj in range(k):
            window = xp[:, di:di + stride * out_h:stride, dj:dj + stride * out_w:stride]
            out += window @ p["kernel"][di, dj]
    return out + p["bias"]


def _group_norm(p, x, groups, eps=1e-5):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mu = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mu) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((g - mu) / np.sqrt(var + eps)).reshape(b, h, w, c) * p["scale"] + p["bias"]


def _res(p, x, emb, groups):
    h = _conv(p["conv_in"], _silu(_group_norm(p["norm_in"], x, groups)))
    scale, shift = np.split(_dense(p["emb_proj"], _silu(emb))[:, None, None], 2, axis=-1)
    h = _group_norm(p["norm_out"], h, groups) * (1 + scale) + shift
    h = _conv(p["conv_out"], _silu(h))
    return (_conv(p["skip"], x) if "skip" in p else x) + h


def _attn(p, x, heads, groups, share):
    b, hh, ww, c = x.shape
    h = _group_norm(p["norm"], x, groups).reshape(b, hh * ww, c)
    qkv = _dense(p["attn"]["qkv"], h).reshape(b, hh * ww, 3, heads, c // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = np.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(c // heads)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if share:
        probs = np.concatenate([probs[: b // 2]] * 2)
    out = _dense(p["attn"]["proj"], np.einsum("bhlm,bmhd->blhd", probs, v).reshape(b, -1, c))
    return x + out.reshape(b, hh, ww, c)


def reference_forward(params, x, t, y, share=False):
    """ADM UNet for TINY, unrolled by hand: 8x8 (width 8) -> 4x4 (width 16, attention)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    groups, heads = TINY.num_groups, TINY.num_heads
    half = TINY.base_channels // 2  # frequency features = base_channels
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    arg = np.asarray(t, np.float64)[:, None] * freqs[None]
    temb = np.concatenate([np.cos(arg), np.sin(arg)], axis=1)
    emb = _dense(p["t_embedder"]["mlp_2"], _silu(_dense(p["t_embedder"]["mlp_0"], temb)))
    emb = emb + p["y_embedder"]["embedding_table"]["embedding"][np.asarray(y)]
    res = lambda name, h: _res(p[name], h, emb, groups)  # noqa: E731
    attn = lambda name, h: _attn(p[name], h, heads, groups, share)  # noqa: E731

    h0 = _conv(p["conv_in"], np.asarray(x, np.float64))          # 8x8x8
    h1 = res("down_0_res_0", h0)                                 # 8x8x8
    h2 = _conv(p["down_0_downsample"], h1, stride=2)             # 4x4x8
    h3 = attn("down_1_attn_0", res("down_1_res_0", h2))          # 4x4x16
    h = res("mid_res_1", attn("mid_attn", res("mid_res_0", h3)))
    h = attn("up_1_attn_0", res("up_1_res_0", np.concatenate([h, h3], -1)))  # 16+16 -> 16
    h = attn("up_1_attn_1", res("up_1_res_1", np.concatenate([h, h2], -1)))  # 16+8 -> 16
    h = _conv(p["up_1_upsample"], h.repeat(2, axis=1).repeat(2, axis=2))     # 8x8x16
    h = res("up_0_res_0", np.concatenate([h, h1], -1))                       # 16+8 -> 8
    h = res("up_0_res_1", np.concatenate([h, h0], -1))                       # 8+8 -> 8
    return _conv(p["conv_out"], _silu(_group_norm(p["norm_out"], h, groups)))


# ----------------------------------------------------------------------------- numerics


def test_forward_matches_numpy_reference(params):
    x, t, y = _inputs(batch=4)
    got = _apply(params, x, t, y)
    assert got.shape == (4, S, S, TINY.out_channels) and got.dtype == jnp.float32
    assert np.isfinite(np.asarray(got)).all()
    want = reference_forward(params, x, t, y)
    assert np.abs(want).max() > 0.5  # a meaningful, non-degenerate comparison
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_share_cfg_matches_numpy_reference_in_every_attention(params):
    x, t, y = _inputs(seed=1, batch=4)
    got = _apply(params, x, t, y, share_cfg=True)
    want = reference_forward(params, x, t, y, share=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_jit_equals_eager_and_is_deterministic(params):
    x, t, y = _inputs(seed=2)
    a, b = _apply(params, x, t, y), _apply(params, x, t, y)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(a), np.asarray(_apply_eager(params, x, t, y)),
                               rtol=1e-5, atol=1e-5)


def test_fresh_res_block_is_its_skip_path():
    """``conv_out`` starts at zero (ADM), so a fresh block returns its input (or 1x1 skip)."""
    x = jax.random.normal(jax.random.key(3), (2, 4, 4, 8))
    emb = jax.random.normal(jax.random.key(4), (2, 12))
    block = ResBlock(out_channels=8, num_groups=4)
    p = block.init(jax.random.key(5), x, emb)["params"]
    np.testing.assert_array_equal(np.asarray(p["conv_out"]["kernel"]), 0.0)
    np.testing.assert_array_equal(np.asarray(block.apply({"params": p}, x, emb)), np.asarray(x))


def test_bfloat16_compute_and_params(params):
    cfg = UNetConfig(**{**TINY.__dict__, "dtype": "bfloat16", "param_dtype": "bfloat16"})
    assert {a.dtype for a in jax.tree.leaves(abstract_params(cfg))} == {jnp.dtype("bfloat16")}
    x, t, y = _inputs(seed=4)
    ref = reference_forward(params, x, t, y)
    p16 = jax.jit(lambda p: jax.tree.map(lambda a: a.astype(jnp.bfloat16), p))(params)
    got = _apply(p16, x, t, y, cfg=cfg)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), ref, atol=0.08 * np.abs(ref).max())


# ----------------------------------------------------------------------------- parameter count


def _conv_count(k, cin, cout):
    return k * k * cin * cout + cout


def _res_count(cin, cout, emb=32):
    """GN(cin) + conv3(cin->cout) + emb_proj(E->2cout) + GN(cout) + conv3(cout->cout) [+ skip]."""
    skip = _conv_count(1, cin, cout) if cin != cout else 0
    return (2 * cin + _conv_count(3, cin, cout) + (emb * 2 * cout + 2 * cout) + 2 * cout
            + _conv_count(3, cout, cout) + skip)


def _attn_count(c):
    """GN(c) + qkv (c -> 3c) + proj (c -> c) = 4c^2 + 6c."""
    return 2 * c + (3 * c * c + 3 * c) + (c * c + c)


def test_param_count_small_config_hand_enumerated():
    emb = 4 * TINY.base_channels  # 32; time features = base_channels = 8
    count = ((8 * emb + emb) + (emb * emb + emb)          # t_embedder mlp_0, mlp_2
             + (TINY.num_classes + 1) * emb               # y_embedder (+ null row)
             + _conv_count(3, 2, 8)                       # conv_in
             + _res_count(8, 8) + _conv_count(3, 8, 8)    # down_0_res_0, down_0_downsample
             + _res_count(8, 16) + _attn_count(16)        # down_1_res_0, down_1_attn_0
             + _res_count(16, 16) + _attn_count(16) + _res_count(16, 16)   # middle
             + _res_count(32, 16) + _attn_count(16)       # up_1_res_0 on [h, down_1 out]
             + _res_count(24, 16) + _attn_count(16)       # up_1_res_1 on [h, downsample out]
             + _conv_count(3, 16, 16)                     # up_1_upsample
             + _res_count(24, 8) + _res_count(16, 8)      # up_0 on [h, down_0 out], [h, conv_in]
             + 2 * 8 + _conv_count(3, 8, 4))              # norm_out, conv_out
    assert count == 48_820
    assert param_count(abstract_params(TINY)) == count


def test_eval_shape_on_a_larger_config_allocates_nothing():
    cfg = UNetConfig(input_size=32, in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2),
                     num_res_blocks=3, attention_resolutions=(16, 8), num_heads=4, num_groups=32,
                     num_classes=1000, learn_sigma=True)
    abstract = abstract_params(cfg)
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(abstract))
    assert param_count(abstract) > 50_000_000
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    y = jax.ShapeDtypeStruct((2,), jnp.int32)
    out = jax.eval_shape(lambda p, x, t, y: build_model(cfg).apply({"params": p}, x, t, y,
                                                                   share_cfg=True),
                         abstract, x, t, y)
    assert out.shape == (2, 32, 32, 6) and out.dtype == jnp.float32


# ----------------------------------------------------------------------------- structure


def _trace_calls(cfg, batch, share_cfg):
    """Every Attention / Conv call of one forward: (path, input shape, share_cfg or strides)."""
    attn, conv = [], []

    def spy(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, Attention):
            attn.append(("/".join(module.path), args[0].shape, kwargs.get("share_cfg")))
        elif context.method_name == "__call__" and isinstance(module, nn.Conv):
            conv.append(("/".join(module.path), args[0].shape[1:], tuple(module.strides)))
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((batch, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    abstract = abstract_params(cfg)  # outside the spy: init would be recorded too
    with nn.intercept_methods(spy):
        jax.eval_shape(lambda *a: _apply_eager(*a, cfg=cfg, share_cfg=share_cfg),
                       abstract, x, t, y)
    return attn, conv


def test_attention_runs_at_listed_resolutions_over_all_pixels_with_share_cfg():
    # 16x16 (w 8) -> 8x8 (w 16, attention) -> 4x4 (w 32, middle attention only)
    cfg = UNetConfig(input_size=16, in_channels=1, base_channels=8, channel_mult=(1, 2, 4),
                     num_res_blocks=2, attention_resolutions=(8,), num_heads=2, num_groups=4,
                     num_classes=3)
    attn, conv = _trace_calls(cfg, batch=2, share_cfg=True)
    on_8x8 = ((2, 64, 16), True)
    assert attn == [
        ("down_1_attn_0/attn", *on_8x8), ("down_1_attn_1/attn", *on_8x8),
        ("mid_attn/attn", (2, 16, 32), True),
        ("up_1_attn_0/attn", *on_8x8), ("up_1_attn_1/attn", *on_8x8),
        ("up_1_attn_2/attn", *on_8x8),
    ]
    resampling = [c for c in conv if "sample" in c[0]]
    assert resampling == [
        ("down_0_downsample", (16, 16, 8), (2, 2)), ("down_1_downsample", (8, 8, 16), (2, 2)),
        ("up_2_upsample", (8, 8, 32), (1, 1)), ("up_1_upsample", (16, 16, 16), (1, 1)),
    ]
    skips = {c[0]: c[1][-1] for c in conv if c[0].endswith("/skip")}
    # 1x1 skip inputs = concatenated widths; the skip stack is [8 (conv_in), 8, 8, 8 (down),
    # 16, 16, 16 (down), 32, 32], popped last-in first-out: 32+32, 32+32, 32+16 | 32+16, 16+16,
    # 16+8 | 16+8, 8+8, 8+8
    assert skips == {"down_1_res_0/skip": 8, "down_2_res_0/skip": 16,
                     "up_2_res_0/skip": 64, "up_2_res_1/skip": 64, "up_2_res_2/skip": 48,
                     "up_1_res_0/skip": 48, "up_1_res_1/skip": 32, "up_1_res_2/skip": 24,
                     "up_0_res_0/skip": 24, "up_0_res_1/skip": 16, "up_0_res_2/skip": 16}


def test_share_cfg_identical_halves_equal_unshared_and_cond_half_is_untouched(params):
    x, t, y = _inputs(seed=6)
    same = (jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, y]))
    np.testing.assert_allclose(np.asarray(_apply(params, *same, share_cfg=True)),
                               np.asarray(_apply(params, *same)), rtol=1e-5, atol=1e-5)
    x_u, _, _ = _inputs(seed=7)
    null = jnp.full_like(y, TINY.num_classes)
    pair = (jnp.concatenate([x, x_u]), jnp.concatenate([t, t]), jnp.concatenate([y, null]))
    shared = np.asarray(_apply(params, *pair, share_cfg=True))
    plain = np.asarray(_apply(params, *pair))
    np.testing.assert_allclose(shared[:B], plain[:B], rtol=1e-5, atol=1e-5)
    # one attention level in TINY, so the effect is small, but far above float32 noise (~1e-6)
    assert np.abs(shared[B:] - plain[B:]).max() > 1e-4


def test_batch_elements_are_independent_without_sharing(params):
    x, t, y = _inputs(seed=8, batch=4)
    full = np.asarray(_apply(params, x, t, y))
    x2 = x.at[3].add(1.0)
    changed = np.asarray(_apply(params, x2, t, y))
    np.testing.assert_allclose(changed[:3], full[:3], rtol=1e-6, atol=1e-6)
    assert np.abs(changed[3] - full[3]).max() > 1e-2


# ----------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("bad, arg, pattern", [
    (dict(x=np.zeros((2, 16, 16, 2), np.float32)), "x", "spatial size"),
    (dict(x=np.zeros((2, 8, 8, 3), np.float32)), "x", "channels"),
    (dict(x=np.zeros((2, 8, 8, 2), np.int32)), "x", "floating"),
    (dict(x=np.zeros((2, 8, 8), np.float32)), "x", "4-D"),
    (dict(y=np.array([0, 4])), "y", "labels must lie"),
    (dict(y=np.array([-1, 0])), "y", "labels must lie"),
    (dict(y=np.array([0.0, 1.0])), "y", "integer"),
    (dict(y=np.array([0, 1, 2])), "y", "shape"),
    (dict(t=np.zeros((2, 1))), "t", "shape"),
    (dict(x=np.zeros((0, 8, 8, 2), np.float32), t=np.zeros((0,)), y=np.zeros((0,), np.int32)),
     "x", r"non-empty batch \(B >= 1\)"),
    (dict(x=np.full((2, 8, 8, 2), np.nan, np.float32)), "x", "finite values, got 256 NaN"),
    (dict(t=np.array([np.inf, 3.0])), "t", "finite values, got 0 NaN and 1 infinite"),
])
def test_bad_inputs_name_the_argument(params, bad, arg, pattern):
    inputs = dict(x=np.zeros((2, S, S, C), np.float32), t=np.zeros((2,)), y=np.array([0, 3]))
    inputs.update(bad)
    with pytest.raises(ValueError, match=rf"^{arg}: .*{pattern}"):
        _apply_eager(params, inputs["x"], inputs["t"], inputs["y"])


def test_share_cfg_rejects_odd_batch(params):
    with pytest.raises(ValueError, match="^share_cfg: .*even batch"):
        _apply_eager(params, jnp.zeros((3, S, S, C)), jnp.zeros((3,)), jnp.zeros((3,), jnp.int32),
                     share_cfg=True)
