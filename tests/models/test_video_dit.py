"""Video DiT: numerics against an independent float64 numpy model, structure, CFG sharing."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trdq_jax.config import VideoDiTConfig
from trdq_jax.models import abstract_params, build_model, param_count
from trdq_jax.models.layers import Attention

TINY = VideoDiTConfig(num_frames=3, input_size=8, in_channels=2, patch_size=4, hidden_size=16,
                      depth=2, num_heads=2, mlp_ratio=2.0, num_classes=4, class_dropout_prob=0.1,
                      learn_sigma=True)
VIDEO_WIDE = VideoDiTConfig(**{**TINY.__dict__, "temporal_attention": "video"})
B, F, S, C = 2, TINY.num_frames, TINY.input_size, TINY.in_channels


def _random_params(cfg, seed):
    """N(0, 0.2^2) in every parameter, drawn on the host for the abstract tree (nothing to
    compile; unlike the adaLN-Zero init, every gate and output weight is non-zero)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype),
                        abstract_params(cfg))


@pytest.fixture(scope="module")
def params():
    return _random_params(TINY, 0)


def _inputs(seed=0, batch=B):
    x = jax.random.normal(jax.random.key(seed), (batch, F, S, S, C))
    t = jnp.linspace(3.0, 900.0, batch)
    y = jnp.arange(batch) % (TINY.num_classes + 1)  # includes the null label when batch >= 5
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


def _sincos(dim, pos):
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2) / (dim / 2.0))
    arg = np.asarray(pos, np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(arg), np.cos(arg)], axis=1)


def _dense(p, x):
    return x @ p["kernel"] + p["bias"]


