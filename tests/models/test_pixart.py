"""The Flax PixArt transformer against diffusers' PixArtTransformer2DModel, through the diffusers
converter.

The fixtures (``tests/models/fixtures/tiny_pixart/{alpha,sigma}`` and ``tiny_pixart_io.npz``,
written by ``scripts/make_pixart_fixture.py`` with torch + diffusers, which these tests never
import) are two tiny random-weight transformers (2 layers, hidden 24, captions of 20 channels,
up to 6 tokens; ``alpha`` with the resolution / aspect-ratio micro-conditions, ``sigma`` with
``interpolation_scale`` 0.5) with reference outputs computed in float64 for two captions, one
of them padded.
"""
from __future__ import annotations

import json
import pathlib
import shutil
from collections import defaultdict

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from trdq_jax.config import (ConfigError, PixArtConfig, model_config_from_dict, to_dict)
from trdq_jax.models import factory
from trdq_jax.models.convert import ConversionError, load_state_dict
from trdq_jax.models.convert_pixart import (convert_diffusers_pixart_state_dict,
                                            diffusers_config, load_diffusers_pixart,
                                            pixart_config_from_diffusers, save_diffusers_pixart,
                                            to_diffusers_state_dict)
from trdq_jax.models.pixart import PixArt, caption_kv, pixart_config, pos_embed

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ROOT = FIXTURES / "tiny_pixart"
WEIGHTS = "diffusion_pytorch_model.safetensors"
RTOL = 1e-4  # max |error| / max |reference|
VARIANTS = ("alpha", "sigma")


@pytest.fixture(scope="module")
def io():
    return dict(np.load(FIXTURES / "tiny_pixart_io.npz"))


def cond_of(io, variant):
    cond = {"caption": io[f"{variant}_caption"], "mask": io[f"{variant}_mask"]}
    if f"{variant}_resolution" in io:
        cond["resolution"] = io[f"{variant}_resolution"]
        cond["aspect_ratio"] = io[f"{variant}_aspect_ratio"]
    return cond


@pytest.fixture(scope="module")
def loaded():
    return {v: load_diffusers_pixart(ROOT / v, max_tokens=6) for v in VARIANTS}


@pytest.fixture(scope="module")
def runners(loaded, io):
    """``runners[v](params, cond=None) -> output``: jitted once per variant, params an argument,
    so each mutation reuses the compiled function."""
    out = {}
    for v in VARIANTS:
        model = PixArt(loaded[v][0])
        fn = jax.jit(lambda p, c, model=model, v=v: model.apply(
            {"params": p}, io[f"{v}_x"], io[f"{v}_t"], c))
        out[v] = lambda p, c=None, fn=fn, v=v: np.asarray(
            fn(p, cond_of(io, v) if c is None else c))
    return out


def rel_error(out, ref):
    return float(np.abs(out - ref).max() / np.abs(ref).max())


# ----------------------------------------------------------------------------- parity


