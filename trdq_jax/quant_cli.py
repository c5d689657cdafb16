"""``trdq calibrate | quantize | plot-ranges``, the calibration directory and quantized loading.

A calibration directory (written atomically: a temporary sibling, then one rename)::

    DIR/calibration.json  format, recipe, num_segments, segment_of_step, keep_float, layers (paths
                          in model order), source, config, per_class, seed, rows_per_step,
                          params_sha256 (of the float weights calibrated), seconds
    DIR/stats.npz         "<i>.<field>": float32 ``LayerStats`` arrays of ``layers[i]``

Calibration labels are ``per_class`` samples of every class drawn from ``DEFAULT_CALIB_SEED``,
a seed the evaluation commands (seed 0 by default) do not use.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import time
import uuid

import numpy as np

from trdq_jax.config import ExperimentConfig, experiment_from_dict, to_dict

CALIB_FORMAT = "trdq_jax.calibration/1"
DEFAULT_CALIB_SEED = 1000
_STAT_FIELDS = ("absmax", "tensor_min", "tensor_max", "rows", "weight_absmax")


# ----------------------------------------------------------------------------- recipes & labels


def recipe_from_args(name: str, w_bits: int, a_bits: int, segments: int | None = None):
    """A named recipe with CLI-named errors (``--recipe``, ``--w-bits``, ``--a-bits``,
    ``--segments``)."""
    from trdq_jax.quant import RECIPES, get_recipe
    if name not in RECIPES:
        raise ValueError(f"--recipe: unknown {name!r}; expected one of {sorted(RECIPES)}")
    for flag, bits in (("--w-bits", w_bits), ("--a-bits", a_bits)):
        if not (2 <= bits <= 8 or bits == 16):
            raise ValueError(f"{flag}: expected bits in 2..8 (or 16 = float), got {bits}")
    if segments is not None and segments < 1:
        raise ValueError(f"--segments: expected a positive int, got {segments}")
    overrides = {} if segments is None else {"num_segments": segments}
    if segments == 1 and RECIPES[name].per_segment_weights:
        overrides["per_segment_weights"] = False  # one segment: one weight copy
    return get_recipe(name, w_bits, a_bits, **overrides)


def calibration_labels(num_classes: int, per_class: int) -> np.ndarray:
    """int32 ``[num_classes * per_class]``: ``per_class`` of every class, class-major."""
    if per_class < 1:
        raise ValueError(f"per_class: expected a positive int, got {per_class}")
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def params_fingerprint(params) -> str:
    """sha256 over the bytes, shapes and dtypes of every leaf (tree order)."""
    import jax
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        arr = np.asarray(leaf)
        digest.update(f"{arr.dtype}{arr.shape}".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def run_calibration(model, params, cfg: ExperimentConfig, recipe, *, per_class: int = 4,
                    seed: int = DEFAULT_CALIB_SEED, rows_per_step: int = 64,
                    progress: bool = False):
    """``trdq_jax.quant.calibrate`` on ``per_class`` labels of every class with ``cfg``'s
    sampler and guidance. Returns the ``Calibration``."""
    from trdq_jax.generate import null_label
    from trdq_jax.models import input_shape
    from trdq_jax.quant import calibrate
    from trdq_jax.sampling import Sampler
    labels = calibration_labels(cfg.model.num_classes, per_class)
    return calibrate(model, params, recipe, Sampler.from_config(cfg.sampler), labels=labels,
                     null_label=null_label(cfg.model), shape=input_shape(cfg.model, len(labels)),
                     seed=seed, rows_per_step=rows_per_step, progress=progress)


# ----------------------------------------------------------------------------- calibration dir


def _atomic_dir(path: pathlib.Path, write, overwrite: bool) -> pathlib.Path:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``path``."""
    path = path.absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"--out: {str(path)!r} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        write(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def save_calibration(path, calib, recipe, cfg: ExperimentConfig, *, source: dict,
                     params_sha256: str, per_class: int, seed: int, rows_per_step: int,
                     seconds: float = 0.0, overwrite: bool = False) -> pathlib.Path:
    """Write ``calib`` (statistics + segment table) and how it was made to ``path``.

    ``source``: ``{"model": NAME}`` or ``{"checkpoint": DIR}``, where the float weights live.
    """
    layers = list(calib.stats)
    meta = {"format": CALIB_FORMAT, "recipe": dataclasses.asdict(recipe),
            "num_segments": int(calib.num_segments),
            "segment_of_step": [int(v) for v in calib.segment_of_step],
            "keep_float": {k: list(v) for k, v in calib.keep_float.items()}, "layers": layers,
            "source": source, "config": to_dict(cfg), "params_sha256": params_sha256,
            "per_class": per_class, "seed": seed, "rows_per_step": rows_per_step,
            "seconds": round(seconds, 3)}
    arrays = {f"{i}.{f}": np.asarray(getattr(calib.stats[p], f), np.float32)
              for i, p in enumerate(layers) for f in _STAT_FIELDS}

    def write(tmp: pathlib.Path):
        np.savez(tmp / "stats.npz", **arrays)
        (tmp / "calibration.json").write_text(json.dumps(meta, indent=1))
    return _atomic_dir(pathlib.Path(path), write, overwrite)