def _layer_norm(x, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _attention(p, h, heads, over, share):
    """h ``[B, F, L, D]``; attends over L ("tokens", spatial), over F at each patch position
    ("frames", Latte temporal) or over all F*L tokens of a video ("video", full 3-D).

    With ``share`` the second half of the batch uses the first half's probabilities.
    """
    if over == "video":
        b, f, length, d = h.shape
        out = _attention(p, h.reshape(b, 1, f * length, d), heads, "tokens", share)
        return out.reshape(b, f, length, d)
    over_frames = over == "frames"
    if over_frames:
        h = h.swapaxes(1, 2)
    b, a, length, d = h.shape
    qkv = _dense(p["qkv"], h).reshape(b, a, length, 3, heads, d // heads)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    logits = np.einsum("balhd,bamhd->bahlm", q, k) / math.sqrt(d // heads)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if share:
        probs = np.concatenate([probs[: b // 2]] * 2)
    out = _dense(p["proj"], np.einsum("bahlm,bamhd->balhd", probs, v).reshape(b, a, length, d))
    return out.swapaxes(1, 2) if over_frames else out


def _block(p, tok, c, heads, over, share):
    e = lambda v: v[:, None, None, :]  # noqa: E731  [B, D] over [B, F, L, D]
    sh1, sc1, g1, sh2, sc2, g2 = np.split(_dense(p["adaLN_modulation_1"], _silu(c)), 6, axis=1)
    h = _layer_norm(tok) * (1 + e(sc1)) + e(sh1)
    tok = tok + e(g1) * _attention(p["attn"], h, heads, over, share)
    h = _layer_norm(tok) * (1 + e(sc2)) + e(sh2)
    return tok + e(g2) * _dense(p["mlp"]["fc2"], _gelu_tanh(_dense(p["mlp"]["fc1"], h)))


def reference_forward(params, x, t, y, cfg, share=False):
    """Latte-style video DiT in float64, on the 5-D token layout ``[B, F, L, D]`` throughout."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    b, f, s, _, ch = x.shape
    ps, d, out_ch = cfg.patch_size, cfg.hidden_size, cfg.out_channels
    g = s // ps
    patches = x.reshape(b, f, g, ps, g, ps, ch).transpose(0, 1, 2, 4, 3, 5, 6)
    patches = patches.reshape(b, f, g * g, ps * ps * ch)
    w_embed = p["x_embedder"]["proj"]["kernel"].reshape(ps * ps * ch, d)  # taps (ph, pw, c)
    rows, cols = np.divmod(np.arange(g * g), g)  # row-major tokens
    pos_2d = np.concatenate([_sincos(d // 2, cols), _sincos(d // 2, rows)], axis=1)
    tok = patches @ w_embed + p["x_embedder"]["proj"]["bias"] + pos_2d

    freqs = np.exp(-math.log(10000.0) * np.arange(128) / 128)
    arg = np.asarray(t, np.float64)[:, None] * freqs[None]
    temb = np.concatenate([np.cos(arg), np.sin(arg)], axis=1)
    te = p["t_embedder"]
    c = _dense(te["mlp_2"], _silu(_dense(te["mlp_0"], temb)))
    c = c + p["y_embedder"]["embedding_table"]["embedding"][np.asarray(y)]

    for i in range(cfg.depth):
        tok = _block(p[f"spatial_blocks_{i}"], tok, c, cfg.num_heads, "tokens", share)
        if i == 0:
            tok = tok + _sincos(d, np.arange(f))[None, :, None]
        tok = _block(p[f"temporal_blocks_{i}"], tok, c, cfg.num_heads, cfg.temporal_attention,
                     share)

    fl = p["final_layer"]
    shift, scale = np.split(_dense(fl["adaLN_modulation_1"], _silu(c)), 2, axis=1)
    out = _dense(fl["linear"], _layer_norm(tok) * (1 + scale[:, None, None]) + shift[:, None, None])
    out = out.reshape(b, f, g, g, ps, ps, out_ch).transpose(0, 1, 2, 4, 3, 5, 6)
    return out.reshape(b, f, s, s, out_ch)


# ----------------------------------------------------------------------------- numerics


def test_forward_matches_numpy_reference(params):
    x, t, y = _inputs(batch=5)
    got = _apply(params, x, t, y)
    assert got.shape == (5, F, S, S, TINY.out_channels) and got.dtype == jnp.float32
    assert np.isfinite(np.asarray(got)).all()
    want = reference_forward(params, x, t, y, TINY)
    assert np.abs(want).max() > 0.5  # a meaningful, non-degenerate comparison
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_share_cfg_matches_numpy_reference_in_every_attention(params):
    x, t, y = _inputs(seed=1, batch=4)
    got = _apply(params, x, t, y, share_cfg=True)
    want = reference_forward(params, x, t, y, TINY, share=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("share", [False, True])
def test_video_wide_temporal_attention_matches_numpy_reference(params, share):
    # Same parameter tree as "frames": only what the temporal blocks attend over changes.
    x, t, y = _inputs(seed=9, batch=4)
    got = _apply(params, x, t, y, cfg=VIDEO_WIDE, share_cfg=share)
    want = reference_forward(params, x, t, y, VIDEO_WIDE, share=share)
    assert np.abs(want - reference_forward(params, x, t, y, TINY, share=share)).max() > 1e-2
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("cfg", [TINY, VIDEO_WIDE], ids=["frames", "video"])
@pytest.mark.parametrize("frames", [1, 2])
def test_fewer_frames_match_numpy_reference(params, cfg, frames):
    # Stills (1 frame) and short clips, as joint image-video training feeds them: frame k keeps
    # temporal position k, and the forward is the same network on fewer tokens.
    x, t, y = _inputs(seed=11, batch=4)
    x = x[:, :frames]
    got = _apply(params, x, t, y, cfg=cfg)
    assert got.shape == (4, frames, S, S, cfg.out_channels)
    want = reference_forward(params, x, t, y, cfg)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_jit_equals_eager_and_is_deterministic(params):
    x, t, y = _inputs(seed=2)
    a, b = _apply(params, x, t, y), _apply(params, x, t, y)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(a), np.asarray(_apply_eager(params, x, t, y)),
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_and_params():
    cfg = VideoDiTConfig(**{**TINY.__dict__, "dtype": "bfloat16", "param_dtype": "bfloat16"})
    abstract = abstract_params(cfg)
    assert {a.dtype for a in jax.tree.leaves(abstract)} == {jnp.dtype("bfloat16")}
    p32 = _random_params(TINY, 3)
    x, t, y = _inputs(seed=3)
    ref = reference_forward(p32, x, t, y, TINY)
    p16 = jax.jit(lambda p: jax.tree.map(lambda a: a.astype(jnp.bfloat16), p))(p32)
    got = _apply(p16, x, t, y, cfg=cfg)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), ref, atol=0.08 * np.abs(ref).max())


# ----------------------------------------------------------------------------- parameter count


def closed_form_param_count(cfg):
    """D = hidden, M = int(D * mlp_ratio), p = patch, O = out channels, K = classes.

    x_embedder  p*p*C*D + D
    t_embedder  256*D + D + D*D + D
    y_embedder  (K + [dropout > 0]) * D
    per block   adaLN D*6D + 6D, qkv D*3D + 3D, proj D*D + D, fc1 D*M + M, fc2 M*D + D
                (2 * depth blocks: one spatial + one temporal per layer)
    final       adaLN D*2D + 2D, linear D*p*p*O + p*p*O
    """
    d, m, p, o = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio), cfg.patch_size, \
        cfg.out_channels
    block = (6 * d * d + 6 * d) + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    return ((p * p * cfg.in_channels * d + d) + (256 * d + d + d * d + d)
            + (cfg.num_classes + int(cfg.class_dropout_prob > 0)) * d
            + 2 * cfg.depth * block + (2 * d * d + 2 * d) + (d * p * p * o + p * p * o))


def test_param_count_small_config_closed_form():
    # D=16, M=32, p=4, C=2, O=4, K=4 (+1 null): 528 + 4384 + 80 + 4 * 3792 + 544 + 1088
    assert closed_form_param_count(TINY) == 21_792
    assert param_count(abstract_params(TINY)) == 21_792


def test_eval_shape_on_a_larger_config_allocates_nothing():
    cfg = VideoDiTConfig(num_frames=16, input_size=32, in_channels=4, patch_size=2,
                         hidden_size=384, depth=12, num_heads=6, num_classes=1000)
    abstract = abstract_params(cfg)
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(abstract))
    assert param_count(abstract) == closed_form_param_count(cfg)
    x = jax.ShapeDtypeStruct((2, 16, 32, 32, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    y = jax.ShapeDtypeStruct((2,), jnp.int32)
    out = jax.eval_shape(lambda p, x, t, y: build_model(cfg).apply({"params": p}, x, t, y,
                                                                   share_cfg=True),
                         abstract, x, t, y)
    assert out.shape == (2, 16, 32, 32, 4) and out.dtype == jnp.float32


# ----------------------------------------------------------------------------- structure


def _with_blocks_zeroed(params, prefix):
    """Zero every parameter of the blocks named ``prefix*``: gates become 0, the block identity."""
    return {k: (jax.tree.map(jnp.zeros_like, v) if k.startswith(prefix) else v)
            for k, v in params.items()}


def _max_change(params, x, x2, t, y):
    a, b = np.asarray(_apply(params, x, t, y)), np.asarray(_apply(params, x2, t, y))
    return np.abs(a - b)  # [B, F, H, W, O]


def test_temporal_blocks_mix_frames_and_spatial_blocks_do_not(params):
    x, t, y = _inputs(seed=4)
    x2 = x.at[:, 0].add(1.0)  # change frame 0 only
    full = _max_change(params, x, x2, t, y)
    assert full[:, F - 1].max() > 1e-2  # the last frame hears about frame 0 ...
    spatial_only = _max_change(_with_blocks_zeroed(params, "temporal_blocks"), x, x2, t, y)
    assert spatial_only[:, 0].max() > 1e-2
    assert spatial_only[:, 1:].max() < 1e-6  # ... only through the temporal blocks


def test_spatial_blocks_mix_positions_and_temporal_blocks_do_not(params):
    x, t, y = _inputs(seed=5)
    p = TINY.patch_size
    x2 = x.at[:, :, :p, :p].add(1.0)  # change patch (0, 0) in every frame
    outside = np.ones((S, S), bool)
    outside[:p, :p] = False
    full = _max_change(params, x, x2, t, y)
    assert full[:, :, outside].max() > 1e-2
    temporal_only = _max_change(_with_blocks_zeroed(params, "spatial_blocks"), x, x2, t, y)
    assert temporal_only[:, :, :p, :p].max() > 1e-2
    assert temporal_only[:, :, outside].max() < 1e-6
    # and within patch (0, 0) frames still mix: change frame 0 only, look at the last frame
    x3 = x.at[:, 0, :p, :p].add(1.0)
    assert _max_change(_with_blocks_zeroed(params, "spatial_blocks"), x, x3, t, y)[
        :, F - 1, :p, :p].max() > 1e-2


def test_video_wide_temporal_blocks_carry_a_moved_patch_to_other_positions(params):
    # Frame 0, patch (0, 0) changes; with the spatial blocks off, "frames" attention can only
    # carry that to patch (0, 0) of later frames, "video" attention reaches every patch.
    x, t, y = _inputs(seed=10)
    p = TINY.patch_size
    x2 = x.at[:, 0, :p, :p].add(1.0)
    no_spatial = _with_blocks_zeroed(params, "spatial_blocks")
    last_frame_elsewhere = lambda cfg: np.abs(  # noqa: E731
        np.asarray(_apply(no_spatial, x, t, y, cfg=cfg))
        - np.asarray(_apply(no_spatial, x2, t, y, cfg=cfg)))[:, F - 1, p:, p:]
    assert last_frame_elsewhere(TINY).max() < 1e-6
    assert last_frame_elsewhere(VIDEO_WIDE).max() > 1e-2


@pytest.mark.parametrize("cfg", [TINY, VIDEO_WIDE], ids=["frames", "video"])
def test_share_cfg_reaches_every_attention_with_the_expected_sequences(params, cfg):
    seen = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, Attention) and context.method_name == "__call__":
            seen.append((context.module.path, args[0].shape, kwargs.get("share_cfg")))
        return next_fun(*args, **kwargs)

    x, t, y = _inputs(batch=4)
    with nn.intercept_methods(spy):  # a fresh trace, so every call is seen
        jax.eval_shape(lambda *a: _apply_eager(*a, cfg=cfg, share_cfg=True), params, x, t, y)
    tokens = (S // TINY.patch_size) ** 2
    temporal = (4 * tokens, F, 16) if cfg.temporal_attention == "frames" else (4, F * tokens, 16)
    expected = []
    for i in range(TINY.depth):
        expected.append((("spatial_blocks_%d" % i, "attn"), (4 * F, tokens, 16), True))
        expected.append((("temporal_blocks_%d" % i, "attn"), temporal, True))
    assert seen == expected


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
    assert np.abs(shared[B:] - plain[B:]).max() > 1e-2


def test_label_dropout_in_training_uses_the_null_label(params):
    cfg = VideoDiTConfig(**{**TINY.__dict__, "class_dropout_prob": 1.0})
    x, t, y = _inputs(seed=8)
    dropped = jax.jit(lambda p, x, t, y: build_model(cfg).apply(
        {"params": p}, x, t, y, train=True, rngs={"dropout": jax.random.key(0)}))(params, x, t, y)
    null = _apply(params, x, t, jnp.full_like(y, TINY.num_classes), cfg=cfg)
    np.testing.assert_allclose(np.asarray(dropped), np.asarray(null), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("bad, arg, pattern", [
    (dict(x=np.zeros((2, 3, 16, 16, 2), np.float32)), "x", "spatial size"),
    (dict(x=np.zeros((2, 4, 8, 8, 2), np.float32)), "x", r"1 to num_frames=3 frames"),
    (dict(x=np.zeros((2, 0, 8, 8, 2), np.float32)), "x", r"1 to num_frames=3 frames"),
    (dict(x=np.zeros((2, 3, 8, 8, 3), np.float32)), "x", "channels"),
    (dict(x=np.zeros((2, 3, 8, 8, 2), np.int32)), "x", "floating"),
    (dict(x=np.zeros((2, 8, 8, 2), np.float32)), "x", "5-D"),
    (dict(y=np.array([0, 5])), "y", "labels must lie"),
    (dict(y=np.array([-1, 0])), "y", "labels must lie"),
    (dict(y=np.array([0.0, 1.0])), "y", "integer"),
    (dict(y=np.array([[0], [1]])), "y", "shape"),
    (dict(t=np.zeros((3,))), "t", "shape"),
    (dict(x=np.zeros((0, 3, 8, 8, 2), np.float32), t=np.zeros((0,)), y=np.zeros((0,), np.int32)),
     "x", r"non-empty batch \(B >= 1\) in \[B, F, H, W, C\]"),
    (dict(x=np.full((2, 3, 8, 8, 2), np.inf, np.float32)), "x", "0 NaN and 768 infinite"),
    (dict(t=np.array([1.0, np.nan])), "t", "finite values, got 1 NaN"),
])
def test_bad_inputs_name_the_argument(params, bad, arg, pattern):
    inputs = dict(x=np.zeros((2, F, S, S, C), np.float32), t=np.zeros((2,)), y=np.array([0, 4]))
    inputs.update(bad)
    with pytest.raises(ValueError, match=rf"^{arg}: .*{pattern}"):
        _apply_eager(params, inputs["x"], inputs["t"], inputs["y"])


def test_share_cfg_rejects_odd_batch_even_when_frames_make_it_even(params):
    # B*F = 3*2 would be an even number of rows for the attention, but B = 3 has no halves.
    cfg = VideoDiTConfig(**{**TINY.__dict__, "num_frames": 2})
    with pytest.raises(ValueError, match="^share_cfg: .*even batch"):
        _apply_eager(params, jnp.zeros((3, 2, S, S, C)), jnp.zeros((3,)),
                     jnp.zeros((3,), jnp.int32), cfg=cfg, share_cfg=True)
