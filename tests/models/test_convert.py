"""Official DiT checkpoint conversion: round trips through real file formats and error reports."""
import dataclasses
import json
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from trdq_jax.config import DiTConfig
from trdq_jax.models import build_model
from trdq_jax.models.convert import (ConversionError, convert_dit_state_dict, infer_dit_config,
                                     load_official_dit, load_state_dict, pos_embed_report,
                                     to_official_state_dict)
from tests.models import official_dit

CFG = DiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                num_classes=7, learn_sigma=True)
DIMS = dict(depth=2, hidden=32, in_ch=4, patch=2, num_classes=7, mlp_hidden=128, out_ch=8,
            n_tokens=16)


STORED = dataclasses.replace(CFG, pos_embed="stored")


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
    """An official checkpoint converts keeping its own pos_embed table."""
    cfg = infer_dit_config(state_dict, num_heads=2)
    assert cfg == STORED
    assert infer_dit_config(state_dict, num_heads=2, pos_embed="sincos") == CFG


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


# ----------------------------------------------------------------------------- stored pos_embed
# An official checkpoint's frozen pos_embed buffer is the model's: a float16 checkpoint samples
# with the float16-rounded table, and recomputing the exact one moves its outputs.

X = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
T, Y = np.array([3, 998]), np.array([6, 7])


def _official(sd):
    return official_dit.forward(sd, X.transpose(0, 3, 1, 2), T, Y, 2, 2, 8).transpose(0, 2, 3, 1)


def _fp16_table(state_dict):
    sd = dict(state_dict)
    sd["pos_embed"] = state_dict["pos_embed"].astype(np.float16)
    return sd


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_stored_table_is_kept_up_to_param_dtype(state_dict, param_dtype):
    sd = _fp16_table(state_dict)
    cfg = dataclasses.replace(STORED, param_dtype=param_dtype)
    params = convert_dit_state_dict(sd, cfg)
    want = sd["pos_embed"].astype(HALF.get(param_dtype, np.dtype(np.float32)))
    assert params["pos_embed"].dtype == want.dtype
    np.testing.assert_array_equal(params["pos_embed"], want)
    if param_dtype == "float32":  # float16 values are float32 values: bit for bit
        assert params["pos_embed"].tobytes() == sd["pos_embed"].astype(np.float32).tobytes()


