"""Batched generation, the ``trdq sample`` command and the ``trdq demo`` main job."""
from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from trdq_jax.config import ExperimentConfig


def null_label(model_cfg) -> int:
    """The label index that means "unconditional" (the extra CFG row of the label table)."""
    if model_cfg.class_dropout_prob <= 0:
        raise ValueError("model: trained without label dropout, so it has no null label for CFG")
    return model_cfg.num_classes


def generate(model, params, cfg: ExperimentConfig, labels, *, seed: int = 0,
             cfg_scale: float | None = None, batch_size: int | None = None,
             share_cfg: bool = False, progress: bool = False, sampler=None,
             apply_fn=None) -> np.ndarray:
    """Sample ``len(labels)`` images/videos in batches; sample i depends only on ``(seed, i)``.

    ``apply_fn``: the denoiser (default ``denoise_fn_for(model)``; e.g. a
    ``trdq_jax.quant.QuantizedDenoiser`` with quantized ``params``); ``sampler`` defaults to
    ``cfg.sampler``'s. Returns float32 ``[N, ...spatial, C]`` (the first ``in_channels`` output
    channels).
    """
    from trdq_jax.models import input_shape
    from trdq_jax.sampling import Sampler, denoise_fn_for, sample

    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels: expected a non-empty 1-D array, got shape {labels.shape}")
    sampler = sampler or Sampler.from_config(cfg.sampler)
    batch_size = batch_size or cfg.generation.batch_size
    apply_fn = apply_fn or denoise_fn_for(model)
    out = []
    starts = range(0, len(labels), batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="sampling", unit="batch")
    for start in starts:
        chunk = labels[start:start + batch_size]
        x = sample(apply_fn, params, sampler, chunk, seed=seed, cfg_scale=cfg_scale,
                   null_label=null_label(cfg.model), shape=input_shape(cfg.model, len(chunk)),
                   share_cfg=share_cfg, sample_offset=start)
        out.append(np.asarray(x))
    return np.concatenate(out)


def class_rows(samples: np.ndarray, labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Group samples by label: one ``[n_c, ...]`` array per class (for labelled grids)."""
    return [samples[labels == c] for c in range(num_classes)]


def grid_rows(samples: np.ndarray, labels: np.ndarray, num_classes: int,
              max_cols: int = 10) -> list[np.ndarray]:
    """One grid row ``[n, H, W, C]`` per class: its first ``max_cols`` images, or, for videos
    ``[N, F, H, W, C]``, the ``F`` frames of its first video (a class without samples gives an
    empty row)."""
    rows = class_rows(samples, labels, num_classes)
    if samples.ndim == 5:
        return [r[0] if len(r) else r.reshape((0,) + r.shape[2:]) for r in rows]
    return [r[:max_cols] for r in rows]


def load_float_model(model_name: str | None = None, checkpoint_dir: str | None = None,
                     overrides=()):
    """``(model, params, cfg, source)`` of a bundled model or a float checkpoint directory.

    ``overrides``: ``section.field=value`` strings for ``sampler.*`` / ``generation.*``
    (``model.*`` is fixed by the checkpoint). ``source`` describes where the params came from.
    """
    from trdq_jax import checkpoint
    from trdq_jax.config import apply_overrides
    from trdq_jax.models import build_model, zoo
    if checkpoint_dir:
        if not pathlib.Path(checkpoint_dir).is_dir():
            raise ValueError(f"--checkpoint: no checkpoint directory at {str(checkpoint_dir)!r}")
        try:
            params, cfg = checkpoint.restore(checkpoint_dir)
        except checkpoint.CheckpointError as e:
            raise ValueError(f"--checkpoint: {e}") from None
        if not isinstance(cfg, ExperimentConfig):
            cfg = ExperimentConfig(name=pathlib.Path(checkpoint_dir).name, model=cfg)
        source = str(checkpoint_dir)
    else:
        model_name = model_name or "digits-dit"
        _, params, cfg = zoo.load(model_name)
        source = f"bundled:{model_name}"
    if any(s.startswith("model.") for s in overrides):
        raise ValueError("--set: model.* fields are fixed by the checkpoint")
    cfg = apply_overrides(cfg, list(overrides))
    return build_model(cfg.model), params, cfg, source


def _load_model(args):
    """(model, params, cfg, source) from --model NAME or --checkpoint DIR (+ --set)."""
    return load_float_model(args.model, args.checkpoint, args.set)


def _cmd_sample(args) -> int:
    from trdq_jax.viz import save_grid
    if args.per_class < 1:
        raise ValueError(f"--per-class: expected a positive int, got {args.per_class}")
    sampler = apply_fn = None
    if args.quantized:
        from trdq_jax.quant_cli import load_quantized_model
        model, params, cfg, source, sampler, apply_fn = load_quantized_model(
            args.quantized, args.backend, args.set)
    else:
        if args.backend != "xla":
            raise ValueError("--backend: only applies to --quantized checkpoints")
        model, params, cfg, source = _load_model(args)
    labels = np.repeat(np.arange(cfg.model.num_classes), args.per_class)
    t0 = time.perf_counter()
    samples = generate(model, params, cfg, labels, seed=args.seed, cfg_scale=args.cfg_scale,
                       share_cfg=args.share_cfg, progress=True, sampler=sampler,
                       apply_fn=apply_fn)
    seconds = time.perf_counter() - t0
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", samples=samples, labels=labels)
    rows = grid_rows(samples, labels, cfg.model.num_classes)
    save_grid(out / "grid.png", rows, [f"class {c}" for c in range(len(rows))],
              title=f"{source} | {cfg.sampler.solver} {cfg.sampler.num_steps} steps")
    print(json.dumps({"out": str(out), "num_samples": int(len(labels)),
                      "seconds": round(seconds, 2)}))
    return 0


def add_commands(sub) -> None:
    """Register ``sample`` and ``demo`` on the CLI's subparsers."""
    p = sub.add_parser("sample", help="sample a bundled model or a checkpoint into a grid")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="digits-dit",
                     help="bundled model name (default digits-dit)")
    src.add_argument("--checkpoint", help="a trdq checkpoint directory instead of a bundled model")
    src.add_argument("--quantized", metavar="QDIR",
                     help="a quantized checkpoint (trdq quantize --out QDIR); restored without the "
                          "float weights, sampled with its stored time-segment table")
    p.add_argument("--backend", default="xla",
                   help="quantized execution: xla (int8 dot, default) or fake (simulated)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override sampler.*/generation.* fields, e.g. sampler.num_steps=100")
    p.add_argument("--out", required=True, help="output directory (grid.png, samples.npz)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=None, help="default: the config's")
    p.add_argument("--share-cfg", action="store_true", help="CFG attention sharing")
    p.set_defaults(func=_cmd_sample)

    from trdq_jax import demo
    p = sub.add_parser("demo", help="the main job: sample the bundled image DiT and report")
    p.add_argument("--out", required=True, help="output directory (grid.png, report.json/.md)")
    p.add_argument("--model", default="digits-dit", help="bundled model to demonstrate")
    p.add_argument("--per-class", type=int, default=30, help="samples per class for the metrics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quant-per-class", type=int, default=10,
                   help="samples per class of the float vs W8A8 vs W4A8 comparison "
                        "(at most --per-class)")
    p.set_defaults(func=demo.run_demo_command)
