"""``train``: dataset shaping per model family, end-to-end run with export, and the configs."""
import dataclasses
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trdq_jax import checkpoint
from trdq_jax.config import (ClassifierConfig, DiTConfig, ExperimentConfig, TrainConfig,
                             UNetConfig, VideoDiTConfig, load_config_file)
from trdq_jax.data import load_digits, load_moving_digits
from trdq_jax.training import (_training_batches, joint_image_video_loss, load_training_arrays,
                               run_identity, train)

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def _experiment(model, dataset="digits", **train_kw):
    kw = dict(dataset=dataset, num_steps=6, batch_size=8, warmup_steps=2, checkpoint_every=3,
              log_every=3)
    kw.update(train_kw)
    return ExperimentConfig(name="tiny", model=model, train=TrainConfig(**kw))


@pytest.mark.parametrize("canvas, frames_per_video", [(16, 8), (12, 5)])
def test_moving_digits_frames_for_a_classifier(canvas, frames_per_video):
    cfg = _experiment(ClassifierConfig(input_size=canvas), "moving_digits")
    frames, labels = load_training_arrays(cfg)
    videos, video_labels = load_moving_digits("train", num_frames=frames_per_video,
                                              canvas_size=canvas)
    n = frames_per_video
    assert frames.shape == (videos.shape[0] * n, canvas, canvas, 1)
    assert labels.shape == (frames.shape[0],)
    # Frame n*i + f is frame f of video i, labelled with the video's digit.
    for i, f in ((0, 0), (3, n - 2), (len(videos) - 1, n - 1)):
        np.testing.assert_array_equal(frames[n * i + f], videos[i, f])
        assert labels[n * i + f] == video_labels[i]


def test_dataset_model_mismatch_is_refused():
    video = VideoDiTConfig(num_frames=8, input_size=16, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="cfg.train.dataset: a video_dit model needs"):
        load_training_arrays(_experiment(video, "digits"))
    with pytest.raises(ValueError, match="cfg.train.dataset: 'moving_digits' needs"):
        load_training_arrays(_experiment(UNetConfig(input_size=8), "moving_digits"))
    with pytest.raises(ValueError, match="cfg.model.in_channels"):
        load_training_arrays(_experiment(UNetConfig(input_size=8, in_channels=3)))
    videos, _ = load_training_arrays(_experiment(video, "moving_digits"))
    np.testing.assert_array_equal(videos, load_moving_digits("train")[0])


def test_train_dit_end_to_end_exports_ema(tmp_path):
    model = DiTConfig(input_size=8, in_channels=1, patch_size=4, hidden_size=16, depth=1,
                      num_heads=2, num_classes=10, learn_sigma=False)
    cfg = _experiment(model, ema_decay=0.5)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.step == 6
    exported_cfg = dataclasses.replace(cfg, model=dataclasses.replace(model, param_dtype="bfloat16"))
    params, stored = checkpoint.restore(tmp_path / "run" / "export", exported_cfg)
    assert stored == exported_cfg
    meta = json.loads((tmp_path / "run" / "export" / "metadata.json").read_text())
    assert meta["extra"] == {"train_step": 6, "ema": True}
    for got, ema, raw in zip(jax.tree.leaves(params), jax.tree.leaves(result.ema_params),
                             jax.tree.leaves(result.params)):
        assert got.dtype == jnp.bfloat16  # shipped as bf16: EMA rounded to nearest bf16
        np.testing.assert_array_equal(np.asarray(got, np.float32),
                                      np.asarray(np.asarray(ema).astype(jnp.bfloat16), np.float32))
    # EMA with decay 0.5 lags the raw params: some leaf differs.
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(result.ema_params),
                                                     jax.tree.leaves(result.params)))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["name"] == "tiny"
    # Re-running the finished run is a no-op that re-exports the same params elsewhere.
    again = train(cfg, tmp_path / "run", progress=False, export_path=tmp_path / "copy")
    assert again.step == 6
    copy, _ = checkpoint.restore(tmp_path / "copy", exported_cfg)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(copy)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The same workdir with another experiment config is refused.
    other = dataclasses.replace(cfg, name="other")
    with pytest.raises(ValueError, match="different config: name: stored 'tiny', given 'other'"):
        train(other, tmp_path / "run", progress=False)