def test_configs_read_from_the_diffusers_directories(loaded):
    alpha, sigma = loaded["alpha"][0], loaded["sigma"][0]
    common = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=24, depth=2,
                  num_heads=2, caption_channels=20, max_tokens=6, learn_sigma=True)
    # alpha: interpolation_scale null -> max(8 // 64, 1) = 1; micro-conditions set explicitly
    assert alpha == PixArtConfig(**common, use_micro_conditions=True, interpolation_scale=1.0)
    assert sigma == PixArtConfig(**common, use_micro_conditions=False, interpolation_scale=0.5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_with_diffusers(variant, loaded, runners, io):
    out = runners[variant](loaded[variant][1])
    err = rel_error(out, io[f"{variant}_out"])
    print(f"{variant}: max |err| / max |ref| = {err:.3g}")
    assert out.shape == io[f"{variant}_out"].shape == (2, 8, 8, 8)
    assert err <= RTOL


def test_position_scale_and_padding_mask_matter(loaded, runners, io):
    """The fixture can see a wrong interpolation_scale and an ignored mask; padded caption
    tokens have no effect."""
    cfg, params = loaded["sigma"]
    assert not np.allclose(pos_embed(cfg), pos_embed(PixArtConfig(**{
        **to_dict(cfg), "family": "pixart", "interpolation_scale": 1.0})))
    cond = cond_of(io, "sigma")
    ref = io["sigma_out"]
    unmasked = runners["sigma"](params, {**cond, "mask": np.ones_like(cond["mask"])})
    assert rel_error(unmasked[1], ref[1]) > 1e-2  # sample 1 has 3 padded tokens
    assert rel_error(unmasked[0], ref[0]) <= RTOL  # sample 0 has none
    noisy = cond["caption"].copy()
    noisy[1, 3:] += 100.0
    assert rel_error(runners["sigma"](params, {**cond, "caption": noisy}), ref) <= RTOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_caption_kv_hoisted_gives_the_same_output(variant, loaded, runners, io):
    cfg, params = loaded[variant]
    cond = cond_of(io, variant)
    pre = caption_kv(params, cfg, cond)
    assert set(pre) == set(cond) - {"caption"} | {"kv"}
    assert pre["kv"].shape == (2, cfg.depth, 6, 2 * cfg.hidden_size)
    direct, hoisted = runners[variant](params), runners[variant](params, pre)
    print(f"{variant}: hoisted vs direct max |diff| = {np.abs(direct - hoisted).max():.3g}")
    # the same operations on the same values; XLA compiles the two programs (K/V inside the
    # step, or passed in) separately, so they may round differently in the last float32 bit
    assert np.abs(hoisted - direct).max() <= 1e-6 * np.abs(direct).max()
    assert caption_kv(params, cfg, pre)["kv"] is pre["kv"]  # already hoisted: unchanged


def test_hoisted_call_computes_no_caption_projection_or_kv(loaded, io):
    """With precomputed ``kv`` a step runs neither the caption projection nor any block's K/V
    projection: they are computed once per prompt, by ``caption_kv``."""
    cfg, params = loaded["alpha"]
    cond = cond_of(io, "alpha")
    called = []

    def record(next_fn, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            called.append("/".join(context.module.path))
        return next_fn(*args, **kwargs)

    pre = caption_kv(params, cfg, cond)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: PixArt(cfg).apply({"params": params}, io["alpha_x"],
                                                 io["alpha_t"], pre))
    assert called and not [p for p in called if p.startswith("caption_projection")
                           or p.endswith("cross_attn/kv")], called
    assert "blocks_1/cross_attn/q" in called and "blocks_0/attn/qkv" in called
    called.clear()
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: caption_kv(params, cfg, cond))
    assert called == ["caption_projection/fc1", "caption_projection/fc2",
                      "blocks_0/cross_attn/kv", "blocks_1/cross_attn/kv"]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("variant", VARIANTS)
def test_to_diffusers_state_dict_round_trip(variant, loaded):
    cfg, params = loaded[variant]
    stored = load_state_dict(ROOT / variant / WEIGHTS)
    back = to_diffusers_state_dict(params, cfg)
    assert set(back) == set(stored)
    for key in stored:
        np.testing.assert_array_equal(back[key], stored[key], err_msg=key)
        assert back[key].flags.c_contiguous
    again = convert_diffusers_pixart_state_dict(back, cfg)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_save_load_and_sharded_index(tmp_path, loaded, runners, io):
    cfg, params = loaded["alpha"]
    saved = save_diffusers_pixart(tmp_path / "saved", params, cfg)
    cfg2, params2 = load_diffusers_pixart(saved, max_tokens=6)
    assert cfg2 == cfg
    assert rel_error(runners["alpha"](params2), io["alpha_out"]) <= RTOL
    with pytest.raises(FileExistsError, match="not an empty directory"):
        save_diffusers_pixart(saved, params, cfg)
    # the same weights as two shards and an index
    state = load_state_dict(ROOT / "alpha" / WEIGHTS)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(ROOT / "alpha" / "config.json", sharded / "config.json")
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(sharded / name))
        weight_map.update({k: name for k in part})
    (sharded / (WEIGHTS + ".index.json")).write_text(json.dumps({"weight_map": weight_map}))
    _, params3 = load_diffusers_pixart(sharded, max_tokens=6)
    jax.tree.map(np.testing.assert_array_equal, params3, params)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard files missing: model-00002"):
        load_diffusers_pixart(sharded, max_tokens=6)


