"""Judging samples with the bundled classifiers: class match and digits-FID (what ``trdq eval``
and ``trdq demo`` report).

digits-FID is the Fréchet distance between penultimate-layer features of our own digits
classifier (not Inception): comparable across runs of this project only.
"""
from __future__ import annotations

import time

import numpy as np

from trdq_jax.config import VideoDiTConfig


def heldout_data(model_cfg) -> tuple[np.ndarray, np.ndarray]:
    """The held-out real data matching a model: digits test images or moving-digits test videos."""
    from trdq_jax.data import load_digits, load_moving_digits
    if isinstance(model_cfg, VideoDiTConfig):
        return load_moving_digits("test", num_frames=model_cfg.num_frames,
                                  canvas_size=model_cfg.input_size)
    return load_digits("test", image_size=model_cfg.input_size)


def classifier_for(samples: np.ndarray) -> str:
    return "moving-digits-classifier" if samples.ndim == 5 else "digits-classifier"


def judge(samples: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> dict:
    """Class match of ``samples`` and digits-FID against ``reference`` (bundled classifier).

    Returns ``{"classifier", "class_match": {...}, "digits_fid"}``; samples are clipped to
    [-1, 1] first (the data range).
    """
    from trdq_jax.eval.metrics import class_match_accuracy, digits_fid
    from trdq_jax.eval.classifier import make_classify_fn, make_feature_fn
    from trdq_jax.models import zoo
    name = classifier_for(samples)
    clf, clf_params, _ = zoo.load(name)
    samples = np.clip(samples, -1.0, 1.0)
    return {"classifier": name,
            "class_match": class_match_accuracy(samples, labels, make_classify_fn(clf, clf_params)),
            "digits_fid": digits_fid(samples, reference, make_feature_fn(clf, clf_params))}


def evaluate_classifier(name: str) -> dict:
    """Held-out accuracy of a bundled classifier (videos: every frame of the test videos)."""
    from trdq_jax.data import classifier_frames, load_digits, load_moving_digits
    from trdq_jax.eval.metrics import class_match_accuracy
    from trdq_jax.eval.classifier import make_classify_fn
    from trdq_jax.models import zoo
    clf, params, cfg = zoo.load(name)
    if cfg.train.dataset == "moving_digits":
        x, y = load_moving_digits("test", canvas_size=cfg.model.input_size,
                                  num_frames=classifier_frames(cfg.model.input_size))
    else:
        x, y = load_digits("test", image_size=cfg.model.input_size)
    return {"model": name, "heldout": class_match_accuracy(x, y, make_classify_fn(clf, params))}


def evaluate_generator(name: str, per_class: int = 30, seed: int = 0,
                       cfg_scale: float | None = None) -> dict:
    """Sample a bundled diffusion model at its default CFG and judge the samples."""
    from trdq_jax.sampling.generate import generate
    from trdq_jax.models import zoo
    model, params, cfg = zoo.load(name)
    labels = np.repeat(np.arange(cfg.model.num_classes), per_class)
    t0 = time.perf_counter()
    samples = generate(model, params, cfg, labels, seed=seed, cfg_scale=cfg_scale, progress=True)
    seconds = time.perf_counter() - t0
    reference, _ = heldout_data(cfg.model)
    return {"model": name, "num_samples": int(len(labels)), "seed": seed,
            "cfg_scale": cfg.sampler.cfg_scale if cfg_scale is None else cfg_scale,
            "sampler": f"{cfg.sampler.solver} {cfg.sampler.num_steps} steps",
            "sampling_seconds": round(seconds, 2), **judge(samples, labels, reference)}


REPORT_FORMAT = "trdq_jax.eval/1"


def evaluate_bundled(name: str, per_class: int = 30, seed: int = 0,
                     cfg_scale: float | None = None) -> dict:
    """``evaluate_classifier`` or ``evaluate_generator`` of a bundled model, by its kind."""
    from trdq_jax import checkpoint
    from trdq_jax.models import zoo
    meta = checkpoint.read_metadata(zoo.path_of(name))
    if meta["config"].get("model", {}).get("family") == "classifier":
        return evaluate_classifier(name)
    return evaluate_generator(name, per_class, seed, cfg_scale)


def save_report(path, results: list[dict], *, overwrite: bool = False, arg: str = "path"):
    """Write evaluation ``results`` as a JSON report (kind ``"report"``; ``.json`` only)."""
    from trdq_jax import files
    if not str(path).lower().endswith(".json"):
        raise ValueError(f"{arg}: expected a .json file name, got {str(path)!r}")
    report = {"format": REPORT_FORMAT, "kind": "report", "results": results}
    return files.write_file(path, lambda tmp: files.write_json(tmp, report), kind="report",
                            overwrite=overwrite, arg=arg)
