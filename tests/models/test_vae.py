"""The Flax SD-VAE against diffusers' AutoencoderKL, through the diffusers and LDM converters.

The fixture (``tests/models/fixtures/tiny_vae*``, written by ``scripts/make_vae_fixture.py``
with torch + diffusers, which these tests never import) is a tiny random-weight AutoencoderKL
(block_out_channels (8, 16), layers_per_block 1, norm_num_groups 4, scaling 0.3, shift 0.1)
with reference encode/decode outputs computed in float64.
"""
from __future__ import annotations

import json
import pathlib
import pickle
import re
import shutil
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from trdq_jax.config import VAEConfig
from trdq_jax.models.convert import ConversionError, load_state_dict
from trdq_jax.models.convert_vae import (convert_diffusers_vae_state_dict,
                                         convert_ldm_vae_state_dict, diffusers_config, ldm_key,
                                         load_diffusers_vae, load_ldm_vae, save_diffusers_vae,
                                         to_diffusers_state_dict, vae_config_from_diffusers)
from trdq_jax.models.vae import (AutoencoderKL, abstract_vae_params, decode_latents,
                                 encode_latents, init_vae_params, latents_to_uint8)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
DIFFUSERS_DIR = FIXTURES / "tiny_vae"
WEIGHTS = DIFFUSERS_DIR / "diffusion_pytorch_model.safetensors"
LDM_FILE = FIXTURES / "tiny_vae_ldm.safetensors"
RTOL = 1e-4  # max |error| / max |reference|, per output


@pytest.fixture(scope="module")
def io():
    return dict(np.load(FIXTURES / "tiny_vae_io.npz"))


@pytest.fixture(scope="module")
def loaded():
    return load_diffusers_vae(DIFFUSERS_DIR)


@pytest.fixture(scope="module")
def cfg(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def state_dict():
    return load_state_dict(WEIGHTS)


@pytest.fixture(scope="module")
def run(cfg, io):
    """``run(params) -> {"mean", "logvar", "decoded"}``: encode and decode jitted once, params as
    an argument, so each mutation reuses the compiled functions."""
    model = AutoencoderKL(cfg)
    enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))
    dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))

    def outputs(params):
        mean, logvar = enc(params, io["images"])
        return {"mean": np.asarray(mean), "logvar": np.asarray(logvar),
                "decoded": np.asarray(dec(params, io["latents"]))}
    return outputs


def errors(out, io):
    return {k: float(np.abs(out[k] - io[k]).max() / np.abs(io[k]).max()) for k in out}


def assert_parity(out, io, rtol=RTOL):
    errs = errors(out, io)
    assert all(e <= rtol for e in errs.values()), errs


# ----------------------------------------------------------------------------- parity


def test_config_read_from_the_diffusers_directory(cfg):
    assert cfg == VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                            latent_channels=4, scaling_factor=0.3, shift_factor=0.1,
                            sample_size=16)


def test_parity_diffusers_directory(loaded, run, io):
    assert_parity(run(loaded[1]), io)


def test_parity_ldm_file(cfg, loaded, run, io):
    cfg_ldm, params = load_ldm_vae(LDM_FILE, cfg)
    assert cfg_ldm == cfg
    assert_parity(run(params), io)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded[1])


def test_ldm_bare_vae_and_squeezed_attention_convert_the_same(cfg, loaded):
    full = load_state_dict(LDM_FILE)
    bare = {k[len("first_stage_model."):]: v for k, v in full.items()
            if k.startswith("first_stage_model.")}
    bare["loss.logvar"] = np.zeros(())  # training-loss keys of bare VAE files are ignored
    for k in list(bare):
        if ".attn_1." in k and k.endswith("weight") and bare[k].ndim == 4:
            bare[k] = bare[k][:, :, 0, 0]
    params = convert_ldm_vae_state_dict(bare, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded[1])


