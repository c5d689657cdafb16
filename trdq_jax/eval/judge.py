"""Judging samples with the bundled classifiers: class match and digits-FID, with bootstrap
intervals (what ``trdq eval`` and ``trdq demo`` report).

- **Labels.** Every evaluation lays its labels out with ``eval_labels``: sample ``i`` is
  generated for class ``i % num_classes`` (every class in turn), the layout of ``trdq demo``,
  the notebooks and ``trdq generate``'s default. Sample ``i`` depends only on ``(seed, i,
  label_i)``, so another layout gives other samples and other numbers at the same settings.
- **Judges.** Images go to the bundled ``digits-classifier`` (8x8x1), videos frame by frame to
  ``moving-digits-classifier`` (12x12x1 frames); class ``c`` must be the digit ``c``. Samples
  are clipped to [-1, 1] (the data range) first.
- **digits-FID** is the Fréchet distance between the classifier's penultimate features of the
  samples and of the held-out real data (300 digits, or their moving-digits videos). It is
  comparable across runs of this project only, and only at equal sample counts (the estimate
  is biased upwards for small N).
- **Intervals.** 95% percentile bootstrap over the generated samples: ``BOOTSTRAP_RESAMPLES``
  resamples with replacement (videos resampled whole) drawn by
  ``numpy.random.default_rng(BOOTSTRAP_SEED)``; the held-out reference set stays fixed, so the
  interval covers the variability of the samples, not of the reference. digits-FID's
  resampled values are re-centred on the estimate first (``metrics.bootstrap_fid``): drawing
  with replacement repeats samples, which raises the distance by itself.
"""
from __future__ import annotations

import functools
import pathlib
import time

import numpy as np

from trdq_jax.config import VideoDiTConfig

REPORT_FORMAT = "trdq_jax.eval/2"
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
IMAGE_CLASSIFIER, VIDEO_CLASSIFIER = "digits-classifier", "moving-digits-classifier"