def test_train_classifier_exports_plain_params(tmp_path):
    cfg = _experiment(ClassifierConfig(input_size=8, width=8, feature_dim=16))
    result = train(cfg, tmp_path, progress=False)
    params, _ = checkpoint.restore(tmp_path / "export", cfg)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(result.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "accuracy" in result.history[-1]


@pytest.mark.parametrize("name,family", [("digits_dit", "dit"), ("digits_unet", "unet"),
                                         ("moving_digits_vdit", "video_dit"),
                                         ("digits_classifier", "classifier"),
                                         ("moving_digits_classifier", "classifier")])
def test_bundled_configs_load_and_fit_their_data(name, family):
    cfg = load_config_file(CONFIGS / f"{name}.py")
    assert cfg.name == name.replace("_", "-") and cfg.model.family == family
    inputs, labels = load_training_arrays(cfg)
    video = load_config_file(CONFIGS / "moving_digits_vdit.py").model
    canvas = (video.input_size, video.input_size, 1)  # the judge's frames fit the generator's
    expected = {"digits": load_digits("train")[0].shape[1:],
                "moving_digits": canvas if family == "classifier"
                else (video.num_frames,) + canvas}[cfg.train.dataset]
    assert inputs.shape[1:] == expected and len(labels) == len(inputs)
    if family == "dit":
        assert cfg.model.hidden_size == 192 and cfg.model.hidden_size // cfg.model.num_heads == 32


# ----------------------------------------------------------------------------- joint image-video

def test_joint_loss_is_the_mean_over_every_frame():
    # A stand-in loss: the per-pixel mean of x0 (what make_diffusion_loss's MSE is, per pixel),
    # so the joint loss must be the mean over all pixels of all frames, videos and stills alike.
    def pixel_mean(params, batch, rng):
        x0, _ = batch
        return jnp.mean(x0) * params, {"mse": jnp.mean(x0 ** 2)}

    rng = np.random.default_rng(0)
    videos, stills = rng.normal(size=(3, 4, 6, 6, 1)), rng.normal(1.0, size=(5, 1, 6, 6, 1))
    joint = joint_image_video_loss(pixel_mean)
    loss, metrics = joint(2.0, ((videos, np.zeros(3)), (stills, np.zeros(5))), jax.random.key(0))
    every_frame = np.concatenate([videos.reshape(-1, 6, 6, 1), stills[:, 0]])
    np.testing.assert_allclose(float(loss), 2.0 * every_frame.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["mse"]), (every_frame ** 2).mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["video_mse"]), (videos ** 2).mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["image_mse"]), (stills ** 2).mean(), rtol=1e-6)
    with pytest.raises(ValueError, match=r"^batch: expected videos .* and stills"):
        joint(2.0, ((videos, np.zeros(3)), (videos, np.zeros(3))), jax.random.key(0))


VIDEO = VideoDiTConfig(num_frames=5, input_size=12, in_channels=1, patch_size=4, hidden_size=16,
                       depth=1, num_heads=2, num_classes=10, learn_sigma=False,
                       temporal_attention="video")


def test_joint_batches_pair_videos_with_stills_from_the_training_videos():
    cfg = _experiment(VIDEO, "moving_digits", image_batch_size=7)
    videos, labels = load_training_arrays(cfg)
    frames = {(v.tobytes(), int(y)) for vid, y in zip(videos, labels) for v in vid}
    stream = _training_batches(cfg, (videos, labels))
    first = list(itertools.islice(stream(0), 4))
    for (vid, vid_y), (still, still_y) in first:
        assert vid.shape == (8, 5, 12, 12, 1) and vid_y.shape == (8,)
        assert still.shape == (7, 1, 12, 12, 1) and still_y.shape == (7,)
        assert all((s[0].tobytes(), int(y)) in frames for s, y in zip(still, still_y))
    # Resuming at step 2 yields what steps 2 and 3 were.
    for a, b in zip(first[2:], itertools.islice(stream(2), 2)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    too_many = _experiment(VIDEO, "moving_digits", image_batch_size=len(videos) * 5 + 1)
    with pytest.raises(ValueError, match=r"^cfg.train.image_batch_size: expected <= "):
        _training_batches(too_many, (videos, labels))


def test_train_video_dit_jointly_with_stills(tmp_path):
    cfg = _experiment(VIDEO, "moving_digits", num_steps=2, checkpoint_every=2, log_every=1,
                      batch_size=2, image_batch_size=6)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.step == 2
    last = result.history[-1]
    assert {"video_mse", "image_mse", "mse"} <= set(last)
    # Every frame weighs the same: 2 videos x 5 frames and 6 stills.
    np.testing.assert_allclose(last["mse"], (10 * last["video_mse"] + 6 * last["image_mse"]) / 16,
                               rtol=1e-5)


def test_run_identity_keeps_what_changes_the_weights():
    cfg = _experiment(VIDEO, "moving_digits")
    identity = run_identity(cfg)
    assert identity["diffusion"] == {"schedule": "linear", "num_train_steps": 1000,
                                     "prediction": "epsilon"}
    # A retuned guidance scale or solver is the same run; a new objective is not.
    retuned = dataclasses.replace(cfg, sampler=dataclasses.replace(cfg.sampler, cfg_scale=9.0,
                                                                   solver="ddpm"))
    assert run_identity(retuned) == identity
    v = dataclasses.replace(cfg, sampler=dataclasses.replace(cfg.sampler, prediction="v"))
    assert run_identity(v) != identity
    # image_batch_size appears only when on, so workdirs written before the field existed resume.
    assert "image_batch_size" not in identity["train"]
    joint = _experiment(VIDEO, "moving_digits", image_batch_size=4)
    assert run_identity(joint)["train"]["image_batch_size"] == 4
