"""Prompt embeddings (the cache) and the CFG null branch of a text-conditioned model."""
from __future__ import annotations

import json
import shutil
import zipfile

import jax
import numpy as np
import pytest

from trdq_jax.models import text_encoder as te
from trdq_jax.sampling import conditioning
from trdq_jax.sampling.prompts import (PromptCacheError, caption_conditioning, encode_prompts,
                                       entry_name, null_conditioning)

PROMPTS = ["a handwritten seven", "digit 3", "a handwritten seven", ""]


@pytest.fixture(scope="module")
def encoder():
    return te.load_text_encoder("digits-t5")


def test_embeddings_match_the_encoder_and_the_cache_skips_it(tmp_path, encoder, monkeypatch):
    emb, mask, info = encode_prompts(PROMPTS, encoder, 24, cache_dir=tmp_path / "c")
    ref_emb, ref_mask = encoder.encode(PROMPTS, 24)
    np.testing.assert_array_equal(emb, ref_emb)
    np.testing.assert_array_equal(mask, ref_mask)
    assert emb.shape == (4, 24, 64) and mask.dtype == np.int32
    assert mask[3].sum() == 1 and mask[0].sum() == 4  # "" is just </s>
    assert info["encoded"] == 3 and info["cached"] == 0  # duplicates encoded once
    assert len(list((tmp_path / "c").iterdir())) == 3

    def refuse(*args, **kwargs):
        raise AssertionError("the encoder was loaded although every prompt is cached")
    monkeypatch.setattr(te, "load_text_encoder", refuse)
    again, again_mask, info = encode_prompts(PROMPTS, "digits-t5", 24, cache_dir=tmp_path / "c")
    assert info == {"cached": 3, "encoded": 0, "encoder": encoder.fingerprint}
    np.testing.assert_array_equal(again, emb)
    np.testing.assert_array_equal(again_mask, mask)
    with pytest.raises(AssertionError, match="was loaded"):  # another token count: a miss
        encode_prompts(PROMPTS[:1], "digits-t5", 12, cache_dir=tmp_path / "c")


def test_another_encoder_or_tokenizer_misses_the_cache(tmp_path, encoder):
    other = tmp_path / "t5"
    shutil.copytree(te.resolve("digits-t5"), other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 25}))
    assert te.fingerprint(other, other) != encoder.fingerprint
    encode_prompts(PROMPTS[:1], encoder, 24, cache_dir=tmp_path / "c")
    _, _, info = encode_prompts(PROMPTS[:1], str(other), 24, cache_dir=tmp_path / "c")
    assert info["encoded"] == 1 and len(list((tmp_path / "c").iterdir())) == 2


def test_copied_edited_or_foreign_entries_are_refused(tmp_path, encoder):
    cache = tmp_path / "c"
    encode_prompts(["digit 3", "digit 4"], encoder, 24, cache_dir=cache)
    name3, name4 = (entry_name(p, encoder.fingerprint, 24) for p in ("digit 3", "digit 4"))
    shutil.copy(cache / name3, cache / "saved")
    shutil.copy(cache / name4, cache / name3)  # another prompt's entry under this name
    with pytest.raises(PromptCacheError, match=f"{name3}.*another prompt than its name says"):
        encode_prompts(["digit 3"], encoder, 24, cache_dir=cache)
    # an entry of another encoder under this encoder's name
    with np.load(cache / "saved") as data:
        arrays = {k: data[k] for k in data.files}
    marker = json.loads(str(arrays["trdq_export"][()]))
    arrays["trdq_export"] = np.array(json.dumps({**marker, "encoder": "0" * 64}))
    np.savez(cache / name3, **arrays)
    with pytest.raises(PromptCacheError, match="another text encoder or tokenizer"):
        encode_prompts(["digit 3"], encoder, 24, cache_dir=cache)
    # edited values: the digest disagrees
    arrays["trdq_export"] = np.array(json.dumps(marker))
    arrays["emb"] = arrays["emb"] + 1e-3
    np.savez(cache / name3, **arrays)
    with pytest.raises(PromptCacheError, match="checksum differs"):
        encode_prompts(["digit 3"], encoder, 24, cache_dir=cache)
    # a file the project did not write
    with zipfile.ZipFile(cache / name3, "w") as zf:
        zf.writestr("emb.npy", b"junk")
    with pytest.raises(PromptCacheError, match="not a prompt embedding written by trdq_jax"):
        encode_prompts(["digit 3"], encoder, 24, cache_dir=cache)
    assert (cache / name3).read_bytes()[:2] == b"PK"  # nothing of the user's replaced


@pytest.mark.parametrize("prompts, message", [
    ([], "non-empty list"), ("digit 3", "non-empty list"), (["ok", 3], "int at index 1")])