def eval_labels(num_classes: int, per_class: int) -> np.ndarray:
    """The one label layout of every evaluation: int32 ``[num_classes * per_class]``, sample
    ``i`` labelled ``i % num_classes`` (0, 1, ..., K-1, 0, 1, ...)."""
    for name, value in (("num_classes", num_classes), ("per_class", per_class)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    from trdq_jax.sampling.offline import default_labels
    return default_labels(int(num_classes) * int(per_class), int(num_classes)).astype(np.int32)


def classifier_for(samples: np.ndarray) -> str:
    return VIDEO_CLASSIFIER if samples.ndim == 5 else IMAGE_CLASSIFIER


@functools.lru_cache(maxsize=None)
def _judge_fns(name: str):
    """``(classifier config, classify_fn, feature_fn)`` of a bundled classifier (jitted once)."""
    from trdq_jax.eval.classifier import make_classify_fn, make_feature_fn
    from trdq_jax.models import zoo
    clf, params, cfg = zoo.load(name)
    return cfg.model, make_classify_fn(clf, params), make_feature_fn(clf, params)


def check_judgeable(sample_shape, num_classes: int) -> str:
    """The bundled classifier judging samples of ``sample_shape`` (``[H, W, C]`` images or
    ``[F, H, W, C]`` videos) generated for classes ``0 .. num_classes - 1``; a one-line
    ``ValueError`` when they are not digits it can judge."""
    shape = tuple(int(v) for v in sample_shape)
    video = len(shape) == 4
    name = VIDEO_CLASSIFIER if video else IMAGE_CLASSIFIER
    what = "videos" if video else "images"
    from trdq_jax.models import zoo
    zoo.path_of(name)  # absent: says how to train it
    clf_cfg = _judge_fns(name)[0]
    side, channels = clf_cfg.input_size, clf_cfg.in_channels
    if len(shape) not in (3, 4) or shape[-3:] != (side, side, channels):
        frame = "x".join(str(v) for v in shape[-3:]) if len(shape) >= 3 else str(shape)
        raise ValueError(f"cannot judge samples of shape {shape}: class match and digits-FID use "
                         f"the bundled {name}, which takes {side}x{side}x{channels} "
                         f"{'frames' if video else 'images'} of digits, not {frame} {what}"
                         " (a quantized model of your own: compare it with its float source, "
                         "--quantized QDIR --reference DIR)")
    if num_classes > clf_cfg.num_classes:
        raise ValueError(f"cannot judge a model of {num_classes} classes: the bundled {name} "
                         f"knows {clf_cfg.num_classes} (class c must be the digit c)")
    return name


def reference_for(sample_shape) -> np.ndarray:
    """The held-out real data samples of ``sample_shape`` are compared with: the 300 test
    digits (images), or their moving-digits videos with the samples' frame count."""
    from trdq_jax.data import load_digits, load_moving_digits
    shape = tuple(int(v) for v in sample_shape)
    if len(shape) == 4:
        return load_moving_digits("test", num_frames=shape[0], canvas_size=shape[1])[0]
    return load_digits("test", image_size=shape[0])[0]


def heldout_data(model_cfg) -> tuple[np.ndarray, np.ndarray]:
    """The held-out real data matching a model: digits test images or moving-digits test videos."""
    from trdq_jax.data import load_digits, load_moving_digits
    if isinstance(model_cfg, VideoDiTConfig):
        return load_moving_digits("test", num_frames=model_cfg.num_frames,
                                  canvas_size=model_cfg.input_size)
    return load_digits("test", image_size=model_cfg.input_size)


def bootstrap_record(resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """How the intervals were drawn, as reports carry it."""
    return {"method": "percentile", "level": LEVEL, "resamples": resamples, "seed": seed,
            "over": "generated samples (videos whole); the held-out reference set is fixed",
            "digits_fid": "resampled distances re-centred on the estimate (drawing with "
                          "replacement raises the distance by itself)"}


def judge(samples: np.ndarray, labels: np.ndarray, reference: np.ndarray, *,
          resamples: int | None = None, bootstrap_seed: int = BOOTSTRAP_SEED) -> dict:
    """Class match of ``samples`` and digits-FID against ``reference`` (bundled classifier).

    Returns ``{"classifier", "class_match": {...}, "digits_fid"}`` and, unless ``resamples``
    is 0 (None: ``BOOTSTRAP_RESAMPLES``), their 95% bootstrap intervals
    ``"class_match_ci95": {key: [lo, hi]}``, ``"digits_fid_ci95": [lo, hi]`` and
    ``"bootstrap"`` (how they were drawn). Samples are clipped to [-1, 1] first.
    """
    from trdq_jax.eval.metrics import (bootstrap_class_match, bootstrap_fid, class_match_from_hits,
                                       class_match_hits, fid_from_features, frame_features)
    resamples = BOOTSTRAP_RESAMPLES if resamples is None else resamples
    samples = np.clip(np.asarray(samples), -1.0, 1.0)
    name = classifier_for(samples)
    _, classify_fn, feature_fn = _judge_fns(name)
    hits = class_match_hits(samples, labels, classify_fn)
    features = frame_features(samples, feature_fn, name="samples")
    reference_features = frame_features(reference, feature_fn, name="reference")
    if features.reshape(-1, features.shape[-1]).shape[0] < 2:
        raise ValueError(f"samples: digits-FID needs at least 2 images (frames), got "
                         f"{len(samples)} sample(s)")
    out = {"classifier": name, "class_match": class_match_from_hits(hits),
           "digits_fid": fid_from_features(features, reference_features)}
    if resamples:
        out["class_match_ci95"] = bootstrap_class_match(hits, resamples, bootstrap_seed, LEVEL)
        out["digits_fid_ci95"] = bootstrap_fid(features, reference_features, resamples,
                                               bootstrap_seed, LEVEL)
        out["bootstrap"] = bootstrap_record(resamples, bootstrap_seed)
    return out


def evaluate_classifier(name: str, *, resamples: int | None = None) -> dict:
    """Held-out accuracy of a bundled classifier (videos: every frame of the test videos),
    with its bootstrap interval over the test set."""
    from trdq_jax.data import classifier_frames, load_digits, load_moving_digits
    from trdq_jax.eval.classifier import make_classify_fn
    from trdq_jax.eval.metrics import (bootstrap_class_match, class_match_from_hits,
                                       class_match_hits)
    from trdq_jax.models import zoo
    resamples = BOOTSTRAP_RESAMPLES if resamples is None else resamples
    clf, params, cfg = zoo.load(name)
    if cfg.train.dataset == "moving_digits":
        x, y = load_moving_digits("test", canvas_size=cfg.model.input_size,
                                  num_frames=classifier_frames(cfg.model.input_size))
    else:
        x, y = load_digits("test", image_size=cfg.model.input_size)
    hits = class_match_hits(x, y, make_classify_fn(clf, params))
    out = {"model": name, "source": f"bundled:{name}", "heldout": class_match_from_hits(hits)}
    if resamples:
        out["heldout_ci95"] = bootstrap_class_match(hits, resamples, BOOTSTRAP_SEED, LEVEL)
        out["bootstrap"] = {**bootstrap_record(resamples), "over": "held-out test samples"}
    return out


def check_seeds(seeds) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, (int, np.integer))
                        or not 0 <= s <= 2 ** 32 - 1 for s in seeds):
        raise ValueError(f"seeds: expected one or more ints in [0, 2**32 - 1], got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct seeds, got {seeds!r}")
    return [int(s) for s in seeds]