def recipe_from_dict(d: dict):
    from trdq_jax.quant import Recipe
    return Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def load_calibration(path):
    """``(Calibration, recipe, cfg, meta)`` from a ``save_calibration`` directory."""
    from trdq_jax.quant import Calibration
    from trdq_jax.quant.capture import LayerStats
    path = pathlib.Path(path)
    if not (path / "calibration.json").is_file() or not (path / "stats.npz").is_file():
        raise ValueError(f"--calib: no calibration directory at {str(path)!r} (expected "
                         "calibration.json and stats.npz from `trdq calibrate`)")
    meta = json.loads((path / "calibration.json").read_text())
    if meta.get("format") != CALIB_FORMAT:
        raise ValueError(f"--calib: {str(path)!r} has format {meta.get('format')!r}, "
                         f"expected {CALIB_FORMAT!r}")
    with np.load(path / "stats.npz") as data:
        stats = {p: LayerStats(**{f: data[f"{i}.{f}"] for f in _STAT_FIELDS})
                 for i, p in enumerate(meta["layers"])}
    calib = Calibration(stats=stats, segment_of_step=np.asarray(meta["segment_of_step"], np.int32),
                        num_segments=int(meta["num_segments"]), keep_float=meta["keep_float"])
    return calib, recipe_from_dict(meta["recipe"]), experiment_from_dict(meta["config"]), meta


# ----------------------------------------------------------------------------- quantized models


def quantize_summary(params, qparams, recipe, seconds: float) -> dict:
    """Bytes held by the quantized layers vs their bf16 size, and timing."""
    from trdq_jax.quant import float_bytes_of, quantized_layer_paths, weight_bytes
    paths = quantized_layer_paths(qparams)
    held = weight_bytes(qparams)
    bf16 = float_bytes_of(params, paths)
    return {"recipe": recipe.name, "w_bits": recipe.w_bits, "a_bits": recipe.a_bits,
            "num_segments": recipe.num_segments, "quantized_layers": len(paths),
            "weight_bytes": held["quantized_layers"], "bf16_bytes": bf16,
            "ratio_to_bf16": round(held["quantized_layers"] / bf16, 4),
            "float_param_bytes": held["float_params"], "seconds": round(seconds, 3)}


def load_quantized_model(qdir, backend: str = "xla", overrides=()):
    """``(model, qparams, cfg, source, sampler, apply_fn)`` of a ``save_quantized`` directory.

    Restored without the float weights; the sampler uses the stored step -> segment table.
    ``overrides`` may change ``sampler.cfg_scale`` / ``generation.*`` but not the step count.
    """
    from trdq_jax import checkpoint
    from trdq_jax.config import apply_overrides
    from trdq_jax.models import build_model
    from trdq_jax.quant import BACKENDS, QuantizedDenoiser, load_quantized
    from trdq_jax.sampling import Sampler
    if backend not in BACKENDS:
        raise ValueError(f"--backend: expected one of {BACKENDS}, got {backend!r}")
    if not pathlib.Path(qdir).is_dir():
        raise ValueError(f"--quantized: no quantized checkpoint directory at {str(qdir)!r}")
    try:
        qparams, cfg, recipe, table = load_quantized(qdir)
    except checkpoint.CheckpointError as e:
        raise ValueError(f"--quantized: {e}") from None
    if not isinstance(cfg, ExperimentConfig):
        cfg = ExperimentConfig(name=pathlib.Path(qdir).name, model=cfg)
    if any(s.startswith("model.") for s in overrides):
        raise ValueError("--set: model.* fields are fixed by the checkpoint")
    cfg = apply_overrides(cfg, list(overrides))
    if cfg.sampler.num_steps != len(table):
        raise ValueError(f"--set: the quantized checkpoint's segment table covers {len(table)} "
                         f"steps; sampler.num_steps must stay {len(table)}")
    sampler = Sampler.from_config(cfg.sampler).with_segments(table, recipe.num_segments)
    model = build_model(cfg.model)
    source = f"{qdir} ({recipe.name} W{recipe.w_bits}A{recipe.a_bits}, {backend})"
    return model, qparams, cfg, source, sampler, QuantizedDenoiser(model, backend)


