"""Official DiT checkpoint conversion: round trips through real file formats and error reports."""
import numpy as np
import pytest

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