def test_ldm_key_names():
    cfg = VAEConfig()  # four levels
    assert ldm_key(("decoder", "up_blocks_0", "resnets_2", "conv_shortcut", "kernel"), cfg) == \
        "decoder.up.3.block.2.nin_shortcut.weight"
    assert ldm_key(("decoder", "up_blocks_2", "upsamplers_0", "conv", "bias"), cfg) == \
        "decoder.up.1.upsample.conv.bias"
    assert ldm_key(("encoder", "down_blocks_1", "downsamplers_0", "conv", "kernel"), cfg) == \
        "encoder.down.1.downsample.conv.weight"
    assert ldm_key(("encoder", "mid_block", "resnets_1", "norm2", "scale"), cfg) == \
        "encoder.mid.block_2.norm2.weight"
    assert ldm_key(("encoder", "mid_block", "attentions_0", "to_out_0", "kernel"), cfg) == \
        "encoder.mid.attn_1.proj_out.weight"
    assert ldm_key(("decoder", "conv_norm_out", "scale"), cfg) == "decoder.norm_out.weight"


def test_encode_latents_and_decode_latents_apply_scaling_and_shift(cfg, loaded, io):
    params = loaded[1]
    scaled = encode_latents(params, cfg, io["images"])
    assert scaled.dtype == jnp.float32 and scaled.shape == io["mean"].shape
    np.testing.assert_allclose(scaled, (io["mean"] - 0.1) * 0.3, atol=RTOL * 0.3 * 3)
    sample = encode_latents(params, cfg, io["images"], key=jax.random.PRNGKey(0))
    assert not np.allclose(sample, scaled)
    noise = (np.asarray(sample) / 0.3 + 0.1 - io["mean"]) / np.exp(0.5 * io["logvar"])
    assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2  # a standard normal draw
    images = decode_latents(params, cfg, (io["latents"] - 0.1) * 0.3)
    assert images.dtype == jnp.float32
    assert_parity({"decoded": np.asarray(images)}, io, rtol=1e-4)
    assert np.abs(images).max() > 1  # not clipped
    with pytest.raises(ValueError, match=r"images: expected \[B, H, W, 3\]"):
        encode_latents(params, cfg, io["images"][:, :15])


def test_latents_to_uint8_rounding():
    x = jnp.array([-2.0, -1.0, 0.0, 1.0, 2.0, -1 + 1 / 255, jnp.nan])
    assert latents_to_uint8(x).tolist() == [0, 0, 128, 255, 255, 1, 0]
    assert latents_to_uint8(x).dtype == jnp.uint8


def test_init_and_abstract_params(cfg):
    params = init_vae_params(cfg, jax.random.PRNGKey(0))
    abstract = abstract_vae_params(cfg)
    shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params)
    assert shapes == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), abstract)
    sd_vae = abstract_vae_params(VAEConfig())  # the Stable Diffusion VAE: 83,653,863 weights
    assert sum(a.size for a in jax.tree_util.tree_leaves(sd_vae)) == 83_653_863
    no_quant = abstract_vae_params(VAEConfig(use_quant_conv=False, use_post_quant_conv=False,
                                             block_out_channels=(8,), norm_num_groups=4))
    assert "quant_conv" not in no_quant and "post_quant_conv" not in no_quant


def test_bfloat16_compute_and_params(io):
    cfg16, params = load_diffusers_vae(DIFFUSERS_DIR, dtype="bfloat16", param_dtype="bfloat16")
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(params))
    model = AutoencoderKL(cfg16)
    mean, logvar = model.apply({"params": params}, io["images"], method=AutoencoderKL.encode)
    assert mean.dtype == jnp.bfloat16
    out = {"mean": np.asarray(mean, np.float32), "logvar": np.asarray(logvar, np.float32)}
    assert_parity(out, io, rtol=5e-2)  # bfloat16 keeps ~3 significant digits


# ----------------------------------------------------------------------------- round trips


def test_to_diffusers_state_dict_round_trip(cfg, loaded, state_dict):
    out = to_diffusers_state_dict(loaded[1], cfg)
    assert set(out) == set(state_dict)
    for k, v in out.items():
        assert v.dtype == np.float32 and v.flags.c_contiguous
        np.testing.assert_array_equal(v, state_dict[k])
    back = convert_diffusers_vae_state_dict(out, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, loaded[1])