def evaluate_model(model, params, cfg, *, source: str, per_class: int = 30, seeds=(0,),
                   cfg_scale: float | None = None, sampler=None, apply_fn=None, share_cfg=False,
                   resamples: int | None = None, progress: bool = True) -> dict:
    """Sample ``per_class`` of every class (``eval_labels``) from each of ``seeds`` and judge.

    The headline (``class_match``, ``digits_fid`` and their ``_ci95`` intervals) pools the
    samples of every seed (N = seeds x per_class x classes); with several seeds each one's
    own numbers are in ``"per_seed"``. ``sampler`` / ``apply_fn`` / ``share_cfg`` as in
    ``generate`` (a quantized model: its segment sampler and a ``QuantizedDenoiser``).
    """
    from trdq_jax.models import input_shape
    from trdq_jax.sampling.generate import generate
    seeds = check_seeds(seeds)
    text = cfg.model.family == "pixart"
    num_classes = 10 if text else cfg.model.num_classes
    labels = eval_labels(num_classes, per_class)
    shape = input_shape(cfg.model, 1)[1:]
    check_judgeable(shape, num_classes)  # before any sampling
    reference = reference_for(shape)
    cond, null = labels, None
    if text:  # a text-to-digit model: asked for each digit in the held-out phrasings
        from trdq_jax.sampling.prompts import digit_prompt_conditioning
        cond, null, _ = digit_prompt_conditioning(labels, cfg.train.text_encoder,
                                                  cfg.model.max_tokens)
    batches, per_seed, seconds = [], [], 0.0
    for seed in seeds:
        t0 = time.perf_counter()
        samples = generate(model, params, cfg, cond, null_cond=null, seed=seed,
                           cfg_scale=cfg_scale, sampler=sampler, apply_fn=apply_fn,
                           share_cfg=share_cfg, progress=progress)
        took = time.perf_counter() - t0
        seconds += took
        batches.append(samples)
        if len(seeds) > 1:
            per_seed.append({"seed": seed, "sampling_seconds": round(took, 2),
                             **judge(samples, labels, reference, resamples=0)})
    judged = judge(np.concatenate(batches), np.tile(labels, len(seeds)), reference,
                   resamples=resamples)
    out = {"source": source, "num_samples": int(len(labels) * len(seeds)),
           "per_class": per_class, "seeds": seeds, "label_layout": "sample i: class i % "
           f"{num_classes}" + (" asked in words: the k-th sample of a digit takes held-out "
                               "caption template k % 4 (trdq_jax.data.captions)" if text else ""),
           "cfg_scale": cfg.sampler.cfg_scale if cfg_scale is None else cfg_scale,
           "sampler": f"{cfg.sampler.solver} {cfg.sampler.num_steps} steps",
           "sampling_seconds": round(seconds, 2), **judged}
    if per_seed:
        out["per_seed"] = per_seed
    return out


def evaluate_generator(name: str, per_class: int = 30, seed: int = 0,
                       cfg_scale: float | None = None, *, seeds=None,
                       resamples: int | None = None, progress: bool = True) -> dict:
    """``evaluate_model`` of a bundled diffusion model (``seeds`` default ``[seed]``)."""
    from trdq_jax.models import zoo
    model, params, cfg = zoo.load(name)
    return {"model": name, **evaluate_model(
        model, params, cfg, source=f"bundled:{name}", per_class=per_class,
        seeds=[seed] if seeds is None else seeds, cfg_scale=cfg_scale, resamples=resamples,
        progress=progress)}