# ----------------------------------------------------------------------------- commands


def _source_of(args) -> dict:
    return ({"checkpoint": str(pathlib.Path(args.checkpoint).absolute())} if args.checkpoint
            else {"model": args.model or "digits-dit"})


def _float_model(source: dict, overrides=()):
    from trdq_jax.generate import load_float_model
    return load_float_model(source.get("model"), source.get("checkpoint"), overrides)


def _calibrate_from_args(args, recipe):
    """(model, params, cfg, calib, seconds) for --model/--checkpoint and the calibration flags."""
    if args.per_class < 1:
        raise ValueError(f"--per-class: expected a positive int, got {args.per_class}")
    model, params, cfg, _ = _float_model(_source_of(args), args.set)
    if recipe.num_segments > cfg.sampler.num_steps:
        raise ValueError(f"--segments: {recipe.num_segments} segments but the sampler has only "
                         f"{cfg.sampler.num_steps} steps")
    t0 = time.perf_counter()
    calib = run_calibration(model, params, cfg, recipe, per_class=args.per_class, seed=args.seed,
                            rows_per_step=args.rows_per_step, progress=True)
    return model, params, cfg, calib, time.perf_counter() - t0


def _cmd_calibrate(args) -> int:
    recipe = recipe_from_args(args.recipe, args.w_bits, args.a_bits, args.segments)
    _, params, cfg, calib, seconds = _calibrate_from_args(args, recipe)
    out = save_calibration(args.out, calib, recipe, cfg, source=_source_of(args),
                           params_sha256=params_fingerprint(params), per_class=args.per_class,
                           seed=args.seed, rows_per_step=args.rows_per_step, seconds=seconds,
                           overwrite=args.overwrite)
    print(json.dumps({"out": str(out), "layers": len(calib.stats),
                      "segment_of_step": calib.segment_of_step.tolist(),
                      "seconds": round(seconds, 2)}))
    return 0


def _quantize_recipe(args, stored):
    """The recipe for ``trdq quantize --calib``: the stored one unless flags change it."""
    if args.recipe is None and args.w_bits is None and args.a_bits is None:
        return stored
    name = args.recipe or stored.name
    w_bits = stored.w_bits if args.w_bits is None else args.w_bits
    a_bits = stored.a_bits if args.a_bits is None else args.a_bits
    if name == stored.name:
        recipe_from_args(name, w_bits, a_bits)  # named errors
        return stored.with_bits(w_bits, a_bits)
    return recipe_from_args(name, w_bits, a_bits, stored.num_segments)


def _cmd_quantize(args) -> int:
    from trdq_jax.quant import quantize, save_quantized
    if bool(args.calib) == bool(args.model or args.checkpoint):
        raise ValueError("--calib: give either --calib DIR or --model NAME / --checkpoint DIR "
                         "(to calibrate on the fly)")
    if args.calib:
        if args.segments is not None:
            raise ValueError("--segments: fixed by the calibration given with --calib")
        if args.set:
            raise ValueError("--set: with --calib the config is the calibration's")
        calib, stored, cfg, meta = load_calibration(args.calib)
        recipe = _quantize_recipe(args, stored)
        if recipe.num_segments != calib.num_segments:
            raise ValueError(f"--recipe: {recipe.name} wants {recipe.num_segments} segments, "
                             f"the calibration has {calib.num_segments}")
        _, params, _, _ = _float_model(meta["source"])
        if params_fingerprint(params) != meta["params_sha256"]:
            raise ValueError(f"--calib: the float weights at {meta['source']} changed since "
                             "this calibration was made; re-run trdq calibrate")
        calib_seconds = meta.get("seconds", 0.0)
    else:
        recipe = recipe_from_args(args.recipe or "trdq", 8 if args.w_bits is None else args.w_bits,
                                  8 if args.a_bits is None else args.a_bits, args.segments)
        _, params, cfg, calib, calib_seconds = _calibrate_from_args(args, recipe)
    t0 = time.perf_counter()
    qparams = quantize(params, calib, recipe, progress=True)
    summary = quantize_summary(params, qparams, recipe, time.perf_counter() - t0)
    out = save_quantized(args.out, qparams, cfg, recipe, calib.segment_of_step,
                         overwrite=args.overwrite)
    print(json.dumps({"out": str(out), **summary, "calibration_seconds": calib_seconds}))
    return 0