def test_save_diffusers_vae_round_trip_and_refuses_non_empty_dir(tmp_path, cfg, loaded, run, io):
    target = save_diffusers_vae(tmp_path / "vae", loaded[1], cfg)
    cfg2, params = load_diffusers_vae(target)
    assert cfg2 == cfg
    assert json.loads((target / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded[1])
    with pytest.raises(FileExistsError, match="vae"):
        save_diffusers_vae(target, loaded[1], cfg)


def test_legacy_attention_names_convert_the_same(cfg, loaded, state_dict):
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in state_dict.items():
        for new, old in legacy_names.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[k] = v
    assert any(".query." in k for k in legacy) and not any(".to_q." in k for k in legacy)
    params = convert_diffusers_vae_state_dict(legacy, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded[1])
    both = dict(state_dict)
    both["encoder.mid_block.attentions.0.query.weight"] = \
        state_dict["encoder.mid_block.attentions.0.to_q.weight"]
    with pytest.raises(ConversionError, match=r"two namings.*encoder\.mid_block\.attentions\.0"):
        convert_diffusers_vae_state_dict(both, cfg)


def test_fp16_weights_file_is_accepted(tmp_path, cfg, state_dict, run, io):
    target = tmp_path / "vae16"
    target.mkdir()
    shutil.copy(DIFFUSERS_DIR / "config.json", target / "config.json")
    save_file({k: v.astype(np.float16) for k, v in state_dict.items()},
              str(target / "diffusion_pytorch_model.fp16.safetensors"))
    cfg16, params = load_diffusers_vae(target)
    assert cfg16 == cfg
    assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(params))
    assert_parity(run(params), io, rtol=2e-2)  # float16 weight rounding only


# ----------------------------------------------------------------------------- mutations


def _transposes(value: np.ndarray) -> dict[str, np.ndarray]:
    """The transpositions that change an array's shape or values (none for 1-D)."""
    out = {}
    if value.ndim == 2:
        out["T"] = value.T
    elif value.ndim == 4:
        out["swap out/in"] = value.transpose(1, 0, 2, 3)
        if value.shape[2] > 1:
            out["swap kh/kw"] = value.transpose(0, 1, 3, 2)
    return {k: np.ascontiguousarray(v) for k, v in out.items()
            if v.shape != value.shape or not np.array_equal(v, value)}


def _invisible_swap(a: str, b: str) -> bool:
    """Swaps that leave the function unchanged, so that no test can see them:

    * a resnet's ``conv2.bias`` with its own ``conv_shortcut.bias``: only their sum reaches the
      output (``shortcut(x) + b_s + conv2(h) + b_2``);
    * the attention's ``to_k.bias`` with another ``to_k.bias``: a key bias adds ``q . b_k`` to
      every logit of a query alike, which the softmax cancels.
    """
    pair = sorted([a, b])
    if pair[0].endswith(".conv2.bias") and pair[1].endswith(".conv_shortcut.bias"):
        return pair[0][:-len("conv2.bias")] == pair[1][:-len("conv_shortcut.bias")]
    return a.endswith(".to_k.bias") and b.endswith(".to_k.bias")


def test_invisible_swaps_are_indeed_invisible(cfg, state_dict, run, io):
    """The exclusions of the mutation test are exact symmetries of the architecture."""
    key = "decoder.up_blocks.1.resnets.0."
    swapped = {**state_dict, key + "conv2.bias": state_dict[key + "conv_shortcut.bias"],
               key + "conv_shortcut.bias": state_dict[key + "conv2.bias"]}
    assert_parity(run(convert_diffusers_vae_state_dict(swapped, cfg)), io)
    k_bias = "encoder.mid_block.attentions.0.to_k.bias"
    changed = {**state_dict, k_bias: state_dict[k_bias] + 5.0}
    assert_parity(run(convert_diffusers_vae_state_dict(changed, cfg)), io)


