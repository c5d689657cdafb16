"""Calibration directories: statistics and the segment table, saved once, quantized many times.

Layout (written through ``trdq_jax.files.write_dir``: a temporary sibling, then one swap)::

    DIR/metadata.json  format, kind "calibration", recipe, num_segments, segment_of_step,
                       keep_float, weight_only, roles (the structural layer roles),
                       layers (paths in model order), source, config, per_class, seed,
                       rows_per_step, params_sha256 (of the float weights calibrated), seconds,
                       manifest (every array of stats.npz + digests of these fields)
    DIR/stats.npz      "<i>.<field>": float32 ``LayerStats`` arrays of ``layers[i]``

``load_calibration`` checks the manifest, the shapes of every layer's statistics against each
other and against the segment table, their values against their definitions (finite, ranges
and abs-maxima that agree with each other and with the sampled rows), and the table against
the stored sampler config;
``check_calibration_model`` checks a calibration against the float model it names.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import zipfile

import numpy as np

from trdq_jax import files, manifest
from trdq_jax._version import __version__
from trdq_jax.config import ConfigError, ExperimentConfig, experiment_from_dict, to_dict
from trdq_jax.quant.calibrate import Calibration
from trdq_jax.quant.capture import LayerStats
from trdq_jax.quant.io import recipe_from_dict
from trdq_jax.quant.roles import ROLES
from trdq_jax.quant.verify import QuantizedModelError, check_segment_table

CALIB_FORMAT = "trdq_jax.calibration/2"
STATS_FILE = "stats.npz"
_STAT_FIELDS = ("absmax", "tensor_min", "tensor_max", "rows", "weight_absmax")


class CalibrationError(manifest.IntegrityError):
    """A calibration directory is missing, corrupt, edited or does not fit its model."""


def source_record(model_name: str | None = None,
                  checkpoint_dir: str | os.PathLike | None = None) -> dict:
    """Where the float weights of a calibration live, as stored in its metadata:
    ``{"checkpoint": absolute DIR}`` or ``{"model": NAME}`` (default ``digits-dit``)."""
    if checkpoint_dir is not None:
        return {"checkpoint": str(pathlib.Path(checkpoint_dir).expanduser().absolute())}
    return {"model": model_name or "digits-dit"}


def save_calibration(path, calib: Calibration, recipe, cfg: ExperimentConfig, *, source: dict,
                     params_sha256: str, per_class: int, seed: int, rows_per_step: int,
                     seconds: float = 0.0, overwrite: bool = False,
                     arg: str = "path") -> pathlib.Path:
    """Write ``calib`` (statistics + segment table) and how it was made to ``path``.

    ``source``: ``{"model": NAME}`` or ``{"checkpoint": DIR}``, where the float weights live.
    """
    layers = list(calib.stats)
    body = {"format": CALIB_FORMAT, "kind": "calibration", "library_version": __version__,
            "recipe": dataclasses.asdict(recipe), "num_segments": int(calib.num_segments),
            "segment_of_step": [int(v) for v in calib.segment_of_step],
            "keep_float": {k: list(v) for k, v in calib.keep_float.items()}, "layers": layers,
            "weight_only": list(calib.weight_only), "roles": calib.roles,
            "source": source, "config": to_dict(cfg), "params_sha256": params_sha256,
            "per_class": per_class, "seed": seed, "rows_per_step": rows_per_step,
            "seconds": round(seconds, 3)}
    arrays = {f"{i}.{f}": np.asarray(getattr(calib.stats[p], f), np.float32)
              for i, p in enumerate(layers) for f in _STAT_FIELDS}
    meta = {**body, "manifest": manifest.make_manifest(body, arrays)}

    def write(tmp: pathlib.Path):
        np.savez(tmp / STATS_FILE, **arrays)
        files.crash_point("arrays-written")
        files.write_json(tmp / files.METADATA_FILE, meta)
    # np.savez stores the arrays as they are, plus a header per array; metadata.json beside
    needed = (sum(a.nbytes for a in arrays.values()) + 512 * len(arrays)
              + len(json.dumps(meta, indent=1, default=float)) + (16 << 10))
    return files.write_dir(path, write, kind="calibration", overwrite=overwrite, arg=arg,
                           needed_bytes=needed)


def _read_stats(path: pathlib.Path) -> dict[str, np.ndarray]:
    """The arrays of ``stats.npz``; a missing, empty, truncated or foreign file (a pickle is
    never unpickled) is a ``CalibrationError`` in ``weight_files``' words."""
    from trdq_jax.models.weight_files import WeightFileError, check_npz
    try:
        check_npz(path / STATS_FILE)
    except WeightFileError as e:
        raise CalibrationError(str(e)) from None
    try:
        with np.load(path / STATS_FILE, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CalibrationError(f"{str(path / STATS_FILE)!r} is damaged "
                               f"({type(e).__name__}: {e})") from None


def _check_layer(p: str, s: LayerStats, num_steps: int, where: str) -> None:
    k = s.absmax.shape[-1] if s.absmax.ndim == 2 else -1
    want = {"absmax": (num_steps, k), "tensor_min": (num_steps,), "tensor_max": (num_steps,),
            "weight_absmax": (k,)}
    for field, shape in want.items():
        if k < 1 or getattr(s, field).shape != shape:
            raise CalibrationError(f"{where}: layer {p!r} {field} has shape "
                                   f"{getattr(s, field).shape}, expected {shape} ({num_steps} "
                                   "steps of the segment table)")
    if (s.rows.ndim != 3 or s.rows.shape[0] != num_steps or not s.rows.shape[2]
            or s.rows.shape[2] % k):
        raise CalibrationError(f"{where}: layer {p!r} rows has shape {s.rows.shape}, expected "
                               f"[{num_steps}, R, taps * {k}] (taps = 1 for a Dense)")


def _first_step(bad: np.ndarray) -> int:
    """The first step (leading index) where the boolean ``bad [S, ...]`` holds."""
    return int(np.argmax(bad.reshape(len(bad), -1).any(axis=1)))


def _check_values(p: str, s: LayerStats, where: str) -> None:
    """Refuse statistics that contradict their definitions (``LayerStats``, shapes checked):
    non-finite values, negative magnitudes, ``tensor_min > tensor_max``, a step whose largest
    absmax is not ``max(-tensor_min, tensor_max)``, sampled rows beyond their step's per-channel
    absmax or range (relative rounding 1e-6 allowed)."""
    def fail(field: str, what: str, bad: np.ndarray):
        step = f" (step {_first_step(bad)})" if field != "weight_absmax" else ""
        raise CalibrationError(f"{where}: layer {p!r} {field}: {what}{step}")

    for field in _STAT_FIELDS:
        value = getattr(s, field)
        for what, bad in (("NaN", np.isnan(value)), ("infinite", np.isinf(value))):
            if bad.any():
                fail(field, f"{np.count_nonzero(bad)} {what} values", bad)
    for field in ("absmax", "weight_absmax"):
        bad = getattr(s, field) < 0
        if bad.any():
            fail(field, f"{np.count_nonzero(bad)} negative values (magnitudes are >= 0)", bad)
    bad = s.tensor_min > s.tensor_max
    if bad.any():
        i = _first_step(bad)
        fail("tensor_min", f"{s.tensor_min[i]} > tensor_max {s.tensor_max[i]}", bad)
    peak = np.maximum(-s.tensor_min, s.tensor_max)  # [S] the largest |x| of each step
    tol = 1e-6 * peak
    bad = np.abs(s.absmax.max(axis=1) - peak) > tol
    if bad.any():
        i = _first_step(bad)
        fail("absmax", f"largest value {s.absmax[i].max()} is not max(-tensor_min, tensor_max) "
             f"= {peak[i]}", bad)
    k = s.absmax.shape[1]
    rows = s.rows.reshape(len(s.rows), -1, k)  # [S, R * taps, K]: a conv's patch taps as rows
    bad = np.abs(rows) - s.absmax[:, None, :] > tol[:, None, None]
    if bad.any():
        fail("rows", f"{np.count_nonzero(bad)} values exceed their channel's absmax", bad)
    lo, hi = s.tensor_min, s.tensor_max
    if s.rows.shape[2] > k:  # conv patches: padding taps hold zeros
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    bad = (rows < (lo - tol)[:, None, None]) | (rows > (hi + tol)[:, None, None])
    if bad.any():
        fail("rows", f"{np.count_nonzero(bad)} values outside [tensor_min, tensor_max]", bad)


def load_calibration(path: str | os.PathLike):
    """``(Calibration, recipe, cfg, meta)`` from a ``save_calibration`` directory.

    Raises ``CalibrationError`` naming the field for a missing, corrupt, edited or inconsistent
    directory.
    """
    path = pathlib.Path(path).expanduser()
    meta, body, record = manifest.read_record(path, formats={"calibration": CALIB_FORMAT},
                                              noun="calibration directory",
                                              error=CalibrationError)
    where = str(path / files.METADATA_FILE)
    arrays = _read_stats(path)
    manifest.check_arrays(record["arrays"], arrays, str(path / STATS_FILE), CalibrationError)
    try:
        cfg = experiment_from_dict(body["config"])
        recipe = recipe_from_dict(body["recipe"])
        num_segments = int(body["num_segments"])
        if num_segments != recipe.num_segments:
            raise CalibrationError(f"{where}: num_segments {num_segments} differs from the "
                                   f"recipe's {recipe.num_segments}")
        table = check_segment_table(body["segment_of_step"], num_segments,
                                    cfg.sampler.num_steps, where)
        stats = {p: LayerStats(**{f: arrays[f"{i}.{f}"] for f in _STAT_FIELDS})
                 for i, p in enumerate(body["layers"])}
        for p, s in stats.items():
            _check_layer(p, s, len(table), where)
            _check_values(p, s, str(path / STATS_FILE))
        roles, weight_only = _roles(body, recipe, list(stats), where)
        calib = Calibration(stats=stats, segment_of_step=table, num_segments=num_segments,
                            keep_float={k: list(v) for k, v in body["keep_float"].items()},
                            weight_only=weight_only, roles=roles)
    except (KeyError, TypeError, AttributeError, ConfigError, QuantizedModelError) as e:
        message = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise CalibrationError(f"{where}: inconsistent calibration: {message}") from None
    return calib, recipe, cfg, meta


def _roles(body: dict, recipe, layers: list[str], where: str):
    """``(roles or None, weight-only paths)`` of a stored calibration; one saved before the
    structural roles existed has none, and its recipe's regexes name the weight-only layers."""
    roles = body.get("roles")
    if roles is not None and (not isinstance(roles, dict) or sorted(roles) != sorted(ROLES)
                              or not all(isinstance(v, list) and all(isinstance(p, str)
                                                                     for p in v)
                                         for v in roles.values())):
        raise CalibrationError(f"{where}: roles: expected {{{', '.join(ROLES)}: [paths]}}, got "
                               f"{roles!r}")
    weight_only = body.get("weight_only")
    if weight_only is None:
        return roles, [p for p in layers if recipe.is_weight_only(p)]
    if not isinstance(weight_only, list) or not set(weight_only) <= set(layers):
        raise CalibrationError(f"{where}: weight_only: expected paths among the calibrated "
                               f"layers, got {weight_only!r}")
    return roles, weight_only


def check_calibration_model(calib: Calibration, cfg: ExperimentConfig, meta: dict, params,
                            params_sha256: str, where: str) -> None:
    """Refuse a calibration whose float model changed: another config, other layers or widths,
    or other weights (``params_sha256`` of the params now at ``meta['source']``)."""
    stored = experiment_from_dict(meta["config"])
    if stored.model != cfg.model:
        raise CalibrationError(f"{where}: calibrated for model {stored.model}, the source now "
                               f"holds {cfg.model}")
    for p, s in calib.stats.items():
        node = params
        for name in p.split("/"):
            node = node.get(name) if isinstance(node, dict) else None
        kernel = None if node is None else node.get("kernel")
        if kernel is None or np.shape(kernel)[-2] != s.channels:
            raise CalibrationError(f"{where}: layer {p!r} ({s.channels} input channels) is not "
                                   "in the float model at the calibration's source")
    if params_sha256 != meta["params_sha256"]:
        raise CalibrationError(f"{where}: the float weights at {meta['source']} changed since "
                               "this calibration was made; run trdq calibrate again")


def load_calibration_and_model(path: str | os.PathLike):
    """``(calib, recipe, cfg, meta, params)``: a calibration directory and the float params of
    the model it names (``meta["source"]``), checked against each other
    (``check_calibration_model``)."""
    from trdq_jax.models.zoo import load_float_model
    from trdq_jax.manifest import tree_digest
    calib, recipe, cfg, meta = load_calibration(path)
    source = meta["source"]
    if not isinstance(source, dict) or not (set(source) <= {"model", "checkpoint"}):
        raise CalibrationError(f"{str(path)!r}: source {source!r} names no float model")
    _, params, source_cfg, _ = load_float_model(source.get("model"), source.get("checkpoint"))
    check_calibration_model(calib, source_cfg, meta, params, tree_digest(params),
                            str(path))
    return calib, recipe, cfg, meta, params