def _cmd_plot_ranges(args) -> int:
    from trdq_jax import plots
    from trdq_jax.quant import quantize_layer, select_layers
    recipe = recipe_from_args(args.recipe, args.w_bits, args.a_bits, args.segments)
    model, params, cfg, calib, _ = _calibrate_from_args(args, recipe)
    quantized, _ = select_layers(list(calib.stats), recipe)
    layers = plot_layers(quantized, args.layers)
    ranges = {}
    for path in layers:
        dense = params
        for name in path.split("/"):
            dense = dense[name]
        q = quantize_layer(dense["kernel"], dense.get("bias"), calib.stats[path],
                           calib.segment_of_step, calib.num_segments, recipe, path)
        ranges[path] = plots.layer_ranges(calib.stats[path], q, calib.segment_of_step)
    title = (f"{cfg.name}: activation range per sampling step, before / after {recipe.name} "
             f"smoothing+rotation ({cfg.sampler.solver} {cfg.sampler.num_steps} steps)")
    size = plots.save_range_figure(args.out, ranges, calib.segment_of_step, title=title)
    print(json.dumps({"out": str(args.out), "size": list(size), "layers": {
        p: {"before_absmax": round(before.absmax, 4), "after_absmax": round(after.absmax, 4)}
        for p, (before, after) in ranges.items()}}))
    return 0


def plot_layers(quantized: list[str], pattern: str | None = None) -> list[str]:
    """Layers to plot: those matching ``pattern`` (``re.search``), or by default the attention
    ``qkv`` and MLP ``fc2`` of the first and last block that have them (else the first and last
    quantized layers)."""
    if pattern:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"--layers: invalid regex {pattern!r}: {e}") from None
        chosen = [p for p in quantized if regex.search(p)]
        if not chosen:
            raise ValueError(f"--layers: {pattern!r} matches no quantized layer; "
                             f"layers: {quantized}")
        return chosen
    picks = []
    for suffix in ("attn/qkv", "mlp/fc2"):
        hits = [p for p in quantized if p.endswith(suffix)]
        picks += [hits[0], hits[-1]] if hits else []
    picks = picks or [quantized[0], quantized[-1]]
    return sorted(set(picks), key=quantized.index)


def _add_source(p, with_set: bool = True) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="bundled float model (default digits-dit)")
    src.add_argument("--checkpoint", metavar="DIR", help="a float trdq checkpoint directory")
    if with_set:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override sampler.*/generation.* fields, e.g. sampler.num_steps=20")


def _add_calibration_flags(p, recipe_default: str | None) -> None:
    default = "%(default)s" if recipe_default else "the calibration's, else 8"
    p.add_argument("--recipe", default=recipe_default,
                   help="quantization method: trdq, trdq_release, minmax, smoothquant, quarot, "
                        f"viditq (default {recipe_default or 'the calibration recipe, else trdq'})")
    p.add_argument("--w-bits", type=int, default=8 if recipe_default else None,
                   help=f"weight bits 2..8, 16 = float (default {default})")
    p.add_argument("--a-bits", type=int, default=8 if recipe_default else None,
                   help=f"activation bits 2..8, 16 = float (default {default})")
    p.add_argument("--segments", type=int, help="time segments (default: the recipe's)")
    p.add_argument("--per-class", type=int, default=4, help="calibration samples per class")
    p.add_argument("--seed", type=int, default=DEFAULT_CALIB_SEED,
                   help=f"calibration seed (default {DEFAULT_CALIB_SEED}, not an evaluation seed)")
    p.add_argument("--rows-per-step", type=int, default=64,
                   help="activation rows kept per step and layer")


def add_commands(sub) -> None:
    """Register ``calibrate``, ``quantize`` and ``plot-ranges`` on the CLI's subparsers."""
    p = sub.add_parser("calibrate", help="collect activation statistics + time segments")
    _add_source(p)
    _add_calibration_flags(p, "trdq")
    p.add_argument("--out", required=True, help="calibration directory to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("quantize", help="quantize a float model from a calibration directory "
                                        "(or calibrate on the fly with --model/--checkpoint)")
    p.add_argument("--calib", metavar="DIR", help="a `trdq calibrate` directory")
    _add_source(p)
    _add_calibration_flags(p, None)
    p.add_argument("--out", required=True, help="quantized checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("plot-ranges", help="activation ranges per sampling step before/after "
                                           "the recipe's smoothing+rotation (PNG)")
    _add_source(p)
    _add_calibration_flags(p, "trdq")
    p.set_defaults(per_class=2, w_bits=4)
    p.add_argument("--layers", metavar="REGEX",
                   help="layers to plot (default: qkv and fc2 of the first and last block)")
    p.add_argument("--out", required=True, help="output PNG file")
    p.set_defaults(func=_cmd_plot_ranges)