def test_every_mutation_is_refused_or_breaks_parity(cfg, state_dict, run, io):
    """For every tensor: drop it; transpose it (each way that changes it); swap it with another
    tensor of the same shape (one with no such partner has its axis 0 reversed instead). Each mutation must be refused by the converter or move some
    output beyond the parity tolerance."""
    keys = sorted(state_dict)
    by_shape = defaultdict(list)
    for k in keys:
        by_shape[state_dict[k].shape].append(k)
    outcomes = defaultdict(lambda: defaultdict(int))
    undetected = []

    def check(kind, label, mutated, must_name=None):
        try:
            params = convert_diffusers_vae_state_dict(mutated, cfg)
        except ConversionError as e:
            if must_name is not None:
                assert must_name in str(e), (label, str(e))
            outcomes[kind]["refused"] += 1
            return
        errs = errors(run(params), io)
        if max(errs.values()) > RTOL:
            outcomes[kind]["parity broken"] += 1
        else:
            outcomes[kind]["UNDETECTED"] += 1
            undetected.append(f"{label}: {errs}")

    for key in keys:
        dropped = {k: v for k, v in state_dict.items() if k != key}
        check("drop", f"drop {key}", dropped, must_name=key)
        for how, value in _transposes(state_dict[key]).items():
            check("transpose", f"transpose ({how}) {key}", {**state_dict, key: value})
        group = by_shape[state_dict[key].shape]
        if len(group) < 2:  # no partner: reverse its output channels instead
            outcomes["swap"]["no same-shaped partner"] += 1
            check("flip", f"flip axis 0 of {key}",
                  {**state_dict, key: np.ascontiguousarray(state_dict[key][::-1])})
            continue
        start = group.index(key)
        candidates = [group[(start + i) % len(group)] for i in range(1, len(group))]
        partner = next((c for c in candidates if not _invisible_swap(key, c)), None)
        if partner is None:
            outcomes["swap"]["only invisible partners"] += 1
            continue
        swapped = {**state_dict, key: state_dict[partner], partner: state_dict[key]}
        check("swap", f"swap {key} <-> {partner}", swapped)

    print({kind: dict(v) for kind, v in outcomes.items()})
    assert not undetected, "\n".join(undetected)
    assert outcomes["drop"]["refused"] == len(keys)
    assert outcomes["transpose"]["parity broken"] > 0 and outcomes["swap"]["parity broken"] > 0


def test_non_finite_tensor_is_named(tmp_path, cfg, state_dict):
    bad = dict(state_dict)
    key = "decoder.up_blocks.1.resnets.0.conv1.weight"
    bad[key] = bad[key].copy()
    bad[key][0, 0, 0, 0] = np.nan
    bad["encoder.conv_in.bias"] = np.full_like(bad["encoder.conv_in.bias"], np.inf)
    with pytest.raises(ConversionError) as e:
        convert_diffusers_vae_state_dict(bad, cfg)
    assert f"{key} (1 NaN, 0 Inf)" in str(e.value)
    assert "encoder.conv_in.bias (0 NaN, 8 Inf)" in str(e.value)
    f16 = {k: v.astype(np.float16) if k == "encoder.conv_in.bias" else v
           for k, v in state_dict.items()}
    f16["encoder.conv_in.bias"] = np.full((8,), 1e5, np.float32)
    with pytest.raises(ConversionError, match="after the cast to param_dtype=float16"):
        convert_diffusers_vae_state_dict(f16, VAEConfig(**{**cfg.__dict__,
                                                           "param_dtype": "float16"}))


def test_all_problems_reported_together(cfg, state_dict):
    bad = dict(state_dict)
    del bad["decoder.conv_out.bias"]
    bad["decoder.extra.weight"] = np.ones(3, np.float32)
    bad["encoder.conv_in.weight"] = bad["encoder.conv_in.weight"][:, :2]
    with pytest.raises(ConversionError) as e:
        convert_diffusers_vae_state_dict(bad, cfg)
    msg = str(e.value)
    assert "unknown keys (1): decoder.extra.weight" in msg
    assert "missing keys (1): decoder.conv_out.bias" in msg
    assert "encoder.conv_in.weight: expected (8, 3, 3, 3), got (8, 2, 3, 3)" in msg


def test_quant_conv_keys_unknown_without_use_quant_conv(cfg, state_dict):
    no_quant = VAEConfig(**{**cfg.__dict__, "use_quant_conv": False})
    with pytest.raises(ConversionError, match=r"unknown keys \(2\): quant_conv\.bias, "
                                              r"quant_conv\.weight"):
        convert_diffusers_vae_state_dict(state_dict, no_quant)


# ----------------------------------------------------------------------------- bad files


def _copy_fixture(tmp_path, name="vae"):
    target = tmp_path / name
    shutil.copytree(DIFFUSERS_DIR, target)
    return target


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    for k, v in list(config.items()):
        if v is ...:
            del config[k]
    path.write_text(json.dumps(config))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such directory '.*nope'"):
        load_diffusers_vae(tmp_path / "nope")


