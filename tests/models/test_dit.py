"""DiT: official sizes, numerics against an independent numpy model, input checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trdq_jax.config import DiTConfig
from trdq_jax.models import (abstract_params, build_model, dit_config, init_params, param_count,
                             pos_embed_size)
from trdq_jax.models import factory
from trdq_jax.models.convert import convert_dit_state_dict
from trdq_jax.models.factory import check_params
from tests.models import official_dit

SMALL = DiTConfig(input_size=8, in_channels=3, patch_size=2, hidden_size=48, depth=2, num_heads=4,
                  num_classes=5, learn_sigma=True)


def _official_dims(cfg):
    return dict(depth=cfg.depth, hidden=cfg.hidden_size, in_ch=cfg.in_channels,
                patch=cfg.patch_size, num_classes=cfg.num_classes,
                mlp_hidden=cfg.mlp_hidden_size, out_ch=cfg.out_channels,
                n_tokens=cfg.num_patches)


def test_dit_xl2_official_parameter_count_abstractly():
    cfg = dit_config("XL/2", image_size=256)
    params = abstract_params(cfg)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    assert param_count(params) == 674_834_720
    assert param_count(params) + pos_embed_size(cfg) == 675_129_632


@pytest.mark.parametrize("name", ["S/2", "B/4", "L/8", "XL/2"])
def test_every_official_size_matches_official_key_table(name):
    cfg = dit_config(name, image_size=256)
    expected = official_dit.official_keys(**_official_dims(cfg))
    expected_count = sum(int(np.prod(s)) for s in expected.values())
    assert param_count(abstract_params(cfg)) + pos_embed_size(cfg) == expected_count


def test_forward_matches_independent_numpy_dit():
    rng = np.random.default_rng(0)
    sd = official_dit.random_state_dict(rng, **_official_dims(SMALL))
    params = convert_dit_state_dict(sd, SMALL)
    x = rng.standard_normal((3, 8, 8, 3)).astype(np.float32)
    t = np.array([0, 500, 999])
    y = np.array([0, 4, 5])  # 5 = the null label
    got = build_model(SMALL).apply({"params": params}, x, t, y)
    want = official_dit.forward(sd, x.transpose(0, 3, 1, 2), t, y, SMALL.num_heads,
                                SMALL.patch_size, SMALL.out_channels).transpose(0, 2, 3, 1)
    assert got.shape == (3, 8, 8, 6) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_jit_deterministic_and_bf16_close_to_f32():
    params = init_params(SMALL, jax.random.key(1))
    # adaLN-Zero init makes outputs zero; perturb so the comparison means something.
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    t, y = jnp.array([10.0, 700.0]), jnp.array([1, 3])
    model = build_model(SMALL)
    f = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
    a, b = f(params, x, t, y), f(params, x, t, y)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    eager = model.apply({"params": params}, x, t, y)
    np.testing.assert_allclose(np.asarray(a), np.asarray(eager), rtol=1e-5, atol=1e-5)
    bf16 = build_model(DiTConfig(**{**SMALL.__dict__, "dtype": "bfloat16"}))
    c = bf16.apply({"params": params}, x, t, y)
    assert c.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=0.1 * float(jnp.abs(a).max()))


@pytest.mark.parametrize("bad, arg, pattern", [
    (dict(x=np.zeros((2, 16, 16, 3), np.float32)), "x", "spatial size"),
    (dict(x=np.zeros((2, 8, 8, 4), np.float32)), "x", "channels"),
    (dict(x=np.zeros((2, 8, 8, 3), np.int32)), "x", "floating"),
    (dict(x=np.zeros((2, 8, 8), np.float32)), "x", "4-D"),
    (dict(y=np.array([0, 6])), "y", "labels must lie"),
    (dict(y=np.array([-1, 0])), "y", "labels must lie"),
    (dict(y=np.array([0.0, 1.0])), "y", "integer"),
    (dict(y=np.array([0, 1, 2])), "y", "shape"),
    (dict(t=np.zeros((3,))), "t", "shape"),
    (dict(x=np.zeros((0, 8, 8, 3), np.float32), t=np.zeros((0,)), y=np.zeros((0,), np.int32)),
     "x", r"non-empty batch \(B >= 1\) in \[B, H, W, C\], got shape \(0, 8, 8, 3\)"),
    (dict(x=np.where(np.arange(384).reshape(2, 8, 8, 3) % 7, 0, np.nan).astype(np.float32)), "x",
     r"finite values, got 55 NaN and 0 infinite of 384"),
    (dict(x=jnp.zeros((2, 8, 8, 3)).at[1, 2, 3, 0].set(-jnp.inf)), "x", "0 NaN and 1 infinite"),
    (dict(t=np.array([5.0, np.inf])), "t", "finite values, got 0 NaN and 1 infinite of 2"),
    (dict(t=jnp.array([np.nan, 5.0])), "t", "finite values, got 1 NaN"),
])
def test_bad_inputs_name_the_argument(bad, arg, pattern):
    params = init_params(SMALL, jax.random.key(0))
    inputs = dict(x=np.zeros((2, 8, 8, 3), np.float32), t=np.zeros((2,)), y=np.array([0, 1]))
    inputs.update(bad)
    with pytest.raises(ValueError, match=rf"^{arg}: .*{pattern}"):
        build_model(SMALL).apply({"params": params}, inputs["x"], inputs["t"], inputs["y"])


def test_share_cfg_equals_p_cond_times_v_uncond():
    """With sharing, the block output equals an independent P_cond @ V_uncond computation."""
    from trdq_jax.models.layers import Attention
    attn = Attention(dim=16, num_heads=2)
    x = jax.random.normal(jax.random.key(0), (4, 5, 16))  # [cond(2); uncond(2)]
    p = attn.init(jax.random.key(1), x)["params"]
    got = np.asarray(attn.apply({"params": p}, x, share_cfg=True), np.float64)

    xs = np.asarray(x, np.float64)
    wqkv, bqkv = (np.asarray(p["qkv"][k], np.float64) for k in ("kernel", "bias"))
    wo, bo = (np.asarray(p["proj"][k], np.float64) for k in ("kernel", "bias"))
    qkv = (xs @ wqkv + bqkv).reshape(4, 5, 3, 2, 8)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = np.einsum("bqhd,bkhd->bhqk", q[:2], k[:2]) / np.sqrt(8)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out_c = np.einsum("bhqk,bkhd->bqhd", probs, v[:2]).reshape(2, 5, 16) @ wo + bo
    out_u = np.einsum("bhqk,bkhd->bqhd", probs, v[2:]).reshape(2, 5, 16) @ wo + bo
    np.testing.assert_allclose(got, np.concatenate([out_c, out_u]), rtol=1e-5, atol=1e-5)
    # and the unshared path is ordinary attention for both halves
    plain = np.asarray(attn.apply({"params": p}, x, share_cfg=False))
    np.testing.assert_allclose(plain[:2], got[:2], rtol=1e-5, atol=1e-5)
    assert not np.allclose(plain[2:], got[2:], atol=1e-3)


def test_share_cfg_rejects_odd_batch():
    params = init_params(SMALL, jax.random.key(0))
    with pytest.raises(ValueError, match="share_cfg"):
        build_model(SMALL).apply({"params": params}, jnp.zeros((3, 8, 8, 3)), jnp.zeros((3,)),
                                 jnp.zeros((3,), jnp.int32), share_cfg=True)


def test_param_dtype_bfloat16():
    cfg = DiTConfig(**{**SMALL.__dict__, "param_dtype": "bfloat16", "dtype": "bfloat16"})
    params = abstract_params(cfg)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}


def test_concrete_labels_captured_inside_jit():
    params = init_params(SMALL, jax.random.key(0))
    y = jnp.array([0, 1])
    f = jax.jit(lambda p, x: build_model(SMALL).apply({"params": p}, x, jnp.zeros((2,)), y))
    assert f(params, jnp.zeros((2, 8, 8, 3))).shape == (2, 8, 8, 6)


def test_value_checks_cost_nothing_inside_jit_but_catch_captured_constants():
    params = abstract_params(SMALL)
    model = build_model(SMALL)
    t, y = jnp.zeros((2,)), jnp.array([0, 1])
    nan_x = jnp.full((2, 8, 8, 3), jnp.nan)
    # traced x: values unknown, nothing is checked (and nothing computed) on the jitted path
    out = jax.eval_shape(jax.jit(lambda p, x: model.apply({"params": p}, x, t, y)), params, nan_x)
    assert out.shape == (2, 8, 8, 6)
    with pytest.raises(ValueError, match="^x: expected finite values"):
        jax.eval_shape(jax.jit(lambda p: model.apply({"params": p}, nan_x, t, y)), params)


def test_check_params_accepts_the_config_params_as_arrays_structs_or_tracers():
    params = init_params(SMALL, jax.random.key(0))
    check_params(SMALL, params)
    check_params(SMALL, abstract_params(SMALL))
    check_params(SMALL, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))  # any float
    jax.jit(lambda p: check_params(SMALL, p))(params)


def test_check_params_lists_every_difference():
    other = DiTConfig(**{**SMALL.__dict__, "depth": 3, "num_classes": 7})
    with pytest.raises(ValueError) as e:
        check_params(SMALL, abstract_params(other))
    msg = str(e.value)
    assert msg.startswith(f"params: expected the parameters of {SMALL}, got a tree that differs:")
    assert "unexpected (10): blocks_2/adaLN_modulation_1/bias, " in msg
    assert ("mis-shaped (1): y_embedder/embedding_table/embedding: expected (6, 48), got (8, 48)"
            in msg)
    assert "missing" not in msg

    tree = abstract_params(SMALL)
    del tree["blocks_1"]["mlp"]["fc2"]["bias"]
    tree["blocks_0"]["attn"]["qkv"]["kernel"] = jax.ShapeDtypeStruct((48, 144), jnp.int8)
    tree["extra"] = {"scale": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with pytest.raises(ValueError) as e:
        check_params(SMALL, tree, name="ema_params")
    msg = str(e.value)
    assert msg.startswith("ema_params: expected the parameters of DiTConfig(")
    assert "  missing (1): blocks_1/mlp/fc2/bias\n" in msg
    assert "  unexpected (1): extra/scale\n" in msg
    assert msg.endswith("  not floating point (1): blocks_0/attn/qkv/kernel: int8")


def test_check_params_explains_a_variables_dict_and_caps_long_lists():
    with pytest.raises(ValueError, match=r"^params: got a variables dict \{'params': \.\.\.\}; "
                                         r"pass its \['params'\] entry"):
        check_params(SMALL, {"params": abstract_params(SMALL)})
    with pytest.raises(ValueError, match=r"missing \(.+\): .*, \.\.\. \(\d+ more\)"):
        check_params(SMALL, {"w": jnp.zeros(3)})


def test_check_params_traces_each_config_once(monkeypatch):
    cfg = DiTConfig(**{**SMALL.__dict__, "num_classes": 9})  # not cached by any other test
    calls = []
    real = factory.init_params
    monkeypatch.setattr(factory, "init_params", lambda *a: calls.append(1) or real(*a))
    params = abstract_params(cfg)
    for _ in range(3):
        check_params(cfg, params)
        abstract_params(cfg)
    assert len(calls) == 1


# ----------------------------------------------------------------------------- pos_embed="stored"


def test_stored_sincos_table_gives_the_sincos_model_bit_for_bit():
    """A "stored" DiT whose table is the float32 sin-cos one is the "sincos" DiT; a changed
    table changes the output. Official sizes count the table as a param."""
    import dataclasses
    stored_cfg = dataclasses.replace(SMALL, pos_embed="stored")
    params = init_params(stored_cfg, jax.random.key(0))
    check_params(stored_cfg, params)
    plain = {k: v for k, v in params.items() if k != "pos_embed"}
    check_params(SMALL, plain)
    with pytest.raises(ValueError, match=r"unexpected \(1\): pos_embed"):
        check_params(SMALL, params)
    with pytest.raises(ValueError, match=r"missing \(1\): pos_embed"):
        check_params(stored_cfg, plain)
    sd = official_dit.random_state_dict(np.random.default_rng(0), **_official_dims(SMALL))
    plain = convert_dit_state_dict(sd, SMALL)  # random weights: adaLN-Zero init outputs zeros
    params = {**plain, "pos_embed": params["pos_embed"]}
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    t, y = jnp.array([5, 900]), jnp.array([1, 4])
    want = build_model(SMALL).apply({"params": plain}, x, t, y)
    got = build_model(stored_cfg).apply({"params": params}, x, t, y)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    moved = {**params, "pos_embed": params["pos_embed"] + 0.1 * jax.random.normal(
        jax.random.key(2), params["pos_embed"].shape)}
    assert not np.allclose(build_model(stored_cfg).apply({"params": moved}, x, t, y), want)
    xl = dit_config("XL/2", image_size=256, pos_embed="stored")
    assert param_count(abstract_params(xl)) == 675_129_632


def test_pos_embed_field_is_checked_and_defaults_for_stored_configs():
    from trdq_jax.config import ConfigError, model_config_from_dict, to_dict
    with pytest.raises(ConfigError, match=r"^DiTConfig.pos_embed: expected one of \('sincos', "
                                          r"'stored'\), got 'learned'"):
        DiTConfig(pos_embed="learned")
    old = {k: v for k, v in to_dict(SMALL).items() if k != "pos_embed"}  # saved before the field
    assert model_config_from_dict(old) == SMALL
