"""Official DiT checkpoint conversion: round trips through real file formats and error reports."""
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from trdq_jax.config import DiTConfig
from trdq_jax.models import build_model
from trdq_jax.models.convert import (ConversionError, convert_dit_state_dict, infer_dit_config,
                                     load_official_dit, load_state_dict, to_official_state_dict)
from tests.models import official_dit

CFG = DiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                num_classes=7, learn_sigma=True)
DIMS = dict(depth=2, hidden=32, in_ch=4, patch=2, num_classes=7, mlp_hidden=128, out_ch=8,
            n_tokens=16)


@pytest.fixture
def state_dict():
    return official_dit.random_state_dict(np.random.default_rng(0), **DIMS)


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_file_round_trip_consumes_every_key(tmp_path, state_dict, fmt):
    path = tmp_path / f"dit.{fmt}"
    if fmt == "safetensors":
        from safetensors.numpy import save_file
        save_file(state_dict, str(path))
    else:
        np.savez(path, **state_dict)
    cfg, params = load_official_dit(path, CFG)
    back = to_official_state_dict(params, cfg)
    assert set(back) == set(state_dict)
    for k, v in state_dict.items():
        np.testing.assert_allclose(back[k], v, rtol=0, atol=1e-6 if k == "pos_embed" else 0,
                                   err_msg=k)


def test_exported_state_dict_saves_to_safetensors_unscrambled(tmp_path):
    """``to_official_state_dict`` of freshly initialized (C-order) params -> ``save_file`` ->
    load: the same tensors. (safetensors writes a transposed numpy view's memory as it lies;
    the export must be contiguous.)"""
    from trdq_jax.models import init_params
    params = init_params(CFG, jax.random.key(0))
    exported = to_official_state_dict(params, CFG)
    assert all(v.flags["C_CONTIGUOUS"] for v in exported.values())
    save_file(exported, str(tmp_path / "export.safetensors"))
    back = load_state_dict(tmp_path / "export.safetensors")
    for k, v in exported.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_pt_file_through_torch_if_installed(tmp_path, state_dict):
    torch = pytest.importorskip("torch")
    path = tmp_path / "DiT-small.pt"
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
    _, params = load_official_dit(path, CFG)
    np.testing.assert_array_equal(params["blocks_1"]["mlp"]["fc1"]["kernel"],
                                  state_dict["blocks.1.mlp.fc1.weight"].T)


def test_layouts_are_transposed_as_pytorch_defines(state_dict):
    params = convert_dit_state_dict(state_dict, CFG)
    w = state_dict["x_embedder.proj.weight"]  # [out, in, kh, kw]
    np.testing.assert_array_equal(params["x_embedder"]["proj"]["kernel"][1, 0, 2, 5], w[5, 2, 1, 0])
    q = state_dict["blocks.0.attn.qkv.weight"]  # [out, in]
    np.testing.assert_array_equal(params["blocks_0"]["attn"]["qkv"]["kernel"][3, 17], q[17, 3])
    np.testing.assert_array_equal(params["y_embedder"]["embedding_table"]["embedding"],
                                  state_dict["y_embedder.embedding_table.weight"])


def test_converted_model_matches_numpy_reference(state_dict):
    params = convert_dit_state_dict(state_dict, CFG)
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    t, y = np.array([3, 998]), np.array([6, 7])
    got = build_model(CFG).apply({"params": params}, x, t, y)
    want = official_dit.forward(state_dict, x.transpose(0, 3, 1, 2), t, y, 2, 2, 8)
    np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), rtol=2e-4, atol=2e-4)


def test_infer_config_from_shapes(state_dict):
    cfg = infer_dit_config(state_dict, num_heads=2)
    assert cfg == CFG


def test_unknown_missing_and_misshaped_keys_all_reported(state_dict):
    sd = dict(state_dict)
    sd["blocks.2.attn.qkv.weight"] = np.zeros((96, 32), np.float32)
    sd["ema_decay"] = np.zeros((), np.float32)
    del sd["blocks.1.mlp.fc2.bias"]
    del sd["pos_embed"]
    sd["blocks.0.attn.proj.weight"] = np.zeros((32, 31), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_dit_state_dict(sd, CFG)
    msg = str(e.value)
    assert "unknown keys (2): blocks.2.attn.qkv.weight, ema_decay" in msg
    assert "missing keys (2): blocks.1.mlp.fc2.bias, pos_embed" in msg
    assert "blocks.0.attn.proj.weight: expected (32, 32), got (32, 31)" in msg


def test_learned_pos_embed_is_rejected(state_dict):
    sd = dict(state_dict)
    sd["pos_embed"] = sd["pos_embed"] + 0.1
    with pytest.raises(ConversionError, match="pos_embed: values differ"):
        convert_dit_state_dict(sd, CFG)


def test_wrong_config_for_checkpoint(state_dict):
    other = DiTConfig(**{**CFG.__dict__, "num_classes": 10})
    with pytest.raises(ConversionError, match="y_embedder.embedding_table.weight: expected"):
        convert_dit_state_dict(state_dict, other)


def test_bad_file_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        load_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"path: expected a \.safetensors"):
        load_state_dict(tmp_path / "w.h5")