def test_missing_config_json(tmp_path):
    target = _copy_fixture(tmp_path)
    (target / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"'.*vae/config\.json': missing"):
        load_diffusers_vae(target)


def test_config_json_not_json(tmp_path):
    target = _copy_fixture(tmp_path)
    (target / "config.json").write_text("{'_class_name': 'AutoencoderKL',")
    with pytest.raises(ConversionError, match=r"'.*vae/config\.json': not JSON") as e:
        load_diffusers_vae(target)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("changes, message", [
    (dict(_class_name="UNet2DConditionModel"),
     r"foreign config: _class_name 'UNet2DConditionModel', expected 'AutoencoderKL'"),
    (dict(_class_name=...), r"foreign config: no _class_name"),
    (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
     r"down_block_types: 'AttnDownEncoderBlock2D' not supported"),
    (dict(up_block_types=["UpDecoderBlock2D"]), r"up_block_types: expected one per"),
    (dict(act_fn="gelu"), r"act_fn 'gelu' is not supported"),
    (dict(latents_mean=[0.1, 0.2, 0.3, 0.4]), r"latents_mean is set .* not supported"),
    (dict(use_quant_conv="yes"), r"use_quant_conv: expected true or false"),
    (dict(norm_num_groups=5), r"VAEConfig\.block_out_channels: expected multiples of"),
    (dict(temporal_layers=2), r"unsupported AutoencoderKL config keys temporal_layers"),
])
def test_refused_configs_name_the_file(tmp_path, changes, message):
    target = _copy_fixture(tmp_path)
    _edit_config(target, **changes)
    with pytest.raises(ConversionError, match=r"^'.*vae/config\.json': " + message) as e:
        load_diffusers_vae(target)
    assert "\n" not in str(e.value)


def test_config_defaults_and_null_shift_factor():
    config = json.loads((DIFFUSERS_DIR / "config.json").read_text())
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        del config[key]
    config["shift_factor"] = None
    cfg = vae_config_from_diffusers(config)
    assert cfg.use_quant_conv and cfg.use_post_quant_conv and cfg.mid_block_add_attention
    assert cfg.shift_factor == 0.0
    assert vae_config_from_diffusers(diffusers_config(cfg)) == cfg
    assert vae_config_from_diffusers(config, param_dtype="bfloat16").param_dtype == "bfloat16"


def test_config_weights_mismatch(tmp_path):
    target = _copy_fixture(tmp_path)
    _edit_config(target, latent_channels=8)
    with pytest.raises(ConversionError) as e:
        load_diffusers_vae(target)
    msg = str(e.value)
    assert re.match(r"^'.*diffusion_pytorch_model\.safetensors': state dict does not match", msg)
    assert "decoder.conv_in.weight: expected (16, 8, 3, 3), got (16, 4, 3, 3)" in msg
    assert "quant_conv.weight: expected (16, 16, 1, 1), got (8, 8, 1, 1)" in msg


def test_missing_weights_file(tmp_path):
    target = _copy_fixture(tmp_path)
    (target / "diffusion_pytorch_model.safetensors").unlink()
    (target / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileNotFoundError, match=r"'.*vae': no weights file, expected "
                                                r"diffusion_pytorch_model\.safetensors or .*"
                                                r"found diffusion_pytorch_model\.bin"):
        load_diffusers_vae(target)


def test_pickle_under_safetensors_name_is_refused(tmp_path):
    target = _copy_fixture(tmp_path)
    weights = target / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(pickle.dumps({"encoder.conv_in.weight": [1.0]}, protocol=4))
    with pytest.raises(ConversionError, match=r"is a pickle, refused"):
        load_diffusers_vae(target)


def test_ldm_file_missing_vae_keys(tmp_path, cfg):
    full = load_state_dict(LDM_FILE)
    unet_only = {k: v for k, v in full.items() if not k.startswith("first_stage_model.")}
    path = tmp_path / "unet.safetensors"
    save_file(unet_only, str(path))
    with pytest.raises(ConversionError, match=r"^'.*unet\.safetensors': state dict does not "
                                              r"match .*\n.*unknown keys \(1\)"):
        load_ldm_vae(path, cfg)
