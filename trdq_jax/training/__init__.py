"""Training: ``train(cfg, workdir)`` runs an ``ExperimentConfig`` end to end (resumable).

::

    from trdq_jax.config import load_config_file
    from trdq_jax.training import train
    result = train(load_config_file("configs/digits_dit.py"), "runs/digits-dit")

Diffusion models (DiT, video DiT, UNet) train on the epsilon- or v-prediction objective of
``make_diffusion_loss``; classifiers on cross-entropy (``trdq_jax.eval.classifier``). A classifier
with a ``moving_digits`` dataset trains on the individual frames, each labelled with its video's
digit. A video DiT with ``train.image_batch_size > 0`` trains jointly on videos and stills
(``joint_image_video_loss``). At the end the EMA params (the plain params for classifiers) are
exported as a ``trdq_jax.checkpoint`` directory (``workdir/export`` unless ``export_path`` is
given).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

import jax
import numpy as np

from trdq_jax.config import (ClassifierConfig, ExperimentConfig, PixArtConfig, VideoDiTConfig,
                             to_dict)
from trdq_jax.training.diffusion import make_diffusion_loss
from trdq_jax.training.loop import (NonFiniteLossError, TrainResult, ema_update, fit,
                                    learning_rate_schedule, make_optimizer)

__all__ = ["NonFiniteLossError", "TrainResult", "ema_update", "fit", "joint_image_video_loss",
           "learning_rate_schedule", "load_training_arrays", "make_diffusion_loss",
           "make_optimizer", "train"]


def load_training_arrays(cfg: ExperimentConfig) -> tuple[np.ndarray, np.ndarray]:
    """The train split shaped for ``cfg.model``: ``(inputs float32 [N, ...], labels int32 [N])``.

    "digits" gives ``[N, S, S, 1]`` images at the model's ``input_size``; "moving_digits" gives
    ``[N, F, S, S, 1]`` videos for a video model, or their ``N * F`` frames ``[N*F, S, S, 1]``
    (label repeated per frame; ``F = classifier_frames(S)``) for a classifier.
    """
    from trdq_jax.data import classifier_frames, load_dataset

    model, dataset = cfg.model, cfg.train.dataset
    if model.in_channels != 1:
        raise ValueError(f"cfg.model.in_channels: the digit datasets have 1 channel, got "
                         f"{model.in_channels}")
    if dataset == "captioned_digits":
        if not isinstance(model, PixArtConfig):
            raise ValueError(f"cfg.train.dataset: 'captioned_digits' needs a pixart model, got "
                             f"family {model.family!r}")
        return load_dataset("digits", "train", image_size=model.input_size)
    if isinstance(model, PixArtConfig):
        raise ValueError(f"cfg.train.dataset: a pixart model trains on 'captioned_digits', got "
                         f"{dataset!r}")
    if dataset == "digits":
        if isinstance(model, VideoDiTConfig):
            raise ValueError("cfg.train.dataset: a video_dit model needs 'moving_digits', "
                             "got 'digits'")
        return load_dataset("digits", "train", image_size=model.input_size)
    if isinstance(model, VideoDiTConfig):
        return load_dataset("moving_digits", "train", num_frames=model.num_frames,
                            canvas_size=model.input_size)
    if isinstance(model, ClassifierConfig):
        videos, labels = load_dataset("moving_digits", "train", canvas_size=model.input_size,
                                      num_frames=classifier_frames(model.input_size))
        frames = videos.reshape((-1,) + videos.shape[2:])
        return frames, np.repeat(labels, videos.shape[1])
    raise ValueError(f"cfg.train.dataset: 'moving_digits' needs a video_dit or classifier "
                     f"model, got family {model.family!r}")


def run_identity(cfg: ExperimentConfig) -> dict:
    """What defines a training run (compared on resume): everything that changes the weights.

    Sampler and generation settings other than the diffusion process are not part of it, so
    a finished run can be re-exported with, e.g., a retuned default guidance scale.
    """
    d = to_dict(cfg)
    if not d["train"]["image_batch_size"]:
        # Added later; left out when off so that runs started before it still resume.
        del d["train"]["image_batch_size"]
    return {"name": d["name"], "model": d["model"], "train": d["train"],
            "diffusion": {k: d["sampler"][k] for k in ("schedule", "num_train_steps",
                                                       "prediction")}}


def _make_loss(cfg: ExperimentConfig, model):
    if isinstance(cfg.model, ClassifierConfig):
        from trdq_jax.eval.classifier import make_classifier_loss
        return make_classifier_loss(model)
    loss_fn = make_diffusion_loss(model, cfg.model, schedule=cfg.sampler.schedule,
                                  num_train_steps=cfg.sampler.num_train_steps,
                                  min_snr_gamma=cfg.train.min_snr_gamma,
                                  prediction=cfg.sampler.prediction)
    return joint_image_video_loss(loss_fn) if cfg.train.image_batch_size else loss_fn


def joint_image_video_loss(loss_fn):
    """Wrap a diffusion ``loss_fn`` for joint image-video training.

    The returned ``(params, ((videos, y), (stills, y_stills)), rng) -> (loss, metrics)`` takes
    videos ``[B, F, H, W, C]`` and stills ``[B_i, 1, H, W, C]`` and returns the mean over all
    ``B*F + B_i`` frames, ``(B*F * L_video + B_i * L_stills) / (B*F + B_i)``: ``loss_fn``'s losses
    are per-pixel means, so this is the loss of one batch holding every frame. The key is split
    ``video_key, stills_key = jax.random.split(rng)``. Metrics: the joint ``mse`` plus
    ``video_mse`` and ``image_mse``.
    """
    def joint(params, batch, rng):
        (videos, labels), (stills, still_labels) = batch
        if videos.ndim != 5 or stills.ndim != 5 or stills.shape[1] != 1:
            raise ValueError(f"batch: expected videos [B, F, H, W, C] and stills "
                             f"[B_i, 1, H, W, C], got {videos.shape} and {stills.shape}")
        video_key, stills_key = jax.random.split(rng)
        video_loss, video_metrics = loss_fn(params, (videos, labels), video_key)
        still_loss, still_metrics = loss_fn(params, (stills, still_labels), stills_key)
        w_video, w_still = videos.shape[0] * videos.shape[1], stills.shape[0]
        mix = lambda a, b: (w_video * a + w_still * b) / (w_video + w_still)  # noqa: E731
        metrics = {k: mix(video_metrics[k], still_metrics[k]) for k in video_metrics}
        metrics.update(video_mse=video_metrics["mse"], image_mse=still_metrics["mse"])
        return mix(video_loss, still_loss), metrics

    return joint


def _training_batches(cfg: ExperimentConfig, arrays: tuple[np.ndarray, np.ndarray]):
    """``start_step -> iterator`` of the batches of ``fit`` (see ``batch_iterator``).

    With ``image_batch_size`` each batch is ``((videos, y), (stills, y_stills))``: stills are
    single frames of the training videos, ``[B_i, 1, H, W, C]``, shuffled by their own stream
    (seed ``seed + 1``) so that a resumed run sees the same stills too.
    """
    from trdq_jax.data import batch_iterator

    train_cfg = cfg.train
    if train_cfg.dataset == "captioned_digits":
        from trdq_jax.training.text import caption_bank, captioned_batches
        bank = caption_bank(train_cfg.text_encoder, cfg.model.max_tokens,
                            cfg.model.caption_channels)
        return lambda start: captioned_batches(
            batch_iterator(arrays, train_cfg.batch_size, train_cfg.seed, start_step=start),
            bank, train_cfg.seed, start, train_cfg.caption_dropout_prob)
    if not train_cfg.image_batch_size:
        return lambda start: batch_iterator(arrays, train_cfg.batch_size, train_cfg.seed,
                                            start_step=start)
    videos, labels = arrays
    stills = videos.reshape((-1, 1) + videos.shape[2:])
    still_labels = np.repeat(labels, videos.shape[1])
    if train_cfg.image_batch_size > len(stills):
        raise ValueError(f"cfg.train.image_batch_size: expected <= {len(stills)} training frames, "
                         f"got {train_cfg.image_batch_size}")
    return lambda start: zip(
        batch_iterator(arrays, train_cfg.batch_size, train_cfg.seed, start_step=start),
        batch_iterator((stills, still_labels), train_cfg.image_batch_size, train_cfg.seed + 1,
                       start_step=start))


def train(cfg: ExperimentConfig, workdir: str | os.PathLike, *, resume: bool = True,
          progress: bool = True, export_path: str | os.PathLike | None = None) -> TrainResult:
    """Train the model of ``cfg`` on its dataset and export the result.

    Args:
      cfg: the experiment; ``cfg.train`` drives the loop, ``cfg.sampler.schedule`` and
        ``cfg.sampler.num_train_steps`` define the diffusion process.
      workdir: checkpoints, ``config.json`` and ``metrics.jsonl`` (see ``fit``); resumable.
      resume: continue a killed run in ``workdir`` (False refuses a workdir with checkpoints).
      progress: tqdm progress bar on a terminal.
      export_path: where to write the final checkpoint (default ``workdir/export``); an existing
        float checkpoint there is replaced, anything else is refused before training starts
        (``trdq_jax.files``). Diffusion models export their EMA params cast to bfloat16 (the stored config
        says ``param_dtype='bfloat16'``), classifiers their plain float32 params.
    Returns:
      the ``TrainResult`` of ``fit``.
    """
    if not isinstance(cfg, ExperimentConfig):
        raise ValueError(f"cfg: expected an ExperimentConfig, got {type(cfg).__name__}")
    from trdq_jax import checkpoint, files
    from trdq_jax.models.factory import build_model, init_params

    if pathlib.Path(workdir).exists() and not pathlib.Path(workdir).is_dir():
        raise ValueError(f"workdir: {str(workdir)!r} exists and is not a directory")
    path = pathlib.Path(workdir) / "export" if export_path is None else pathlib.Path(export_path)
    files.resolve_target(path, kind="float", overwrite=True, is_dir=True, arg="export_path")
    arrays = load_training_arrays(cfg)
    train_cfg = cfg.train
    if train_cfg.batch_size > len(arrays[0]):
        raise ValueError(f"cfg.train.batch_size: expected <= {len(arrays[0])} training examples, "
                         f"got {train_cfg.batch_size}")
    model = build_model(cfg.model)
    params = init_params(cfg.model, jax.random.fold_in(jax.random.key(train_cfg.seed), 0))

    result = fit(_make_loss(cfg, model), params, _training_batches(cfg, arrays), train_cfg,
                 workdir, resume=resume,
                 progress=progress, run_config=run_identity(cfg))
    is_classifier = isinstance(cfg.model, ClassifierConfig)
    final = jax.device_get(result.params if is_classifier else result.ema_params)
    export_cfg = cfg
    if not is_classifier:
        # Diffusion models ship bf16 weights (half the bytes; the float reference that
        # quantization is compared with, as FP16 is in the paper). Compute stays in cfg.model.dtype.
        final = jax.tree.map(lambda p: np.asarray(p).astype(jax.numpy.bfloat16), final)
        export_cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, param_dtype="bfloat16"))
    checkpoint.save(path, final, export_cfg, overwrite=True, arg="export_path",
                    extra={"train_step": result.step, "ema": not is_classifier})
    return result
