"""``trdq sample`` / ``trdq generate`` with prompts, on a tiny random text model that reads the
bundled digits-t5 encoder; the flags' unhappy paths."""
from __future__ import annotations

import json
import re
import pathlib

import jax
import numpy as np
import pytest

from trdq_jax import checkpoint
from trdq_jax.cli import main
from trdq_jax.config import (ExperimentConfig, GenerationConfig, PixArtConfig, SamplerConfig,
                             TrainConfig)
from trdq_jax.models.factory import init_params
from trdq_jax.sampling.prompts import encode_prompts

FIXTURE_T5 = pathlib.Path(__file__).parent / "models" / "fixtures" / "tiny_t5"


def te_dir():
    from trdq_jax.models.text_encoder import resolve
    return resolve("digits-t5")


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    cfg = ExperimentConfig(
        name="tiny-text",
        model=PixArtConfig(input_size=8, in_channels=1, hidden_size=24, depth=1, num_heads=2,
                           caption_channels=64, max_tokens=24, learn_sigma=False),
        sampler=SamplerConfig(num_steps=4, cfg_scale=3.0),
        generation=GenerationConfig(batch_size=4),
        train=TrainConfig(dataset="captioned_digits", text_encoder="digits-t5"))
    params = jax.tree.map(lambda a: a + 0.05, init_params(cfg.model, jax.random.key(0)))
    path = tmp_path_factory.mktemp("ck") / "text"
    checkpoint.save(path, jax.device_get(params), cfg)
    return path


def run(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_with_prompts_and_a_cache(text_ckpt, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, out, err = run(capsys, "sample", "--checkpoint", text_ckpt, "--out", tmp_path / "s",
                         "--prompt", "a handwritten seven", "--prompt", "digit 3",
                         "--per-class", 2, "--prompt-cache", cache)
    assert code == 0, err
    meta = json.loads((tmp_path / "s" / "metadata.json").read_text())
    assert meta["prompts"] == ["a handwritten seven", "digit 3"]
    assert meta["null_branch"] == "empty_prompt"
    assert meta["prompt_cache"] == {"cached": 0, "encoded": 3}  # two prompts and ""
    with np.load(tmp_path / "s" / "samples.npz") as data:
        assert data["labels"].tolist() == [0, 0, 1, 1]  # each sample's prompt index
        first = data["samples"]
    code, out, err = run(capsys, "sample", "--checkpoint", text_ckpt, "--out", tmp_path / "t",
                         "--prompt", "a handwritten seven", "--prompt", "digit 3",
                         "--per-class", 2, "--prompt-cache", cache)
    assert code == 0, err
    assert json.loads((tmp_path / "t" / "metadata.json").read_text())["prompt_cache"] == {
        "cached": 3, "encoded": 0}
    with np.load(tmp_path / "t" / "samples.npz") as data:
        np.testing.assert_array_equal(data["samples"], first)


def test_generate_cycles_the_prompts_and_records_them(text_ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("digit 1\n\n  a handwritten two  \ndigit 3\n")
    code, out, err = run(capsys, "generate", "--checkpoint", text_ckpt, "--out", tmp_path / "g",
                         "--prompts", prompts, "--num-samples", 5)
    assert code == 0, err
    meta = json.loads((tmp_path / "g" / "metadata.json").read_text())
    assert meta["run"]["text"] == {"prompts": ["digit 1", "a handwritten two", "digit 3"],
                                   "null_branch": "empty_prompt"}
    # sample i took prompt i mod 3: its stored conditioning is that prompt's embedding
    with np.load(tmp_path / "g" / "cond.npz") as data:
        stored = {k: data[k] for k in data.files}
    emb, mask, _ = encode_prompts(["digit 1", "a handwritten two", "digit 3"], "digits-t5", 24)
    caption = next(v for k, v in stored.items() if "caption" in k)
    np.testing.assert_array_equal(caption, emb[np.arange(5) % 3])


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "EMPTY"], "--prompts: .* holds no prompt"),
    (["--prompts", "MISSING"], "--prompts: no such file"),
    (["--prompt", " "], "--prompt: empty prompt"),
    (["--labels", "1,2"], "--labels: the model is conditioned on text"),
    (["--prompt", "digit 1", "--text-encoder", FIXTURE_T5],
     "--text-encoder: gives 32 channels per token, the model takes caption_channels=64"),
    (["--prompt", "digit 1", "--text-encoder", "BIGVOCAB"],
     "--text-encoder: .*BIGVOCAB.*: tokenizer: vocabulary of 2.. tokens does not fit the "
     "encoder's embedding of vocab_size=100"),
])
def test_bad_prompt_flags(text_ckpt, tmp_path, capsys, argv, message):
    import shutil
    (tmp_path / "EMPTY").write_text("\n  \n")
    shutil.copytree(FIXTURE_T5, tmp_path / "BIGVOCAB")  # T5 of 100 rows, a 214-token tokenizer
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(te_dir() / name, tmp_path / "BIGVOCAB" / name)
    (tmp_path / "BIGVOCAB" / "special_tokens_map.json").unlink()
    argv = [str(tmp_path / a) if a in ("EMPTY", "MISSING", "BIGVOCAB") else a for a in argv]
    code, out, err = run(capsys, "sample", "--checkpoint", text_ckpt, "--out", tmp_path / "s",
                         *argv)
    assert code == 2 and err.count("\n") == 1, err

    assert re.search(message, err), err
    assert not (tmp_path / "s").exists()