# ----------------------------------------------------------------------------- dtypes and values

HALF = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _leaves(params):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_convert_like_the_float32_one(tmp_path, state_dict, dtype):
    """``model.half()`` of an official checkpoint: every tensor, pos_embed included, rounded."""
    half = {k: v.astype(HALF[dtype]) for k, v in state_dict.items()}
    path = tmp_path / "dit.safetensors"
    save_file(half, str(path))
    loaded = load_state_dict(path)
    assert {v.dtype for v in loaded.values()} == {HALF[dtype]}
    exact = official_dit.pos_embed(32, 4)[None]
    # the stored table is off by more than float32's absolute tolerance: rounding, not learning
    assert np.abs(loaded["pos_embed"].astype(np.float64) - exact).max() > 1e-4
    _, params = load_official_dit(path, CFG)
    want = _leaves(convert_dit_state_dict(state_dict, CFG))
    got = _leaves(params)
    assert set(got) == set(want)
    for k, w in want.items():
        assert got[k].dtype == np.float32, k
        np.testing.assert_array_equal(got[k], w.astype(HALF[dtype]).astype(np.float32), err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_learned_pos_embed_is_refused_in_every_dtype(state_dict, dtype):
    np_dtype = HALF.get(dtype, np.dtype(np.float32))
    rng = np.random.default_rng(3)
    sd = {k: v.astype(np_dtype) for k, v in state_dict.items()}
    learned = state_dict["pos_embed"] + 0.02 * rng.standard_normal(state_dict["pos_embed"].shape)
    sd["pos_embed"] = learned.astype(np_dtype)
    with pytest.raises(ConversionError, match=rf"pos_embed: values differ from the fixed 2-D "
                                              rf"sin-cos embedding by up to .*beyond {dtype}"):
        convert_dit_state_dict(sd, CFG)


def test_float32_pos_embed_keeps_the_strict_tolerance(state_dict):
    """float16-level errors are refused when the table is stored as float32."""
    sd = dict(state_dict)
    sd["pos_embed"] = state_dict["pos_embed"].astype(np.float16).astype(np.float32)
    assert np.abs(sd["pos_embed"] - state_dict["pos_embed"]).max() > 1e-4
    with pytest.raises(ConversionError, match="pos_embed: values differ"):
        convert_dit_state_dict(sd, CFG)
    sd["pos_embed"] = state_dict["pos_embed"] + np.float32(5e-5)  # within atol=1e-4
    convert_dit_state_dict(sd, CFG)


def test_non_finite_weights_are_refused_naming_the_keys(state_dict):
    sd = dict(state_dict)
    qkv = sd["blocks.0.attn.qkv.weight"].copy()
    qkv[3, 5], qkv[0, 1] = np.nan, np.nan
    bias = sd["final_layer.linear.bias"].copy()
    bias[0] = -np.inf
    pos = sd["pos_embed"].copy()
    pos[0, 2, 3] = np.inf
    sd.update({"blocks.0.attn.qkv.weight": qkv, "final_layer.linear.bias": bias, "pos_embed": pos})
    with pytest.raises(ConversionError) as e:
        convert_dit_state_dict(sd, CFG)
    msg = str(e.value)
    assert "non-finite keys (3): " in msg
    for part in ("blocks.0.attn.qkv.weight (2 NaN, 0 Inf)",
                 "final_layer.linear.bias (0 NaN, 1 Inf)", "pos_embed (0 NaN, 1 Inf)"):
        assert part in msg, msg


def test_weights_that_overflow_param_dtype_are_refused(state_dict):
    sd = dict(state_dict)
    sd["blocks.1.mlp.fc2.bias"] = np.full((32,), 1e6, np.float32)  # float16 max is 65504
    cfg16 = DiTConfig(**{**CFG.__dict__, "param_dtype": "float16"})
    with pytest.raises(ConversionError, match=r"blocks\.1\.mlp\.fc2\.bias \(0 NaN, 32 Inf after "
                                              r"the cast to param_dtype=float16"):
        convert_dit_state_dict(sd, cfg16)


def test_non_official_mlp_width_is_inferred_exactly():
    """hidden 112 with a 61-wide MLP: 112 * (61 / 112) truncates to 60 under int()."""
    dims = dict(depth=1, hidden=112, in_ch=4, patch=2, num_classes=3, mlp_hidden=61, out_ch=4,
                n_tokens=16)
    sd = official_dit.random_state_dict(np.random.default_rng(0), **dims)
    cfg = infer_dit_config(sd, num_heads=2)
    assert cfg.mlp_hidden_size == 61
    params = convert_dit_state_dict(sd, cfg)
    np.testing.assert_array_equal(params["blocks_0"]["mlp"]["fc1"]["kernel"],
                                  sd["blocks.0.mlp.fc1.weight"].T)


def test_infer_refuses_a_non_square_token_grid(state_dict):
    sd = dict(state_dict)
    sd["pos_embed"] = np.zeros((1, 15, 32), np.float32)
    with pytest.raises(ConversionError, match="pos_embed has 15 tokens, expected a square"):
        infer_dit_config(sd, num_heads=2)


# ----------------------------------------------------------------------------- unreadable files


def _no_raw_traceback(e):
    assert e.value.__cause__ is None and e.value.__suppress_context__


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt", ".bin"])
def test_empty_file_is_named_and_explained(tmp_path, suffix):
    path = tmp_path / f"dit{suffix}"
    path.write_bytes(b"")
    with pytest.raises(ConversionError, match=r"^path: '.*dit\.\w+' is empty \(0 bytes\)"):
        load_state_dict(path)


@pytest.mark.parametrize("fmt, damage, cause", [
    ("safetensors", "truncated", r"is truncated: holds [\d,]+ of [\d,]+ bytes"),
    ("safetensors", "header_only", r"is truncated: holds 20 of [\d,]+ bytes"),
    ("safetensors", "garbage", r"is not a safetensors file: it holds text \('<html>404"),
    ("npz", "truncated", r"is truncated: the zip archive stops after [\d,]+ bytes"),
    ("npz", "garbage", r"is not a \.npz file: not a zip archive, it holds text"),
    ("npz", "flipped_byte", r"is a damaged \.npz file \(.+\); download or save it again"),
])
def test_corrupt_files_raise_a_conversion_error_naming_the_path(tmp_path, state_dict, fmt, damage,
                                                                cause):
    path = tmp_path / f"dit.{fmt}"
    if fmt == "safetensors":
        save_file(state_dict, str(path))
    else:
        np.savez(path, **state_dict)
    raw = path.read_bytes()
    damaged = {"truncated": raw[:-len(raw) // 3], "header_only": raw[:20],
               "garbage": b"<html>404 not found</html>",
               "flipped_byte": raw[:len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0xFF])
               + raw[len(raw) // 2 + 1:]}[damage]
    path.write_bytes(damaged)
    with pytest.raises(ConversionError, match=rf"^path: '.*dit\.{fmt}' {cause}") as e:
        load_state_dict(path)
    _no_raw_traceback(e)


def test_npz_with_object_arrays_is_refused_without_unpickling(tmp_path, state_dict):
    path = tmp_path / "dit.npz"
    np.savez(path, **state_dict, args=np.array([{"lr": 1e-4}], dtype=object))
    with pytest.raises(ConversionError, match=r"^path: '.*dit\.npz': array 'args' is an object "
                                              r"array \(pickled Python objects\)") as e:
        load_state_dict(path)
    _no_raw_traceback(e)


def test_npz_bfloat16_arrays_are_refused_with_a_hint(tmp_path, state_dict):
    path = tmp_path / "dit.npz"
    np.savez(path, **{k: v.astype(ml_dtypes.bfloat16) for k, v in state_dict.items()})
    with pytest.raises(ConversionError, match=r"expected numeric arrays, got .*\(\|V2\).*\.npz "
                                              r"stores bfloat16 as raw 2-byte voids"):
        load_state_dict(path)


def test_npy_renamed_to_npz_is_explained(tmp_path):
    path = tmp_path / "dit.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3, np.float32))
    with pytest.raises(ConversionError, match=r"holds a single \.npy array, not a \.npz archive"):
        load_state_dict(path)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_files_without_torch_say_what_to_install(tmp_path, monkeypatch, suffix):
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" fails, installed or not
    path = tmp_path / f"DiT-XL-2-256x256{suffix}"
    path.write_bytes(b"PK\x03\x04 not really a torch file")
    with pytest.raises(ImportError, match=rf"^path: reading \{suffix} checkpoints needs PyTorch: "
                                          r"pip install 'trdq_jax\[torch\]'; or convert the file "
                                          r"to \.safetensors"):
        load_state_dict(path)