def test_diffusers_config_inverts_the_reader(loaded):
    for cfg, _ in loaded.values():
        assert pixart_config_from_diffusers(diffusers_config(cfg), max_tokens=6) == cfg


# ----------------------------------------------------------------------------- mutations


def _invisible_swap(a: str, b: str) -> bool:
    """A key bias adds ``q . b_k`` to every logit of a query alike, which the softmax cancels
    (also with the padding mask's constant bias): swapping two ``to_k.bias`` changes nothing."""
    return a.endswith(".to_k.bias") and b.endswith(".to_k.bias")


def test_invisible_swaps_are_indeed_invisible(loaded, runners, io):
    cfg, _ = loaded["alpha"]
    state = load_state_dict(ROOT / "alpha" / WEIGHTS)
    for attn in ("attn1", "attn2"):
        key = f"transformer_blocks.0.{attn}.to_k.bias"
        changed = {**state, key: state[key] + 5.0}
        out = runners["alpha"](convert_diffusers_pixart_state_dict(changed, cfg))
        assert rel_error(out, io["alpha_out"]) <= RTOL


def test_every_mutation_is_refused_or_breaks_parity(loaded, runners, io):
    """For every tensor of the alpha fixture: drop it; transpose it (2-D ones, and the patch
    conv's out/in axes); swap it with the next tensor of the same shape (one with no such
    partner has its axis 0 reversed instead). Each must be refused by the converter or move
    the output beyond the parity tolerance."""
    cfg, _ = loaded["alpha"]
    state = load_state_dict(ROOT / "alpha" / WEIGHTS)
    keys = sorted(state)
    by_shape = defaultdict(list)
    for k in keys:
        by_shape[state[k].shape].append(k)
    outcomes = defaultdict(lambda: defaultdict(int))
    undetected = []

    def check(kind, label, mutated, must_name=None):
        try:
            params = convert_diffusers_pixart_state_dict(mutated, cfg)
        except ConversionError as e:
            if must_name is not None:
                assert must_name in str(e), (label, str(e))
            outcomes[kind]["refused"] += 1
            return
        err = rel_error(runners["alpha"](params), io["alpha_out"])
        if err > RTOL:
            outcomes[kind]["parity broken"] += 1
        else:
            outcomes[kind]["UNDETECTED"] += 1
            undetected.append(f"{label}: {err:.3g}")

    for key in keys:
        value = state[key]
        check("drop", f"drop {key}", {k: v for k, v in state.items() if k != key}, key)
        if value.ndim == 2:
            check("transpose", f"transpose {key}", {**state, key: np.ascontiguousarray(value.T)})
        elif value.ndim == 4:
            check("transpose", f"swap out/in of {key}",
                  {**state, key: np.ascontiguousarray(value.transpose(1, 0, 2, 3))})
        group = by_shape[value.shape]
        if len(group) < 2:
            outcomes["swap"]["no same-shaped partner"] += 1
            check("flip", f"flip axis 0 of {key}",
                  {**state, key: np.ascontiguousarray(value[::-1])})
            continue
        start = group.index(key)
        partner = next((group[(start + i) % len(group)] for i in range(1, len(group))
                        if not _invisible_swap(key, group[(start + i) % len(group)])), None)
        if partner is None:
            outcomes["swap"]["only invisible partners"] += 1
            continue
        check("swap", f"swap {key} <-> {partner}",
              {**state, key: state[partner], partner: state[key]})

    print(f"{len(keys)} tensors:", {kind: dict(v) for kind, v in outcomes.items()})
    assert not undetected, "\n".join(undetected)
    assert outcomes["drop"]["refused"] == len(keys)
    assert outcomes["transpose"]["parity broken"] > 0 and outcomes["swap"]["parity broken"] > 0