def test_prompt_flags_on_a_class_model_are_refused(tmp_path, capsys):
    code, out, err = run(capsys, "sample", "--model", "digits-dit", "--out", tmp_path / "s",
                         "--prompt", "a seven")
    assert code == 2 and "--prompt: the model (dit) is not conditioned on text" in err, err


def test_quantize_a_text_model_on_prompts_and_sample_it(text_ckpt, tmp_path, capsys):
    """Calibration on the given prompts (2 samples each), the caption-side layers weight-only,
    then sampling the quantized checkpoint with prompts."""
    code, out, err = run(capsys, "quantize", "--checkpoint", text_ckpt, "--out", tmp_path / "q",
                         "--prompt", "digit 1", "--prompt", "a handwritten two",
                         "--per-class", 2, "--w-bits", 8, "--a-bits", 8, "--no-choose")
    assert code == 0, err
    from trdq_jax.quant.io import load_quantized_model
    stored = json.loads((tmp_path / "q" / "metadata.json").read_text())
    weight_only = stored["extra"]["weight_only"] if "extra" in stored else stored["weight_only"]
    assert set(weight_only) == {"caption_projection/fc1", "caption_projection/fc2",
                                "blocks_0/cross_attn/kv", "t_block", "t_embedder/mlp_0",
                                "t_embedder/mlp_2"}
    load_quantized_model(tmp_path / "q")
    from trdq_jax.quant.io import stored_conditioning
    assert stored_conditioning(tmp_path / "q") == {
        "null_branch": "empty_prompt", "prompts": ["digit 1", "a handwritten two"]}
    code, out, err = run(capsys, "sample", "--quantized", tmp_path / "q", "--out",
                         tmp_path / "s", "--prompt", "digit 5", "--per-class", 2)
    assert code == 0, err
    code, out, err = run(capsys, "quantize", "--model", "digits-dit", "--out", tmp_path / "r",
                         "--prompt", "digit 1")
    assert code == 2 and "--prompts: the model (dit) is not conditioned on text" in err, err


def test_a_long_prompt_is_truncated_with_a_one_line_warning(text_ckpt, tmp_path, capsys):
    long = "a handwritten seven " * 8
    code, out, err = run(capsys, "sample", "--checkpoint", text_ckpt, "--out", tmp_path / "s",
                         "--prompt", "digit 1", "--prompt", long, "--per-class", 1)
    assert code == 0, err
    assert re.fullmatch(r"trdq sample: warning: prompts\[1\]: 25 tokens, truncated to "
                        r"max_length=24 \('a handwritten seven a handwritten seven '\.\.\.\)\n",
                        err.split("\r")[0].split("sampling")[0]), err


def test_cfg_analysis_of_a_text_model(text_ckpt, tmp_path, capsys):
    """The self-attentions of a text model, analysed on prompts; plans derived from it."""
    code, out, err = run(capsys, "cfg-analysis", "--checkpoint", text_ckpt, "--out",
                         tmp_path / "a", "--prompt", "digit 1", "--prompt", "a handwritten two")
    assert code == 0, err
    analysis = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert analysis["layers"] == ["blocks_0/attn"]
    assert "conditioning" in analysis and "labels" not in analysis
    err_table = np.asarray(analysis["share_error"])
    assert err_table.shape == (4, 1) and np.isfinite(err_table).all() and err_table.max() > 0
    assert list((tmp_path / "a" / "plans").glob("*.json"))


def test_quantize_choose_on_a_text_model(text_ckpt, tmp_path, capsys):
    """--choose draws its held-out samples from the calibration prompts (another seed) and
    reports every candidate's error; the chosen recipe is stored."""
    code, out, err = run(capsys, "quantize", "--checkpoint", text_ckpt, "--out", tmp_path / "q",
                         "--prompt", "digit 1", "--prompt", "a handwritten two",
                         "--per-class", 1, "--w-bits", 4, "--a-bits", 8, "--choose",
                         "--choose-samples", 3)
    assert code == 0, err
    errors = json.loads(out)["trajectory_errors"]
    assert list(errors)[0] == "base" and "anchor:quarot" in errors
    assert all(np.isfinite(v) and v > 0 for v in errors.values())
    from trdq_jax.quant.io import load_quantized
    _, _, recipe, _ = load_quantized(tmp_path / "q")
    assert recipe.name == "trdq" and (recipe.w_bits, recipe.a_bits) == (4, 8)