def test_bad_prompt_lists(prompts, message, encoder, tmp_path):
    with pytest.raises(ValueError, match=f"prompts: .*{message}"):
        encode_prompts(prompts, encoder, 24, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_long_prompt_is_truncated_with_a_warning(encoder):
    long = "a handwritten seven " * 10
    with pytest.warns(UserWarning, match=r"prompts\[1\]: \d+ tokens, truncated to max_length=24"):
        emb, mask, _ = encode_prompts(["digit 1", long], encoder, 24)
    assert mask[1].all() and emb.shape == (2, 24, 64)


def test_null_branches():
    rng = np.random.default_rng(0)
    cond = caption_conditioning(rng.normal(size=(3, 5, 4)), [[1] * 5, [1, 1, 0, 0, 0],
                                                            [1, 0, 0, 0, 0]],
                                resolution=[[64, 64]] * 3, aspect_ratio=[1.0] * 3)
    empty = (rng.normal(size=(1, 5, 4)).astype(np.float32), np.array([[1, 0, 0, 0, 0]]))
    null = null_conditioning(cond, "empty_prompt", empty=empty)
    np.testing.assert_array_equal(null["caption"], empty[0][0])
    assert null["mask"].tolist() == [1, 0, 0, 0, 0]
    both = conditioning.with_null(cond, conditioning.check_null(null, cond))
    assert both["caption"].shape == (6, 5, 4)
    np.testing.assert_array_equal(np.asarray(both["caption"][3:]), np.repeat(empty[0], 3, 0))
    np.testing.assert_array_equal(np.asarray(both["resolution"][3:]), cond["resolution"])
    y_embedding = rng.normal(size=(7, 4))
    learned = null_conditioning(cond, "learned", learned=y_embedding)
    both = conditioning.with_null(cond, conditioning.check_null(learned, cond))
    np.testing.assert_allclose(np.asarray(both["caption"][3:]),
                               np.repeat(y_embedding[None, :5], 3, 0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(both["mask"][3:]), cond["mask"])  # each prompt's
    with pytest.raises(ValueError, match="branch: expected one of"):
        null_conditioning(cond, "zeros")
    with pytest.raises(ValueError, match="diffusers checkpoints do not carry one"):
        null_conditioning(cond, "learned")
    with pytest.raises(ValueError, match=r"learned: expected y_embedding \[>= 5, 4\]"):
        null_conditioning(cond, "learned", learned=y_embedding[:3])
    with pytest.raises(ValueError, match="empty: expected the empty prompt encoded like"):
        null_conditioning(cond, "empty_prompt", empty=(empty[0][:, :4], empty[1][:, :4]))


def test_both_null_branches_sample_and_differ():
    """A tiny PixArt samples with either null branch; the guided samples differ, and with
    cfg_scale 1 (the uncond branch cancels) they agree."""
    from trdq_jax.config import PixArtConfig, SamplerConfig
    from trdq_jax.models.factory import build_model, init_params
    from trdq_jax.sampling.scan_sampler import denoise_fn_for, sample
    from trdq_jax.sampling.solvers import make_sampler
    cfg = PixArtConfig(input_size=4, hidden_size=24, depth=1, num_heads=2, caption_channels=4,
                       max_tokens=5)
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda a: a + 0.1, params)
    rng = np.random.default_rng(1)
    cond = caption_conditioning(rng.normal(size=(2, 5, 4)), [[1] * 5, [1, 1, 0, 0, 0]])
    nulls = [null_conditioning(cond, "empty_prompt",
                               empty=(rng.normal(size=(5, 4)), np.array([1, 0, 0, 0, 0]))),
             null_conditioning(cond, "learned", learned=rng.normal(size=(5, 4)))]
    sampler = make_sampler(SamplerConfig(num_steps=3))
    out = {}
    for scale in (1.0, 4.0):
        out[scale] = [np.asarray(sample(denoise_fn_for(build_model(cfg)), params, sampler, cond,
                                        null_cond=null, seed=0, cfg_scale=scale,
                                        shape=(2, 4, 4, 4))) for null in nulls]
    np.testing.assert_allclose(out[1.0][0], out[1.0][1], rtol=0, atol=1e-5)
    assert np.abs(out[4.0][0] - out[4.0][1]).max() > 1e-3


SHARDED = """
import numpy as np, jax
from trdq_jax.models.text_encoder import load_text_encoder, shard_encoder
from trdq_jax.sampling.offline import make_mesh
encoder = load_text_encoder("digits-t5")
prompts = ["a handwritten seven", "digit 3", ""]
plain = encoder.encode(prompts, 24)
sharded = shard_encoder(encoder, make_mesh(model_parallel=4))
leaves = jax.tree.leaves(sharded.params)
split = sum(1 for a in leaves if len(a.sharding.device_set) == 4 and not a.is_fully_replicated)
emb, mask = sharded.encode(prompts, 24)
np.testing.assert_allclose(emb, plain[0], rtol=0, atol=1e-5)
np.testing.assert_array_equal(mask, plain[1])
biggest = max(leaves, key=lambda a: a.size)
assert not biggest.is_fully_replicated, biggest.sharding
shard_bytes = max(s.data.nbytes for s in biggest.addressable_shards)
assert shard_bytes * 4 == biggest.nbytes, (shard_bytes, biggest.nbytes)
print("split", split, "of", len(leaves))
"""


def test_encoder_sharded_over_the_model_axis_gives_the_same_embeddings():
    """4 emulated devices: every weight split over the model axis where it divides; the
    embeddings are those of the unsharded encoder."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "split" in proc.stdout


def test_bundled_text_encoder_is_rebuilt_byte_for_byte(tmp_path):
    """scripts/make_text_encoder.py reproduces the shipped digits-t5 exactly."""
    import subprocess
    import sys
    root = te.resolve("digits-t5").parents[3]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "make_text_encoder.py"),
                           "--out", str(tmp_path / "t5")], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    shipped = te.resolve("digits-t5")
    names = sorted(p.name for p in shipped.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "t5").iterdir())
    for name in names:
        assert (shipped / name).read_bytes() == (tmp_path / "t5" / name).read_bytes(), name
