"""The Flax T5 v1.1 encoder against transformers' T5EncoderModel, through the Hugging Face
converter, and tokenization through transformers' AutoTokenizer.

The fixture (``tests/models/fixtures/tiny_t5*``, written by ``scripts/make_t5_fixture.py`` with
torch + transformers, which these tests never import torch for) is a tiny random-weight gated-GELU
T5EncoderModel (d_model 32, d_kv 8, 4 heads, d_ff 48, 2 layers, vocab 100, 8 buckets, max
distance 16) with a word-level tokenizer and reference hidden states computed in float64 for a
padded batch of 3 prompts (4, 7 and 20 of 20 tokens).

Padded positions: transformers does not mask them out of ``last_hidden_state`` (a pad row
attends to the real tokens like any query), and neither does the Flax encoder, so they hold the
same finite values in both; the parity test checks the real positions against the 1e-4 bound
and, separately, that the padded ones match too.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import pickle
import shutil
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from trdq_jax.config import ConfigError
from trdq_jax.models.convert import ConversionError, load_state_dict
from trdq_jax.models.convert_t5 import (check_tokenizer, convert_t5_state_dict, hf_config,
                                        hf_key, key_table, load_t5_encoder, load_tokenizer,
                                        save_t5_encoder, t5_config_from_hf, to_hf_state_dict,
                                        tokenize)
from trdq_jax.models.t5 import (T5Encoder, T5EncoderConfig, abstract_t5_params, encode,
                                init_t5_params, relative_position_bucket)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
T5_DIR = FIXTURES / "tiny_t5"
SHARDED_DIR = FIXTURES / "tiny_t5_sharded"
WEIGHTS = T5_DIR / "model.safetensors"
RTOL = 1e-4  # max |error| / max |reference| over the real (non-padded) positions


@pytest.fixture(scope="module")
def io():
    return dict(np.load(FIXTURES / "tiny_t5_io.npz"))


@pytest.fixture(scope="module")
def loaded():
    return load_t5_encoder(T5_DIR)


@pytest.fixture(scope="module")
def cfg(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def state_dict():
    return load_state_dict(WEIGHTS)


@pytest.fixture(scope="module")
def run(cfg, io):
    """``run(params) -> last_hidden_state`` (numpy), jitted once with params as an argument."""
    fn = jax.jit(lambda p, ids, mask: T5Encoder(cfg).apply({"params": p}, ids, mask))
    return lambda params: np.asarray(fn(params, io["input_ids"], io["attention_mask"]))


def rel_error(out, io, padded=False):
    real = io["attention_mask"].astype(bool)
    sel = ~real if padded else real
    ref = io["last_hidden_state"][sel]
    return float(np.abs(out[sel] - ref).max() / np.abs(ref).max())


def copy_dir(src: pathlib.Path, tmp_path: pathlib.Path, name: str = "t5") -> pathlib.Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def edit_config(directory: pathlib.Path, **changes) -> pathlib.Path:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return path


# ----------------------------------------------------------------------------- parity


def test_fixture_config(cfg, io):
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads) == (
        100, 32, 8, 48, 2, 4)
    assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance) == (8, 16)
    assert io["attention_mask"].sum(1).tolist() == [4, 7, 20]  # padded, one full row
    assert io["input_ids"].dtype == np.int32 and io["last_hidden_state"].shape == (3, 20, 32)


def test_parity_with_transformers(loaded, run, io):
    _, params = loaded
    out = run(params)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    err = rel_error(out, io)
    assert err <= RTOL, err
    # padded rows: the pad token's embedding attending to the real tokens, in both
    assert rel_error(out, io, padded=True) <= RTOL


def test_encode_checks_and_mask_kinds(loaded, io):
    cfg, params = loaded
    ids, mask = io["input_ids"], io["attention_mask"]
    ref = np.asarray(encode(params, cfg, ids, mask))
    np.testing.assert_array_equal(np.asarray(encode(params, cfg, ids, mask.astype(bool))), ref)
    # the mask matters: without it the short prompts attend to their padding
    assert rel_error(np.asarray(encode(params, cfg, ids)), io) > 1e-2
    with pytest.raises(ValueError, match=r"^input_ids: ids must lie in \[0, vocab_size=100\)"):
        encode(params, cfg, np.full((1, 4), 100, np.int32))
    with pytest.raises(ValueError, match="^input_ids: expected a non-empty int array"):
        encode(params, cfg, ids.astype(np.float32))
    with pytest.raises(ValueError, match="^attention_mask: expected an int or bool array of shape"):
        encode(params, cfg, ids, mask[:, :5])


def test_relative_position_buckets():
    rel = np.arange(-300, 301)
    b = relative_position_bucket(rel, 32, 128)  # T5 v1.1 XXL's
    assert b.dtype == np.int32 and b.min() == 0 and b.max() == 31
    at = dict(zip(rel.tolist(), b.tolist()))
    # keys after the query take the upper half; exact buckets below 8, the last one from 128
    assert (at[0], at[1], at[7], at[-1], at[-7]) == (0, 17, 23, 1, 7)
    assert at[128] == at[300] == 31 and at[-128] == at[-300] == 15
    assert at[64] == 30 and at[127] == 31 and at[16] == 26 and at[8] == 24 and at[-8] == 8
    assert np.all(np.diff(b[rel > 0]) >= 0) and np.all(np.diff(b[rel < 0]) <= 0)


# ----------------------------------------------------------------------------- loading


def test_sharded_directory_loads_identically(loaded):
    cfg, params = loaded
    cfg2, params2 = load_t5_encoder(SHARDED_DIR)
    assert cfg2 == cfg
    assert len(list(SHARDED_DIR.glob("model-*-of-*.safetensors"))) >= 2
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_round_trip_and_save(loaded, state_dict, tmp_path, run, io):
    cfg, params = loaded
    hf = to_hf_state_dict(params, cfg)
    assert set(hf) == set(state_dict) == set(key_table(cfg))
    for k in hf:
        np.testing.assert_array_equal(hf[k], state_dict[k])
    back = convert_t5_state_dict(hf, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    out = save_t5_encoder(tmp_path / "saved", params, cfg)
    cfg2, params2 = load_t5_encoder(out)
    assert cfg2 == cfg and json.loads((out / "config.json").read_text()) == hf_config(cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
    with pytest.raises(FileExistsError, match="^directory: .* exists and is not an empty"):
        save_t5_encoder(out, params, cfg)
    with pytest.raises(ValueError, match="^params: not the parameter tree"):
        to_hf_state_dict({"shared": params["shared"]}, cfg)


def test_key_table_names():
    assert hf_key(("shared", "embedding")) == "shared.weight"
    assert hf_key(("block_1", "layer_1", "DenseReluDense", "wi_0", "kernel")) == \
        "encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
    assert hf_key(("block_0", "layer_0", "SelfAttention", "relative_attention_bias",
                   "embedding")) == \
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert hf_key(("final_layer_norm", "scale")) == "encoder.final_layer_norm.weight"


def test_full_t5_and_tied_embedding(cfg, state_dict, loaded):
    _, params = loaded
    full = dict(state_dict)
    full["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.ones((32, 32), np.float32)
    full["decoder.embed_tokens.weight"] = state_dict["shared.weight"]
    full["lm_head.weight"] = np.full((100, 32), np.nan, np.float32)  # ignored, never read
    full["encoder.embed_tokens.weight"] = state_dict["shared.weight"].copy()
    jax.tree_util.tree_map(np.testing.assert_array_equal, convert_t5_state_dict(full, cfg), params)
    only_tied = {k: v for k, v in state_dict.items() if k != "shared.weight"}
    only_tied["encoder.embed_tokens.weight"] = state_dict["shared.weight"]
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           convert_t5_state_dict(only_tied, cfg), params)
    full["encoder.embed_tokens.weight"] = state_dict["shared.weight"] + 1
    with pytest.raises(ConversionError, match="encoder.embed_tokens.weight differs from "
                                              "shared.weight"):
        convert_t5_state_dict(full, cfg)


def test_half_precision_files_and_bf16_params(state_dict, tmp_path, io):
    d = copy_dir(T5_DIR, tmp_path)
    save_file({k: v.astype(np.float16) for k, v in state_dict.items()},
              str(d / "model.safetensors"))
    cfg16, params16 = load_t5_encoder(d, param_dtype="bfloat16", dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16"
    leaves = jax.tree_util.tree_leaves(params16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
    out = np.asarray(encode(params16, cfg16, io["input_ids"], io["attention_mask"]))
    assert out.dtype == np.float32 and rel_error(out, io) < 0.05


def test_mutations_are_refused_or_break_parity(cfg, state_dict, run, io):
    """Every tensor dropped, transposed (where that changes the array) and swapped with each
    same-shaped one: the converter refuses, or the converted model misses the reference."""
    outcomes, undetected = Counter(), []

    def check(kind, name, sd):
        try:
            params = convert_t5_state_dict(sd, cfg)
        except ConversionError:
            outcomes[f"{kind}: refused"] += 1
            return
        if rel_error(run(params), io) > 1e-3:
            outcomes[f"{kind}: parity broken"] += 1
        else:
            undetected.append(f"{kind} {name}")

    for key in state_dict:
        check("drop", key, {k: v for k, v in state_dict.items() if k != key})
        value = state_dict[key]
        if value.ndim == 2 and not np.array_equal(value, value.T):
            check("transpose", key, {**state_dict, key: np.ascontiguousarray(value.T)})
    keys = sorted(state_dict)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if state_dict[a].shape == state_dict[b].shape:
                check("swap", f"{a} <-> {b}",
                      {**state_dict, a: state_dict[b], b: state_dict[a]})
    print(dict(sorted(outcomes.items())))
    assert not undetected, undetected
    n = len(state_dict)
    assert outcomes["drop: refused"] == n == 21
    # non-square ones (wi_0, wi_1, wo, shared, the bias table) refused, square q/k/v/o not
    assert outcomes["transpose: refused"] == 8 and outcomes["transpose: parity broken"] == 8
    assert outcomes["swap: parity broken"] == 45  # C(8,2) + C(4,2) + C(2,2) + C(5,2)


# ----------------------------------------------------------------------------- bad input


def test_v1_0_relu_config_refused(tmp_path):
    d = copy_dir(T5_DIR, tmp_path)
    path = edit_config(d, feed_forward_proj="relu", dense_act_fn="relu", is_gated_act=False)
    with pytest.raises(ConversionError) as e:
        load_t5_encoder(d)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "T5 v1.0" in msg, msg
    edit_config(d, feed_forward_proj=None, dense_act_fn=None, is_gated_act=None)
    with pytest.raises(ConversionError, match=r"'relu' \(the default\) is T5 v1.0"):
        load_t5_encoder(d)
    with pytest.raises(ConfigError, match=r"^T5EncoderConfig.feed_forward_proj: 'relu' is T5 "
                                          r"v1.0"):
        T5EncoderConfig(feed_forward_proj="relu")


@pytest.mark.parametrize("changes, match", [
    ({"is_decoder": True}, "is_decoder is True: a decoder-only T5"),
    ({"model_type": "umt5"}, "foreign config: model_type 'umt5'"),
    ({"model_type": None}, "foreign config: model_type None"),
    ({"feed_forward_proj": "gated-silu"}, "feed_forward_proj 'gated-silu' is not supported"),
    ({"relative_attention_num_buckets": 7}, "relative_attention_num_buckets: expected an even"),
])
def test_other_architectures_refused(tmp_path, changes, match):
    d = copy_dir(T5_DIR, tmp_path)
    path = edit_config(d, **changes)
    with pytest.raises(ConversionError, match=match) as e:
        load_t5_encoder(d)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_sharded_problems(tmp_path):
    d = copy_dir(SHARDED_DIR, tmp_path)
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    # a key listed in another shard than the one holding it
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConversionError) as e:
        load_t5_encoder(d)
    assert f"{key} (listed in {shards[1]})" in str(e.value)
    assert f"{key} (in {shards[0]})" in str(e.value)
    # a listed shard missing from the directory
    (d / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"lists 1 shard\\(s\\) missing from .*: "
                                                f"{shards[1]}$"):
        load_t5_encoder(d)
    index["weight_map"][key] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="shard names must be .safetensors files in the "
                                              "same directory"):
        load_t5_encoder(d)


def test_nan_tensor_names_the_key(state_dict, tmp_path):
    d = copy_dir(T5_DIR, tmp_path)
    bad = dict(state_dict)
    key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    bad[key] = bad[key].copy()
    bad[key][3, 4] = np.nan
    bad.pop("encoder.final_layer_norm.weight")
    bad["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = \
        np.ones((8, 4), np.float32)
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(ConversionError) as e:
        load_t5_encoder(d)
    msg = str(e.value)
    assert str(d / "model.safetensors") in msg
    assert f"non-finite keys (1): {key} (1 NaN, 0 Inf)" in msg
    assert "missing keys (1): encoder.final_layer_norm.weight" in msg
    assert "unknown keys (1): encoder.block.1.layer.0.SelfAttention.relative_attention_bias" in msg


def test_overflow_on_cast_named(state_dict, cfg):
    big = dict(state_dict)
    big["encoder.final_layer_norm.weight"] = np.full((32,), 1e6, np.float32)
    with pytest.raises(ConversionError, match="after the cast to param_dtype=float16"):
        convert_t5_state_dict(big, dataclasses.replace(cfg, param_dtype="float16"))


def test_pickle_and_missing_weights_refused(tmp_path):
    d = copy_dir(T5_DIR, tmp_path)
    (d / "model.safetensors").write_bytes(pickle.dumps({"shared.weight": [1.0, 2.0]}))
    with pytest.raises(ConversionError, match="is a pickle, refused"):
        load_t5_encoder(d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no weights file.*found pytorch_model.bin \(a "
                                                r"pickle, never read"):
        load_t5_encoder(d)
    with pytest.raises(FileNotFoundError, match="^directory: no such directory"):
        load_t5_encoder(tmp_path / "nowhere")


def test_init_and_abstract_params(cfg):
    small = dataclasses.replace(cfg, num_layers=3)
    abstract = abstract_t5_params(small)
    params = init_t5_params(small, jax.random.PRNGKey(1))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(abstract)
    assert all(p.shape == a.shape and p.dtype == a.dtype for p, a in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(abstract)))
    assert "relative_attention_bias" in params["block_0"]["layer_0"]["SelfAttention"]
    assert "relative_attention_bias" not in params["block_2"]["layer_0"]["SelfAttention"]
    out = encode(params, small, np.array([[5, 6, 1, 0]], np.int32), np.array([[1, 1, 1, 0]]))
    assert out.shape == (1, 4, 32) and np.isfinite(np.asarray(out)).all()
    # shared, the final norm, 9 a block, the bias table
    assert len(to_hf_state_dict(params, small)) == 2 + 9 * 3 + 1


def test_config_validation():
    assert T5EncoderConfig().d_model == 4096  # T5 v1.1 XXL's encoder by default
    with pytest.raises(ConfigError, match="^T5EncoderConfig.d_kv: expected a positive int"):
        T5EncoderConfig(d_kv=0)
    with pytest.raises(ConfigError, match="^T5EncoderConfig.dense_act_fn: expected 'gelu_new'"):
        T5EncoderConfig(dense_act_fn="gelu")
    with pytest.raises(ConfigError, match="^T5EncoderConfig.relative_attention_max_distance"):
        T5EncoderConfig(relative_attention_num_buckets=32, relative_attention_max_distance=8)
    with pytest.raises(ConfigError, match="^T5EncoderConfig.dtype"):
        T5EncoderConfig(dtype="float64")
    with pytest.raises(ConversionError, match="^x.json: expected a JSON object"):
        t5_config_from_hf([], "x.json")


# ----------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("transformers")
    return load_tokenizer(T5_DIR)


def test_tokenize_matches_fixture(tokenizer, cfg, io):
    prompts = [str(p) for p in io["prompts"]]
    ids, mask, truncated = tokenize(T5_DIR, prompts, 20, cfg=cfg)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == (3, 20)
    np.testing.assert_array_equal(ids, io["input_ids"])
    np.testing.assert_array_equal(mask, io["attention_mask"])
    assert truncated == []


def test_truncation_reported(tokenizer, io):
    prompts = [str(p) for p in io["prompts"]]
    with pytest.warns(UserWarning) as record:
        ids, mask, truncated = tokenize(None, prompts, 5, tokenizer=tokenizer)
    assert [str(w.message).split(" (")[0] for w in record] == [
        "prompts[1]: 7 tokens, truncated to max_length=5",
        "prompts[2]: 20 tokens, truncated to max_length=5"]
    assert truncated == [1, 2]
    assert mask.sum(1).tolist() == [4, 5, 5]
    assert ids[1, -1] == ids[2, -1] == 1  # the end-of-sequence token is kept


def test_tokenizer_bad_input(tokenizer, cfg):
    with pytest.raises(ValueError, match="^prompts: empty list"):
        tokenize(T5_DIR, [], 20)
    with pytest.raises(ValueError, match="^prompts: expected a list of strings, got str"):
        tokenize(T5_DIR, "a seven", 20)
    with pytest.raises(ValueError, match="^prompts: expected strings, got int at index 1"):
        tokenize(T5_DIR, ["a", 7], 20)
    with pytest.raises(ValueError, match="^max_length: expected a positive int"):
        tokenize(T5_DIR, ["a"], 0)
    small = dataclasses.replace(cfg, vocab_size=50)
    with pytest.raises(ValueError, match=r"^tokenizer: vocabulary of 81 tokens does not fit the "
                                         r"encoder's embedding of vocab_size=50"):
        check_tokenizer(tokenizer, small)
    with pytest.raises(ValueError, match="^tokenizer: vocabulary of 81 tokens"):
        tokenize(None, ["a seven"], 20, cfg=small, tokenizer=tokenizer)
    check_tokenizer(tokenizer, cfg)
    with pytest.raises(FileNotFoundError, match="^tokenizer_dir: no such directory"):
        load_tokenizer(T5_DIR / "nowhere")