def test_stored_table_is_what_the_model_adds(state_dict):
    """The converted model equals the reference run with the stored (float16-rounded) table, and
    differs from the recomputed-sin-cos model by what the reference says that table changes."""
    sd = _fp16_table(state_dict)
    stored = np.asarray(build_model(STORED).apply(
        {"params": convert_dit_state_dict(sd, STORED)}, X, T, Y))
    recomputed = np.asarray(build_model(CFG).apply(
        {"params": convert_dit_state_dict(sd, CFG)}, X, T, Y))  # within float16 rounding: passes
    want_stored, want_exact = _official(sd), _official(state_dict)
    np.testing.assert_allclose(stored, want_stored, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(recomputed, want_exact, rtol=2e-4, atol=2e-4)
    moved, want_moved = stored - recomputed, want_stored - want_exact
    assert np.abs(want_moved).max() > 1e-3  # float16 rounding of the table: visible
    np.testing.assert_allclose(moved, want_moved, rtol=0, atol=2e-5)


def test_learned_table_converts_when_stored(state_dict):
    sd = dict(state_dict)
    rng = np.random.default_rng(3)
    sd["pos_embed"] = (state_dict["pos_embed"]
                       + 0.02 * rng.standard_normal(state_dict["pos_embed"].shape)).astype(np.float32)
    params = convert_dit_state_dict(sd, STORED)
    np.testing.assert_array_equal(params["pos_embed"], sd["pos_embed"])
    got = np.asarray(build_model(STORED).apply({"params": params}, X, T, Y))
    np.testing.assert_allclose(got, _official(sd), rtol=2e-4, atol=2e-4)
    report = pos_embed_report(sd, STORED)
    assert not report["sincos_within_rounding"] and report["stored_dtype"] == "float32"
    assert report["max_abs_deviation_from_sincos"] == pytest.approx(
        np.abs(sd["pos_embed"][0].astype(np.float64) - official_dit.pos_embed(32, 4)).max())
    with pytest.raises(ConversionError, match=r"pos_embed: values differ .* converts with "
                                              r"pos_embed='stored'"):
        convert_dit_state_dict(sd, CFG)  # the old check, kept for the "sincos" config


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_report_calls_a_rounded_table_sincos(state_dict, dtype):
    sd = {k: v.astype(HALF.get(dtype, np.dtype(np.float32))) for k, v in state_dict.items()}
    report = pos_embed_report(sd, STORED)
    assert report["sincos_within_rounding"] and report["stored_dtype"] == dtype
    assert 0 < report["max_abs_deviation_from_sincos"] < (1e-6 if dtype == "float32" else 1e-2)


def test_sincos_config_param_tree_is_unchanged():
    """Default configs hold no pos_embed param; "stored" adds exactly the one top-level leaf."""
    from trdq_jax.models import abstract_params, pos_embed_size
    from trdq_jax.models.factory import param_count
    assert CFG.pos_embed == "sincos" and DiTConfig().pos_embed == "sincos"
    plain, stored = abstract_params(CFG), abstract_params(STORED)
    assert "pos_embed" not in plain
    assert set(stored) == set(plain) | {"pos_embed"}
    assert stored["pos_embed"].shape == (1, 16, 32) and stored["pos_embed"].dtype == np.float32
    assert jax.tree.structure({k: v for k, v in stored.items() if k != "pos_embed"}) == \
        jax.tree.structure(plain)
    assert param_count(stored) == param_count(plain) + pos_embed_size(CFG)


def test_stored_round_trip_through_the_official_layout(tmp_path, state_dict):
    """to_official_state_dict writes the stored table; converting that back gives the same
    params, bit for bit; loading without a config infers "stored"."""
    sd = dict(state_dict)
    sd["pos_embed"] = (state_dict["pos_embed"] + 0.01).astype(np.float32)  # not sin-cos at all
    params = convert_dit_state_dict(sd, STORED)
    back = to_official_state_dict(params, STORED)
    assert set(back) == set(sd)
    np.testing.assert_array_equal(back["pos_embed"], sd["pos_embed"])
    save_file(back, str(tmp_path / "dit.safetensors"))
    cfg, again = load_official_dit(tmp_path / "dit.safetensors",
                                   infer_dit_config(load_state_dict(tmp_path / "dit.safetensors"),
                                                    num_heads=2))
    assert cfg == STORED
    assert jax.tree.structure(again) == jax.tree.structure(params)
    for (k, a), b in zip(jax.tree_util.tree_flatten_with_path(again)[0], jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(k))


def test_stored_pos_embed_problems_are_reported_with_the_others(state_dict):
    sd = dict(state_dict)
    pos = sd["pos_embed"].copy()
    pos[0, 2, 3] = np.nan
    sd["pos_embed"] = pos
    del sd["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ConversionError) as e:
        convert_dit_state_dict(sd, STORED)
    assert "missing keys (1): blocks.1.mlp.fc2.bias" in str(e.value)
    assert "non-finite keys (1): pos_embed (1 NaN, 0 Inf)" in str(e.value)
    sd["pos_embed"] = np.zeros((1, 15, 32), np.float32)
    sd["blocks.0.attn.proj.weight"] = np.zeros((32, 31), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_dit_state_dict(sd, STORED)
    assert ("mis-shaped keys (2): blocks.0.attn.proj.weight: expected (32, 32), got (32, 31), "
            "pos_embed: expected (1, 16, 32), got (1, 15, 32)") in str(e.value)
    del sd["pos_embed"]
    with pytest.raises(ConversionError, match=r"missing keys \(2\): blocks.1.mlp.fc2.bias, "
                                              r"pos_embed"):
        convert_dit_state_dict(sd, STORED)
    big = dict(state_dict, pos_embed=np.full((1, 16, 32), 1e5, np.float32))
    with pytest.raises(ConversionError, match=r"pos_embed \(0 NaN, 512 Inf after the cast to "
                                              r"param_dtype=float16"):
        convert_dit_state_dict(big, dataclasses.replace(STORED, param_dtype="float16"))


def test_stored_table_is_frozen(state_dict):
    """No gradient reaches a stored table, and training such a model is refused (the training
    loop's weight decay and EMA would still move it)."""
    params = jax.tree.map(np.asarray, convert_dit_state_dict(state_dict, STORED))
    model = build_model(STORED)
    grads = jax.grad(lambda p: (model.apply({"params": p}, X, T, Y) ** 2).sum())(params)
    assert not np.asarray(grads["pos_embed"]).any()
    assert np.asarray(grads["x_embedder"]["proj"]["bias"]).any()
    with pytest.raises(ValueError, match=r"^train: a DiT with pos_embed='stored'"):
        model.apply({"params": params}, X, T, Y, train=True, rngs={"dropout": jax.random.key(0)})
    model_init = build_model(STORED).init(jax.random.key(0), X, T, Y)["params"]
    np.testing.assert_array_equal(model_init["pos_embed"][0],
                                  official_dit.pos_embed(32, 4).astype(np.float32))


def test_cli_convert_keeps_the_table_and_reports_its_distance(tmp_path, capsys, state_dict):
    from trdq_jax import checkpoint
    from trdq_jax.cli import main
    sd = _fp16_table(state_dict)
    np.savez(tmp_path / "dit.npz", **sd)
    assert main(["convert", "--input", str(tmp_path / "dit.npz"), "--out", str(tmp_path / "ck"),
                 "--num-heads", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["pos_embed"] == "stored"
    assert printed["pos_embed"]["stored_dtype"] == "float16"
    assert printed["pos_embed"]["sincos_within_rounding"] is True
    assert 1e-4 < printed["pos_embed"]["max_abs_deviation_from_sincos"] < 1e-3
    assert checkpoint.read_metadata(tmp_path / "ck")["extra"]["pos_embed"] == printed["pos_embed"]
    params, cfg = checkpoint.restore(tmp_path / "ck")
    assert cfg == STORED
    np.testing.assert_array_equal(params["pos_embed"], sd["pos_embed"].astype(np.float32))
    assert main(["convert", "--input", str(tmp_path / "dit.npz"), "--out", str(tmp_path / "old"),
                 "--num-heads", "2", "--pos-embed", "sincos"]) == 0
    params, cfg = checkpoint.restore(tmp_path / "old")
    assert cfg == CFG and "pos_embed" not in params


def test_quantizing_a_stored_dit_leaves_the_table_float_and_equal(tmp_path, state_dict):
    import trdq_jax.quant as Q
    from trdq_jax.config import SamplerConfig
    from trdq_jax.models import input_shape
    from trdq_jax.sampling import Sampler
    sd = _fp16_table(state_dict)
    params = convert_dit_state_dict(sd, STORED)
    model = build_model(STORED)
    sampler = Sampler.from_config(SamplerConfig(num_steps=4, cfg_scale=2.0))
    labels = np.array([0, 1, 2, 3])
    # smoothing and a rotation per layer, two time segments: the quick path of test_transform
    recipe = Q.get_recipe("trdq_release", 8, 8, rotation_block=16, alpha_grid=(), num_segments=2,
                          gptq=False, w_clip_search=False)
    calib = Q.calibrate(model, params, recipe, sampler, labels=labels, null_label=7,
                        shape=input_shape(STORED, len(labels)), rows_per_step=32)
    assert "x_embedder/proj" in calib.roles["input"]
    qparams = Q.quantize(params, calib, recipe)
    assert "pos_embed" not in qparams["layers"]
    table = qparams["float"]["pos_embed"]
    assert table.dtype == np.float32
    np.testing.assert_array_equal(table, sd["pos_embed"].astype(np.float32))
    Q.save_quantized(tmp_path / "q", qparams, STORED, recipe, calib.segment_of_step)
    restored, cfg, _, _ = Q.load_quantized(tmp_path / "q")
    assert cfg == STORED
    np.testing.assert_array_equal(np.asarray(restored["float"]["pos_embed"]), table)
    x = jax.random.normal(jax.random.key(7), (4, 8, 8, 4))
    t, y = np.array([10.0, 400.0, 700.0, 999.0]), np.array([0, 1, 2, 7])
    quant = Q.QuantizedDenoiser(model, "xla")(restored, x, t, y, np.int32(0), False)
    float_out = model.apply({"params": params}, x, t, y)
    rel = float(np.linalg.norm(np.asarray(quant - float_out)) / np.linalg.norm(float_out))
    assert rel < 0.1, rel