def test_all_problems_reported_together(loaded):
    cfg, _ = loaded["alpha"]
    state = load_state_dict(ROOT / "alpha" / WEIGHTS)
    bad = dict(state)
    del bad["proj_out.bias"]
    bad["extra.weight"] = np.ones(3, np.float32)
    bad["caption_projection.linear_1.weight"] = np.ones((24, 21), np.float32)
    bad["scale_shift_table"] = np.full((2, 24), np.nan, np.float32)
    with pytest.raises(ConversionError) as e:
        convert_diffusers_pixart_state_dict(bad, cfg, where="'f.safetensors'")
    text = str(e.value)
    assert text.startswith("'f.safetensors': state dict does not match")
    for part in ("unknown keys (1): extra.weight", "missing keys (1): proj_out.bias",
                 "caption_projection.linear_1.weight: expected (24, 20), got (24, 21)",
                 "non-finite keys (1): scale_shift_table (48 NaN, 0 Inf)"):
        assert part in text, text


# ----------------------------------------------------------------------------- bad inputs


def _copy(tmp_path, variant="alpha", config_changes=None, state=None):
    directory = tmp_path / variant
    shutil.copytree(ROOT / variant, directory)
    if config_changes is not None:
        config = json.loads((directory / "config.json").read_text())
        for k, v in config_changes.items():
            if v is ...:
                config.pop(k, None)
            else:
                config[k] = v
        (directory / "config.json").write_text(json.dumps(config))
    if state is not None:
        save_file(state, str(directory / WEIGHTS))
    return directory


@pytest.mark.parametrize("changes, message", [
    ({"_class_name": "UNet2DConditionModel"}, "foreign config: _class_name 'UNet2DConditionModel'"),
    ({"_class_name": ...}, "foreign config: no _class_name"),
    ({"_class_name": "Transformer2DModel", "norm_type": "layer_norm"},
     "foreign config: _class_name 'Transformer2DModel' with norm_type 'layer_norm'"),
    ({"activation_fn": "geglu"}, "activation_fn 'geglu' is not supported"),
    ({"cross_attention_dim": 32}, "cross_attention_dim 32 is not the hidden size"),
    ({"caption_channels": None}, "caption_channels is null"),
    ({"out_channels": 5}, "out_channels 5: expected in_channels=4 or twice it"),
    ({"use_rope": True}, "unsupported PixArt config keys use_rope"),
])
def test_refused_configs_are_one_line_naming_the_file(tmp_path, changes, message):
    directory = _copy(tmp_path, config_changes=changes)
    with pytest.raises(ConversionError) as e:
        load_diffusers_pixart(directory)
    text = str(e.value)
    assert message in text and str(directory / "config.json") in text and "\n" not in text


def test_legacy_transformer2d_class_name_is_read(tmp_path, loaded):
    directory = _copy(tmp_path, config_changes={"_class_name": "Transformer2DModel"})
    cfg, params = load_diffusers_pixart(directory, max_tokens=6)
    assert cfg == loaded["alpha"][0]


def test_vae_and_text_encoder_width_disagreements(tmp_path):
    with pytest.raises(ConversionError, match="in_channels 4 disagrees with the VAE's "
                                              "latent_channels 16"):
        load_diffusers_pixart(ROOT / "alpha", latent_channels=16)
    with pytest.raises(ConversionError, match="caption_channels 20 disagrees with the text "
                                              "encoder's width 4096"):
        load_diffusers_pixart(ROOT / "alpha", text_width=4096)
    load_diffusers_pixart(ROOT / "alpha", latent_channels=4, text_width=20, max_tokens=6)


