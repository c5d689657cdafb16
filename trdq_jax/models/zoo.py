"""Loading float models: the bundled ones shipped in ``trdq_jax/assets/models/NAME`` and any
``trdq_jax.checkpoint`` directory holding float params.

Each bundled entry is a checkpoint directory holding EMA params and the full ``ExperimentConfig``
that trained it (``configs/NAME.py``; the README lists the commands). Every load checks the
stored tree against the model's abstract params, so params of another model are refused with
the differing paths and shapes named.
"""
from __future__ import annotations

import os
import pathlib

from trdq_jax import checkpoint
from trdq_jax.config import ClassifierConfig, ExperimentConfig, apply_overrides
from trdq_jax.models.factory import build_model, check_params

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets" / "models"

BUNDLED = {
    "digits-dit": "class-conditional DiT on 8x8 scikit-learn digits (hidden 192 = 12*16)",
    "digits-unet": "class-conditional ADM-style UNet on 8x8 digits",
    "moving-digits-vdit": "class-conditional spatio-temporal DiT on 5-frame 12x12 moving digits",
    "digits-pixart": "text-conditioned PixArt on captioned 8x8 digits (T5: digits-t5)",
    "digits-classifier": "CNN digit classifier (8x8): digits-FID features and class match",
    "moving-digits-classifier": "CNN digit classifier for 12x12 moving-digits frames",
}

# Text encoders in the Hugging Face layout (config.json, model.safetensors, tokenizer files),
# read by trdq_jax.models.text_encoder; built by scripts/make_text_encoder.py.
TEXT_ENCODERS = {
    "digits-t5": "small frozen random T5 v1.1 encoder + BPE tokenizer trained on digit captions",
}


def available() -> list[str]:
    """Names of bundled models whose checkpoint is present in this installation."""
    return [n for n in BUNDLED if (ASSETS / n / checkpoint.METADATA_FILE).is_file()]


def path_of(name: str) -> pathlib.Path:
    if name not in BUNDLED:
        raise ValueError(f"model: unknown bundled model {name!r}; known: {sorted(BUNDLED)}")
    path = ASSETS / name
    if not (path / checkpoint.METADATA_FILE).is_file():
        raise FileNotFoundError(
            f"model: bundled model {name!r} is not present in this installation ({path}); "
            f"train it with `trdq train --config configs/{name.replace('-', '_')}.py "
            f"--export {path}` (present: {available()})")
    return path


def load_checkpoint(path: str | os.PathLike, cfg=None):
    """``(model, params, stored_cfg)`` of a float checkpoint directory.

    The params must match the stored model config's tree (paths, shapes, dtypes); ``cfg``, when
    given, must equal the stored config. A quantized checkpoint is refused with a pointer to
    ``trdq_jax.quant.load_quantized_model``.
    """
    checkpoint.read_metadata(path, kind="float")
    params, stored = checkpoint.restore(path, cfg)
    model_cfg = stored.model if isinstance(stored, ExperimentConfig) else stored
    try:
        check_params(model_cfg, params)
    except ValueError as e:
        raise checkpoint.CheckpointError(f"{str(path)!r}: {e}") from None
    return build_model(model_cfg), params, stored


def load(name: str):
    """``(model, params, cfg)`` of a bundled model: Flax module, float params, ExperimentConfig."""
    return load_checkpoint(path_of(name))


def load_float_model(model_name: str | None = None, checkpoint_dir: str | os.PathLike | None = None,
                     overrides=(), arg: str = "overrides"):
    """``(model, params, cfg, source)`` of a bundled diffusion model (default ``digits-dit``) or
    of a float checkpoint directory.

    ``overrides``: ``section.field=value`` strings for ``sampler.*`` / ``generation.*``
    (``model.*`` is fixed by the checkpoint); their errors name ``arg`` (the command line passes
    ``--set``). ``cfg`` is always an ``ExperimentConfig`` (a
    checkpoint holding only a model config gets default sampler settings); ``source`` says where
    the params came from. Classifiers are refused: they do not sample.
    """
    if model_name is not None and checkpoint_dir is not None:
        raise ValueError("model_name, checkpoint_dir: give one, not both")
    if checkpoint_dir is not None:
        model, params, cfg = load_checkpoint(checkpoint_dir)
        if not isinstance(cfg, ExperimentConfig):
            cfg = ExperimentConfig(name=pathlib.Path(checkpoint_dir).name, model=cfg)
        source = str(checkpoint_dir)
    else:
        model_name = model_name or "digits-dit"
        model, params, cfg = load(model_name)
        source = f"bundled:{model_name}"
    if isinstance(cfg.model, ClassifierConfig):
        raise ValueError(f"model: {source} is a classifier, not a diffusion model; sampling "
                         f"needs one of {[n for n in BUNDLED if 'classifier' not in n]} or a "
                         "diffusion checkpoint")
    overrides = list(overrides)
    if any(s.strip().startswith("model.") for s in overrides):
        raise ValueError(f"{arg}: model.* fields are fixed by the checkpoint")
    return model, params, apply_overrides(cfg, overrides, arg), source
