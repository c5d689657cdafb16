"""The original-layout PixArt converter (``convert_pixart_original``) against the diffusers one.

The original-layout state dict is built here from the diffusers fixture
(``fixtures/tiny_pixart/{alpha,sigma}``) by a renaming written from the original repository's
module names (``diffusion/model/nets/PixArt*.py``; the direction of PixArt-sigma's
``tools/convert_pixart_to_diffusers.py``), not from the converter's table: diffusers' separate
q/k/v and k/v projections are fused back, the null caption and the sin-cos ``pos_embed`` buffer
are added. The same weights must give bit-identical Flax params through both converters.
"""
from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from trdq_jax.models.convert import ConversionError, load_state_dict
from trdq_jax.models.convert_pixart import load_diffusers_pixart
from trdq_jax.models.convert_pixart_original import (convert_original_pixart_state_dict,
                                                     infer_original_pixart_config,
                                                     load_original_pixart)

ROOT = pathlib.Path(__file__).parent / "fixtures" / "tiny_pixart"
WEIGHTS = "diffusion_pytorch_model.safetensors"
VARIANTS = ("alpha", "sigma")
SCALE = {"alpha": 1.0, "sigma": 0.5}  # the fixtures' interpolation scales


def sincos_table(hidden: int, grid: int, scale: float) -> np.ndarray:
    """The original ``get_2d_sincos_pos_embed`` at base size ``grid``: ``[1, grid**2, hidden]``
    float32; first half of the channels from the column (w) coordinate, second from the row."""
    pos = np.arange(grid, dtype=np.float64) / scale
    w, h = np.meshgrid(pos, pos)
    omega = 1.0 / 10000 ** (np.arange(hidden // 4, dtype=np.float64) / (hidden / 4))

    def one_d(p):
        out = np.outer(p.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    return np.concatenate([one_d(w), one_d(h)], axis=1)[None].astype(np.float32)


def original_from_diffusers(sd: dict, depth: int) -> dict:
    """diffusers PixArtTransformer2DModel names -> the original PixArt module names."""
    renames = {"pos_embed.proj": "x_embedder.proj",
               "caption_projection.linear_1": "y_embedder.y_proj.fc1",
               "caption_projection.linear_2": "y_embedder.y_proj.fc2",
               "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
               "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
               "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
               "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
               "adaln_single.linear": "t_block.1",
               "proj_out": "final_layer.linear"}
    fused = {}
    for i in range(depth):
        t, b = f"transformer_blocks.{i}", f"blocks.{i}"
        renames.update({f"{t}.attn1.to_out.0": f"{b}.attn.proj",
                        f"{t}.attn2.to_q": f"{b}.cross_attn.q_linear",
                        f"{t}.attn2.to_out.0": f"{b}.cross_attn.proj",
                        f"{t}.ff.net.0.proj": f"{b}.mlp.fc1",
                        f"{t}.ff.net.2": f"{b}.mlp.fc2"})
        fused[f"{b}.attn.qkv"] = [f"{t}.attn1.to_{c}" for c in "qkv"]
        fused[f"{b}.cross_attn.kv_linear"] = [f"{t}.attn2.to_{c}" for c in "kv"]
    out, used = {}, set()
    for key, value in sd.items():
        stem, _, leaf = key.rpartition(".")
        if stem in renames:
            out[f"{renames[stem]}.{leaf}"] = value
            used.add(key)
        elif key == "scale_shift_table":
            out["final_layer.scale_shift_table"] = value
            used.add(key)
        elif key.startswith("transformer_blocks.") and leaf == "scale_shift_table":
            out[f"blocks.{key.split('.')[1]}.scale_shift_table"] = value
            used.add(key)
    for name, parts in fused.items():
        for leaf in ("weight", "bias"):
            out[f"{name}.{leaf}"] = np.concatenate([sd[f"{p}.{leaf}"] for p in parts], axis=0)
            used.update(f"{p}.{leaf}" for p in parts)
    assert used == set(sd), sorted(set(sd) - used)
    return out


@pytest.fixture(scope="module")
def data():
    """Per variant: the diffusers-converted ``(cfg, params)`` and the original state dict."""
    out = {}
    rng = np.random.default_rng(0)
    for v in VARIANTS:
        cfg, params = load_diffusers_pixart(ROOT / v, max_tokens=6)
        sd = original_from_diffusers(load_state_dict(ROOT / v / WEIGHTS), cfg.depth)
        sd["y_embedder.y_embedding"] = rng.standard_normal(
            (cfg.max_tokens, cfg.caption_channels)).astype(np.float32)
        sd["pos_embed"] = sincos_table(cfg.hidden_size, cfg.input_size // cfg.patch_size,
                                       SCALE[v])
        out[v] = cfg, params, sd
    return out


def flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_identical(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        assert fa[k].tobytes() == fb[k].tobytes(), k


@pytest.mark.parametrize("variant", VARIANTS)
def test_identical_params_and_inferred_config(variant, data):
    cfg, params, sd = data[variant]
    # pos_embed gives input_size and the scale; the head count is not in the weights
    assert infer_original_pixart_config(sd, num_heads=2) == cfg
    got, y_embedding = convert_original_pixart_state_dict(sd, cfg)
    assert_identical(got, params)
    np.testing.assert_array_equal(y_embedding, sd["y_embedder.y_embedding"])
    assert y_embedding.dtype == np.float32
    # pos_embed is an optional buffer: without it the same params come out
    no_pos = {k: x for k, x in sd.items() if k != "pos_embed"}
    assert_identical(convert_original_pixart_state_dict(no_pos, cfg)[0], params)


def test_file_round_trip_and_bfloat16(tmp_path, data):
    cfg, params, sd = data["alpha"]
    save_file(sd, str(tmp_path / "PixArt-tiny.safetensors"))
    got_cfg, got, y_embedding = load_original_pixart(tmp_path / "PixArt-tiny.safetensors",
                                                    num_heads=2)
    assert got_cfg == cfg
    assert_identical(got, params)
    cfg16, p16, _ = load_original_pixart(tmp_path / "PixArt-tiny.safetensors",
                                         num_heads=2, param_dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16"
    assert {x.dtype.name for x in flat(p16).values()} == {"bfloat16"}


def test_torch_files(tmp_path, data):
    sd = data["alpha"][2]
    path = tmp_path / "PixArt-tiny.pth"
    try:
        import torch
    except ImportError:
        path.write_bytes(b"PK\x03\x04 not read")
        with pytest.raises(ImportError, match="needs PyTorch"):
            load_original_pixart(path)
        return
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, str(path))
    cfg, params, _ = load_original_pixart(path, num_heads=2)
    assert_identical(params, data["alpha"][1])


def test_micro_condition_embedders_are_not_interchangeable(data):
    """ar_embedder -> ar_embedder (diffusers' own script fills its aspect-ratio embedder from
    csize_embedder: that must give other params, which the identity test above refuses)."""
    cfg, params, sd = data["alpha"]
    swapped = dict(sd)
    for leaf in ("mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"):
        swapped[f"ar_embedder.{leaf}"] = sd[f"csize_embedder.{leaf}"]
    got = flat(convert_original_pixart_state_dict(swapped, cfg)[0])
    ref = flat(params)
    changed = {k for k in ref if got[k].tobytes() != ref[k].tobytes()}
    assert changed and all("ar_embedder" in k for k in changed)


def test_every_drop_and_transpose_is_refused_or_changes_params(data):
    cfg, params, sd = data["alpha"]
    ref = flat(params)
    survived = []
    for key, value in sd.items():
        variants = {"drop": {k: x for k, x in sd.items() if k != key}}
        if value.ndim == 2:
            variants["transpose"] = {**sd, key: np.ascontiguousarray(value.T)}
        elif value.ndim == 4:
            variants["transpose"] = {**sd, key: np.ascontiguousarray(value.swapaxes(0, 1))}
            variants["swap kernel axes"] = {**sd, key: np.ascontiguousarray(
                value.swapaxes(2, 3))}
        elif value.ndim == 3:
            variants["transpose"] = {**sd, key: np.ascontiguousarray(value.swapaxes(1, 2))}
        for name, mutated in variants.items():
            try:
                got = convert_original_pixart_state_dict(mutated, cfg)
            except ConversionError as e:
                assert key in str(e), (key, name, str(e))
                continue
            if key == "pos_embed" and name == "drop":
                continue  # optional buffer
            same = all(flat(got[0])[k].tobytes() == ref[k].tobytes() for k in ref) and \
                np.array_equal(got[1], sd["y_embedder.y_embedding"])
            if same:
                survived.append(f"{name} {key}")
    assert not survived, survived


def test_all_problems_reported_together(data):
    cfg, _, sd = data["alpha"]
    bad = dict(sd)
    bad["blocks.0.attn.qkv.weight"] = np.full_like(sd["blocks.0.attn.qkv.weight"], np.nan)
    bad["final_layer.linear.bias"] = sd["final_layer.linear.bias"][:-1]
    bad["blocks.0.attn.q_norm.weight"] = np.ones(24, np.float32)
    del bad["t_block.1.bias"]
    bad["pos_embed"] = sincos_table(cfg.hidden_size, 4, 2.0)  # another interpolation scale
    with pytest.raises(ConversionError) as e:
        convert_original_pixart_state_dict(bad, cfg, where="'x.pth'")
    msg = str(e.value)
    assert msg.startswith("'x.pth': ")
    for part in ("unknown keys (1): blocks.0.attn.q_norm.weight",
                 "missing keys (1): t_block.1.bias",
                 "final_layer.linear.bias: expected (32,), got (31,)",
                 "blocks.0.attn.qkv.weight (1728 NaN, 0 Inf)",
                 "pos_embed: not the 2-D sin-cos table"):
        assert part in msg, (part, msg)


def test_nan_in_the_null_caption_is_named(data):
    cfg, _, sd = data["sigma"]
    y = sd["y_embedder.y_embedding"].copy()
    y[0, 0] = np.inf
    with pytest.raises(ConversionError, match=r"y_embedder\.y_embedding \(0 NaN, 1 Inf\)"):
        convert_original_pixart_state_dict({**sd, "y_embedder.y_embedding": y}, cfg)


def test_config_inference_without_pos_embed(data):
    cfg, _, sd = data["sigma"]
    no_pos = {k: x for k, x in sd.items() if k != "pos_embed"}
    with pytest.raises(ConversionError, match="num_heads cannot be read.*hidden 24"):
        infer_original_pixart_config(sd)
    with pytest.raises(ConversionError, match="input_size"):
        infer_original_pixart_config(no_pos, num_heads=2)
    with pytest.raises(ConversionError, match="interpolation_scale"):
        infer_original_pixart_config(no_pos, num_heads=2, input_size=8)
    assert infer_original_pixart_config(no_pos, num_heads=2, input_size=8,
                                        interpolation_scale=0.5) == cfg
    with pytest.raises(ConversionError, match="not an original PixArt state dict"):
        infer_original_pixart_config({"pos_embed.proj.weight": np.zeros((24, 4, 2, 2))})