def test_caption_width_mismatch_at_call(loaded, io):
    cfg, params = loaded["sigma"]
    cond = cond_of(io, "sigma")
    wide = {**cond, "caption": np.zeros((2, 6, 4096), np.float32)}
    with pytest.raises(ValueError, match=r"cond\['caption'\]: expected caption embeddings of "
                                         r"width caption_channels=20 .* got width 4096"):
        PixArt(cfg).apply({"params": params}, io["sigma_x"], io["sigma_t"], wide)


@pytest.mark.parametrize("change, message", [
    (lambda c: {k: v for k, v in c.items() if k != "mask"}, r"missing \['mask'\]"),
    (lambda c: {**c, "resolution": np.ones((2, 2), np.float32)},
     r"use_micro_conditions=False\); unexpected \['resolution'\]"),
    (lambda c: {**c, "caption": np.zeros((2, 7, 20), np.float32),
                "mask": np.ones((2, 7), np.int32)}, "1 to max_tokens=6 caption tokens, got 7"),
    (lambda c: {**c, "mask": c["mask"] * 2}, "expected 0/1 values"),
    (lambda c: {**c, "mask": c["mask"][:, :5]}, r"expected \[B, L\] = \[2, 6\]"),
    (lambda c: {**c, "caption": np.where(np.arange(6)[:, None] == 2, np.nan, c["caption"])},
     r"cond\['caption'\]: expected finite values"),
    (lambda c: c["caption"], "expected a dict with 'caption'"),
])
def test_bad_conditioning_is_refused(loaded, io, change, message):
    cfg, params = loaded["sigma"]
    with pytest.raises(ValueError, match=message):
        PixArt(cfg).apply({"params": params}, io["sigma_x"], io["sigma_t"],
                          change(cond_of(io, "sigma")))


def test_non_finite_tensor_is_named(tmp_path):
    state = load_state_dict(ROOT / "alpha" / WEIGHTS)
    key = "transformer_blocks.1.attn2.to_v.weight"
    value = state[key].copy()
    value[0, 0] = np.inf
    directory = _copy(tmp_path, state={**state, key: value})
    with pytest.raises(ConversionError, match=rf"non-finite keys \(1\): {key} \(0 NaN, 1 Inf\)"):
        load_diffusers_pixart(directory, max_tokens=6)


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_diffusers_pixart(tmp_path / "nope")
    directory = _copy(tmp_path)
    (directory / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_diffusers_pixart(directory)


# ----------------------------------------------------------------------------- config, factory


def test_factory_and_config(loaded):
    cfg, params = loaded["alpha"]
    assert isinstance(factory.build_model(cfg), PixArt)
    assert factory.input_shape(cfg, 3) == (3, 8, 8, 4)
    x, t, cond = factory.dummy_inputs(cfg, 2)
    assert cond["caption"].shape == (2, 6, 20) and cond["resolution"].shape == (2, 2)
    factory.check_params(cfg, params)
    abstract = factory.abstract_params(cfg)
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(np.shape, params)
    assert model_config_from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="PixArtConfig.hidden_size: expected a multiple of 3"):
        PixArtConfig(hidden_size=32, num_heads=2, use_micro_conditions=True)
    with pytest.raises(ConfigError, match="PixArtConfig.interpolation_scale"):
        PixArtConfig(interpolation_scale=0)
    alpha = pixart_config("alpha-1024-MS")
    assert (alpha.input_size, alpha.interpolation_scale, alpha.use_micro_conditions,
            alpha.max_tokens, alpha.hidden_size, alpha.depth) == (128, 2.0, True, 120, 1152, 28)
    assert pixart_config("sigma-1024-MS").max_tokens == 300
