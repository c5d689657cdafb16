"""A latent DiT with its VAE through quantize, sample, generate (killed and resumed), export and
eval: shards keep latents, PNGs and the export are the decoded pixels (issue #22)."""
import json
import re
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from trdq_jax import checkpoint
from trdq_jax.config import DiTConfig, ExperimentConfig, SamplerConfig, VAEConfig
from trdq_jax.models.factory import init_params
from trdq_jax.models.vae import decode_latents, init_vae_params
from trdq_jax.sampling import decode
from trdq_jax.sampling.offline import load_generated

from tests.sampling.test_offline import ROOT

DIT = DiTConfig(input_size=4, in_channels=4, patch_size=2, hidden_size=32, depth=1,
                num_heads=2, num_classes=3)
VAE = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                sample_size=8, scaling_factor=0.5, shift_factor=0.1)
CFG = ExperimentConfig(name="tiny-latent", model=DIT, sampler=SamplerConfig(num_steps=4))


def _perturbed(tree, seed: int, scale: float):
    """Every leaf moved off its initial value (DiT zero-initialises adaLN and the final layer)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [np.asarray(x + scale * jax.random.normal(k, x.shape))
                                        for x, k in zip(leaves, keys)])


def vae_params():
    return _perturbed(init_vae_params(VAE, jax.random.key(2)), 3, 0.05)


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("latent") / "ck"
    params = _perturbed(init_params(DIT, jax.random.key(0)), 1, 0.02)
    checkpoint.save(path, params, CFG, vae=(VAE, vae_params()))
    return path


def _trdq(*args, crash=None, devices=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.pop("TRDQ_CRASH_AT", None)
    if crash:
        env["TRDQ_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "trdq_jax.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=900)


def _pngs(directory):
    files = sorted((directory / "images").rglob("*.png"))
    return np.stack([np.asarray(Image.open(f)) for f in files])


# ----------------------------------------------------------------------------- fast


def test_decoder_chunks_give_the_whole_batch_decode():
    latents = np.asarray(jax.random.normal(jax.random.key(4), (5, 4, 4, 4)))
    params = vae_params()
    whole = np.asarray(decode.make_decoder(VAE, params, chunk=None)(latents))
    chunked = np.asarray(decode.make_decoder(VAE, params, chunk=2)(latents))  # 2 + 2 + 1 (padded)
    images = np.asarray(jax.jit(decode_latents, static_argnums=1)(params, VAE, latents),
                        np.float64)
    want = np.clip(np.floor(127.5 * images + 128.0), 0, 255).astype(np.uint8)  # DiT's rounding
    assert whole.shape == (5, 8, 8, 3) and whole.dtype == np.uint8
    assert np.array_equal(chunked, whole)
    assert np.abs(whole.astype(int) - want).max() <= 1  # float32 vs float64 at a .5 boundary
    assert (whole != want).mean() < 0.01


def test_vae_is_checked_against_the_denoiser():
    assert decode.pixel_shape(DIT, VAE) == (8, 8, 3)
    with pytest.raises(ValueError, match=r"^vae: the VAE's latent_channels=3 disagree with the "
                                         r"denoiser's 4 sample channels"):
        decode.check_vae_for(DIT, VAEConfig(latent_channels=3))


def test_a_checkpoint_keeps_its_vae_and_refuses_an_edited_one(latent_ckpt, tmp_path):
    cfg, params = checkpoint.restore_vae(latent_ckpt)
    assert cfg == VAE
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(vae_params())):
        np.testing.assert_array_equal(a, b)
    meta = json.loads((latent_ckpt / "metadata.json").read_text())
    meta["vae"]["config"]["scaling_factor"] = 0.25
    edited = tmp_path / "edited"
    import shutil
    shutil.copytree(latent_ckpt, edited)
    (edited / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="vae.config.scaling_factor"):
        checkpoint.restore_vae(edited)


def test_generate_refuses_a_vae_of_another_latent_width(tmp_path):
    bad = tmp_path / "bad"
    other = VAEConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                      latent_channels=3)
    checkpoint.save(bad, init_params(DIT, jax.random.key(0)), CFG,
                    vae=(other, init_vae_params(other, jax.random.key(1))))
    run = _trdq("generate", "--checkpoint", bad, "--num-samples", 2, "--out", tmp_path / "g")
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "latent_channels=3 disagree" in lines[0], run.stderr
    assert not (tmp_path / "g").exists()


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_quantize_sample_generate_resume_export_and_eval_a_latent_model(latent_ckpt, tmp_path):
    q, s, g, npz = tmp_path / "q", tmp_path / "s", tmp_path / "g", tmp_path / "fid.npz"
    run = _trdq("quantize", "--checkpoint", latent_ckpt, "--out", q, "--per-class", 1,
                "--no-choose")
    assert run.returncode == 0, run.stderr[-2000:]
    vae_cfg, vae = checkpoint.restore_vae(q)  # the float VAE travels with the quantized model
    assert vae_cfg == VAE

    run = _trdq("sample", "--quantized", q, "--out", s, "--per-class", 1, "--labels", "2,0")
    assert run.returncode == 0, run.stderr[-2000:]
    with np.load(s / "samples.npz") as data:
        assert data["samples"].shape == (2, 4, 4, 4) and list(data["labels"]) == [2, 0]
        assert data["pixels"].shape == (2, 8, 8, 3) and data["pixels"].dtype == np.uint8
        np.testing.assert_array_equal(data["pixels"],
                                      decode.make_decoder(VAE, vae)(data["samples"]))

    args = ["generate", "--quantized", q, "--num-samples", 6, "--batch-size", 2,
            "--shard-size", 2, "--out", g]
    killed = _trdq(*args, crash="generate-2-image-written")  # shard 2 half-written
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = _trdq(*args, "--export-npz", npz)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == 2 and summary["generated"] == 4, summary
    latents, labels = load_generated(g)
    assert latents.shape == (6, 4, 4, 4) and list(labels) == [0, 1, 2, 0, 1, 2]
    pngs = _pngs(g)
    assert pngs.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(pngs, decode.make_decoder(VAE, vae)(latents))
    with np.load(npz) as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (6, 8, 8, 3)
        np.testing.assert_array_equal(data["arr_0"], pngs)
        np.testing.assert_array_equal(data["arr_1"], labels)

    run = _trdq("eval", "--quantized", q, "--reference", latent_ckpt, "--labels", "1")
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["num_samples"] == 1 and report["pixel_shape"] == [8, 8, 3]
    assert 20 < report["latent_psnr_db"] < 200, report  # close, but not the float model itself
    assert report["pixel_psnr_db"] > 20, report  # inf when uint8 rounding hides the difference


@pytest.mark.slow
def test_the_decode_runs_sharded_and_gives_the_one_device_pictures(latent_ckpt, tmp_path):
    args = ["generate", "--checkpoint", latent_ckpt, "--num-samples", 8, "--batch-size", 4]
    one = _trdq(*args, "--out", tmp_path / "one")
    four = _trdq(*args, "--decode-batch", 2, "--out", tmp_path / "four", devices=4)
    assert one.returncode == 0 and four.returncode == 0, (one.stderr[-1500:], four.stderr[-1500:])
    summary = json.loads(four.stdout.strip().splitlines()[-1])
    assert summary["devices"] == 4 and 0 < summary["decode_seconds"] < summary["seconds"]
    a, b = _pngs(tmp_path / "one").astype(int), _pngs(tmp_path / "four").astype(int)
    assert a.shape == (8, 8, 8, 3)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01  # float rounding at most


# ----------------------------------------------------------------------------- trdq convert --vae


FIXTURES = ROOT / "tests" / "models" / "fixtures"


def _official_file(tmp_path, in_ch=4):
    from tests.models import official_dit
    sd = official_dit.random_state_dict(
        np.random.default_rng(0), depth=1, hidden=32, in_ch=in_ch, patch=2, num_classes=3,
        mlp_hidden=128, out_ch=2 * in_ch, n_tokens=4)
    path = tmp_path / "dit.npz"
    np.savez(path, **sd)
    return path


@pytest.mark.parametrize("source", ["diffusers", "ldm"])
def test_convert_stores_the_vae_users_hold(tmp_path, capsys, source):
    from trdq_jax.cli import main
    from trdq_jax.models.convert_vae import load_diffusers_vae
    vae_path = FIXTURES / ("tiny_vae" if source == "diffusers" else "tiny_vae_ldm.safetensors")
    out = tmp_path / "ck"
    config = [] if source == "diffusers" else [  # LDM files carry no config
        "--vae-config", str(FIXTURES / "tiny_vae" / "config.json")]
    assert main(["convert", "--input", str(_official_file(tmp_path)), "--num-heads", "2",
                 "--vae", str(vae_path), *config, "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    cfg, params = checkpoint.restore_vae(out)
    want_cfg, want = load_diffusers_vae(FIXTURES / "tiny_vae")
    assert printed["vae"]["latent_channels"] == 4 and cfg == want_cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def _one_line_error(capsys, argv, tmp_path, pattern):
    from trdq_jax.cli import main
    out = tmp_path / "ck"
    assert main(["convert", *argv, "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(pattern, err[0]), err
    assert not out.exists()


def test_convert_refuses_bad_vaes_in_one_line(tmp_path, capsys):
    import shutil
    dit = ["--input", str(_official_file(tmp_path)), "--num-heads", "2"]
    _one_line_error(capsys, [*dit, "--vae", str(tmp_path / "absent")], tmp_path,
                    r"--vae: no such directory .*absent")
    foreign = tmp_path / "foreign"
    shutil.copytree(FIXTURES / "tiny_vae", foreign)
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config,
                                                     "_class_name": "UNet2DConditionModel"}))
    _one_line_error(capsys, [*dit, "--vae", str(foreign)], tmp_path, r"--vae: .*UNet2DCondition")
    (foreign / "config.json").unlink()
    _one_line_error(capsys, [*dit, "--vae", str(foreign)], tmp_path,
                    r"--vae: .*config\.json.*missing")
    edited = tmp_path / "edited"
    shutil.copytree(FIXTURES / "tiny_vae", edited)
    (edited / "config.json").write_text(json.dumps({**config, "latent_channels": 3}))
    _one_line_error(capsys, [*dit, "--vae", str(edited)], tmp_path, r"--vae: .*(mis-shaped|shape)")
    _one_line_error(capsys, [*dit, "--vae", str(FIXTURES / "tiny_vae_ldm.safetensors")],
                    tmp_path, r"--vae: .* does not hold the SD-VAE .*--vae-config")
    three = tmp_path / "three"
    three.mkdir()
    _one_line_error(capsys, ["--input", str(_official_file(three, in_ch=3)), "--num-heads", "2",
                             "--vae", str(FIXTURES / "tiny_vae")], tmp_path,
                    r"--vae: the VAE's latent_channels=4 disagree with the denoiser's 3")


def test_calibration_labels_spread_over_many_classes():
    from trdq_jax.quant.pipeline import spread_labels
    labels = spread_labels(1000, 32)
    assert len(set(labels.tolist())) == 32 and labels[0] == 0 and labels[-1] == 968
    assert set(np.diff(labels).tolist()) == {31, 32}  # evenly spread, not bunched
    np.testing.assert_array_equal(spread_labels(3, 6), [0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="^num_samples: expected a positive int"):
        spread_labels(3, 0)