def evaluate_checkpoint(path, per_class: int = 30, seeds=(0,), cfg_scale: float | None = None,
                        *, resamples: int | None = None, progress: bool = True) -> dict:
    """``evaluate_model`` of a float checkpoint directory (``trdq train --export``,
    ``trdq convert``, ``checkpoint.save``)."""
    from trdq_jax.models.zoo import load_float_model
    model, params, cfg, source = load_float_model(None, path)
    return evaluate_model(model, params, cfg, source=source, per_class=per_class, seeds=seeds,
                          cfg_scale=cfg_scale, resamples=resamples, progress=progress)


def evaluate_quantized(path, per_class: int = 30, seeds=(0,), cfg_scale: float | None = None,
                       *, backend: str = "xla", resamples: int | None = None,
                       progress: bool = True) -> dict:
    """``evaluate_model`` of a quantized checkpoint (``trdq quantize --out``), sampled as
    ``trdq sample --quantized`` samples it: restored without the float weights, with its stored
    sampler, step -> segment table and CFG plan, through a ``QuantizedDenoiser``."""
    from trdq_jax.quant.io import load_quantized_model, stored_cfg_plan
    model, qparams, cfg, source, sampler, apply_fn = load_quantized_model(path, backend)
    return evaluate_model(model, qparams, cfg, source=source, per_class=per_class, seeds=seeds,
                          cfg_scale=cfg_scale, sampler=sampler, apply_fn=apply_fn,
                          share_cfg=stored_cfg_plan(path) or False, resamples=resamples,
                          progress=progress)


def evaluate_generation(path, *, resamples: int | None = None) -> dict:
    """Judge the samples of a finished ``trdq generate`` directory as they are (its own seed,
    labels and guidance); an unfinished or damaged directory is refused naming what lacks."""
    from trdq_jax.sampling import generation_dir as gd
    from trdq_jax.sampling.offline import load_generated
    path = pathlib.Path(path)
    samples, labels = load_generated(path)
    if labels is None:
        raise ValueError(f"out: {str(path)!r} holds samples not conditioned on class labels; "
                         "class match and digits-FID judge digits made for a class")
    run = gd.read_metadata(path, "out")[0]["run"]
    num_classes = int(run["config"]["model"]["num_classes"])
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"out: {str(path)!r} holds samples of label {int(labels.max())} (the "
                         f"null label: unconditional); class match needs classes 0 .. "
                         f"{num_classes - 1}")
    check_judgeable(samples.shape[1:], num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    return {"source": f"generation:{path}", "generated_from": run.get("source"),
            "num_samples": int(len(labels)), "per_class": counts.tolist()
            if counts.min() != counts.max() else int(counts[0]), "seeds": [run.get("seed")],
            "label_layout": "as generated (labels.npy)", "cfg_scale": run.get("cfg_scale"),
            **judge(samples, labels, reference_for(samples.shape[1:]), resamples=resamples)}


def evaluate_bundled(name: str, per_class: int = 30, seed: int = 0,
                     cfg_scale: float | None = None, *, seeds=None,
                     resamples: int | None = None) -> dict:
    """``evaluate_classifier`` or ``evaluate_generator`` of a bundled model, by its kind."""
    from trdq_jax import checkpoint
    from trdq_jax.models import zoo
    meta = checkpoint.read_metadata(zoo.path_of(name))
    if meta["config"].get("model", {}).get("family") == "classifier":
        return evaluate_classifier(name, resamples=resamples)
    return evaluate_generator(name, per_class, seed, cfg_scale, seeds=seeds, resamples=resamples)


def save_report(path, results: list[dict], *, overwrite: bool = False, arg: str = "path"):
    """Write evaluation ``results`` as a JSON report (kind ``"report"``; ``.json`` only)."""
    from trdq_jax import files
    if not str(path).lower().endswith(".json"):
        raise ValueError(f"{arg}: expected a .json file name, got {str(path)!r}")
    report = {"format": REPORT_FORMAT, "kind": "report", "results": results}
    return files.write_file(path, lambda tmp: files.write_json(tmp, report), kind="report",
                            overwrite=overwrite, arg=arg)
