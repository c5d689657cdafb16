"""Bundled trained models, shipped inside the package under ``trdq_jax/assets/models/NAME``.

Each entry is a ``trdq_jax.checkpoint`` directory holding EMA params and the full
``ExperimentConfig`` that trained it (``configs/NAME.py``; the README lists the commands).
"""
from __future__ import annotations

import pathlib

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets" / "models"

BUNDLED = {
    "digits-dit": "class-conditional DiT on 8x8 scikit-learn digits (hidden 192 = 12*16)",
    "digits-unet": "class-conditional ADM-style UNet on 8x8 digits",
    "moving-digits-vdit": "class-conditional spatio-temporal DiT on 5-frame 12x12 moving digits",
    "digits-classifier": "CNN digit classifier (8x8): digits-FID features and class match",
    "moving-digits-classifier": "CNN digit classifier for 12x12 moving-digits frames",
}


def available() -> list[str]:
    """Names of bundled models whose checkpoint is present in this installation."""
    return [n for n in BUNDLED if (ASSETS / n / "metadata.json").is_file()]


def path_of(name: str) -> pathlib.Path:
    if name not in BUNDLED:
        raise ValueError(f"name: unknown bundled model {name!r}; known: {sorted(BUNDLED)}")
    path = ASSETS / name
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(
            f"name: bundled model {name!r} is not present in this installation ({path}); "
            f"train it with `trdq train --config configs/{name.replace('-', '_')}.py "
            f"--export {path}` (present: {available()})")
    return path


def load(name: str):
    """``(model, params, cfg)`` of a bundled model: Flax module, float params, ExperimentConfig."""
    from trdq_jax import checkpoint
    from trdq_jax.models import build_model

    params, cfg = checkpoint.restore(path_of(name))
    return build_model(cfg.model), params, cfg
