"""Calibration directories: statistics and the segment table, saved once, quantized many times.

Layout (written through ``trdq_jax.files.write_dir``: a temporary sibling, then one swap)::

    DIR/metadata.json  format, kind "calibration", recipe, num_segments, segment_of_step,
                       keep_float, weight_only, roles (the structural layer roles),
                       layers (paths in model order), source, config, per_class, seed,
                       rows_per_step, params_sha256 (of the float weights calibrated), seconds,
                       manifest (every array of stats.npz + digests of these fields)
    DIR/stats.npz      "<i>.<field>": the ``LayerStats`` arrays of ``layers[i]``: absmax,
                       tensor_min, tensor_max, weight_absmax float32; rows float16 or float32
                       (the rows kept per step); gram float32 (packed upper triangle of the
                       Gram matrix of every sampled row); gram_rows int64 (how many)

Format 3 stores a Gram matrix per layer and a few rows per step; a format-2 directory (every
sampled row, no Gram) is refused with a request to calibrate again.

``load_calibration`` checks the manifest, the shapes of every layer's statistics against each
other and against the segment table, their values against their definitions (finite, ranges
and abs-maxima that agree with each other and with the kept rows, a Gram matrix positive
semi-definite within rounding whose diagonal lies between the kept rows' sum of squares and
the rows summed times their channel's squared abs-max), and the table against the stored
sampler config;
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
from trdq_jax.quant.capture import LayerStats, gram_of, packed_size, unpack_gram
from trdq_jax.quant.io import recipe_from_dict
from trdq_jax.quant.roles import ROLES
from trdq_jax.quant.verify import QuantizedModelError, check_segment_table

CALIB_FORMAT = "trdq_jax.calibration/3"
_OLDER_FORMATS = ("trdq_jax.calibration/1", "trdq_jax.calibration/2")  # every row, no Gram
STATS_FILE = "stats.npz"
_STAT_FIELDS = ("absmax", "tensor_min", "tensor_max", "rows", "weight_absmax", "gram",
                "gram_rows")
_FLOAT_FIELDS = ("absmax", "tensor_min", "tensor_max", "weight_absmax")
_ROW_DTYPES = (np.float16, np.float32)
# A Gram's correlation matrix D^-1/2 G D^-1/2 (unit diagonal) plus this times I must factor:
# float32 accumulation over ~1e3 rows leaves eigenvalues near -1e-5 at K' = 4608
_PSD_SLACK = 1e-3
# diagonal bounds: float32 sums of squares (and float16 kept rows, 2^-11 each) within this
_DIAG_RTOL = 4e-3


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
                     num_samples: int | None = None,
                     seconds: float = 0.0, overwrite: bool = False,
                     arg: str = "path") -> pathlib.Path:
    """Write ``calib`` (statistics + segment table) and how it was made to ``path``.

    ``source``: ``{"model": NAME}`` or ``{"checkpoint": DIR}``, where the float weights live.
    ``num_samples``: recorded instead of ``per_class`` when the labels were ``spread_labels``.
    """
    layers = list(calib.stats)
    body = {"format": CALIB_FORMAT, "kind": "calibration", "library_version": __version__,
            "recipe": dataclasses.asdict(recipe), "num_segments": int(calib.num_segments),
            "segment_of_step": [int(v) for v in calib.segment_of_step],
            "keep_float": {k: list(v) for k, v in calib.keep_float.items()}, "layers": layers,
            "weight_only": list(calib.weight_only), "roles": calib.roles,
            "source": source, "config": to_dict(cfg), "params_sha256": params_sha256,
            **({"per_class": per_class} if num_samples is None else
               {"num_samples": int(num_samples)}),
            "seed": seed, "rows_per_step": rows_per_step,
            "seconds": round(seconds, 3)}
    arrays = {}
    for i, p in enumerate(layers):
        arrays.update(_layer_arrays(i, calib.stats[p]))
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


def _layer_arrays(i: int, s: LayerStats) -> dict[str, np.ndarray]:
    """The stats.npz arrays of layer ``i`` (a ``LayerStats`` without a Gram gets that of its
    rows)."""
    gram, count = gram_of(s)
    rows = np.asarray(s.rows)
    out = {f"{i}.{f}": np.asarray(getattr(s, f), np.float32) for f in _FLOAT_FIELDS}
    out.update({f"{i}.rows": rows if rows.dtype in _ROW_DTYPES else rows.astype(np.float32),
                f"{i}.gram": gram, f"{i}.gram_rows": np.asarray(count, np.int64)})
    return out


def _check_format(path: pathlib.Path) -> None:
    """A calibration directory of an older format: one line asking to calibrate again
    (anything else wrong with the metadata is ``manifest.read_record``'s to say)."""
    try:
        meta = json.loads((path / files.METADATA_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return
    if isinstance(meta, dict) and meta.get("kind") == "calibration" \
            and meta.get("format") in _OLDER_FORMATS:
        raise CalibrationError(
            f"{str(path)!r}: calibration format {meta['format']!r} keeps every sampled "
            f"activation row; this version reads {CALIB_FORMAT!r} (Gram matrices and a few "
            "rows per step): run trdq calibrate again")


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
    if (s.rows.ndim != 3 or s.rows.shape[0] != num_steps or not s.rows.shape[1]
            or not s.rows.shape[2] or s.rows.shape[2] % k or s.rows.dtype not in _ROW_DTYPES):
        raise CalibrationError(f"{where}: layer {p!r} rows has shape {s.rows.dtype}"
                               f"{list(s.rows.shape)}, expected float16 or float32 [{num_steps}, "
                               f"R, taps * {k}] (taps = 1 for a Dense)")
    width = s.rows.shape[2]
    if s.gram.shape != (packed_size(width),) or s.gram.dtype != np.float32:
        raise CalibrationError(f"{where}: layer {p!r} gram has shape {s.gram.dtype}"
                               f"{list(s.gram.shape)}, expected float32 [{packed_size(width)}] "
                               f"(the packed upper triangle of its [{width}, {width}] Gram "
                               "matrix)")
    count = np.asarray(s.gram_rows)
    if count.shape != () or not np.issubdtype(count.dtype, np.integer):
        raise CalibrationError(f"{where}: layer {p!r} gram_rows has shape {count.dtype}"
                               f"{list(count.shape)}, expected one int (the rows summed)")


def _first_step(bad: np.ndarray) -> int:
    """The first step (leading index) where the boolean ``bad [S, ...]`` holds."""
    return int(np.argmax(bad.reshape(len(bad), -1).any(axis=1)))


def _check_values(p: str, s: LayerStats, where: str) -> None:
    """Refuse statistics that contradict their definitions (``LayerStats``, shapes checked):
    non-finite values, negative magnitudes, ``tensor_min > tensor_max``, a step whose largest
    absmax is not ``max(-tensor_min, tensor_max)``, kept rows beyond their step's per-channel
    absmax or range (relative rounding 1e-6 allowed; float16 rows compared in float16), and a
    Gram matrix that is not one (``_check_gram``)."""
    def fail(field: str, what: str, bad: np.ndarray):
        step = (f" (step {_first_step(bad)})" if field not in ("weight_absmax", "gram", "gram_rows")
                else "")
        raise CalibrationError(f"{where}: layer {p!r} {field}: {what}{step}")

    for field in _STAT_FIELDS[:-1]:
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
    # bounds rounded like the rows (round to nearest is monotone: a row within its bound
    # stays within the rounded bound)
    def as_rows(a):
        with np.errstate(over="ignore"):  # beyond float16: inf, which bounds every row
            return np.asarray(a, np.float32).astype(rows.dtype)

    bad = np.abs(rows) > as_rows(s.absmax[:, None, :] + tol[:, None, None])
    if bad.any():
        fail("rows", f"{np.count_nonzero(bad)} values exceed their channel's absmax", bad)
    lo, hi = s.tensor_min, s.tensor_max
    if s.rows.shape[2] > k:  # conv patches: padding taps hold zeros
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    bad = (rows < as_rows(lo - tol)[:, None, None]) | (rows > as_rows(hi + tol)[:, None, None])
    if bad.any():
        fail("rows", f"{np.count_nonzero(bad)} values outside [tensor_min, tensor_max]", bad)
    _check_gram(s, lambda field, what: fail(field, what, np.zeros(1, bool)))


def _check_gram(s: LayerStats, fail) -> None:
    """The Gram matrix ``G = Σ xᵀx`` of ``gram_rows`` sampled rows, of which the kept rows are
    some: ``Σ_kept x_j² <= G_jj <= (gram_rows / steps) Σ_steps absmax_j²`` (float32 sums: a
    relative ``_DIAG_RTOL``), ``|G_ij| <= sqrt(G_ii G_jj)`` and positive semi-definite within
    rounding (``D^-1/2 G D^-1/2 + _PSD_SLACK I`` has a Cholesky factor). Stored as a packed
    triangle, it is symmetric by construction."""
    steps, kept, width = s.rows.shape
    count = int(s.gram_rows)
    if count < steps * kept or count % steps:
        fail("gram_rows", f"{count} rows summed, expected a multiple of the {steps} steps and at "
             f"least the {steps * kept} rows kept")
    k = s.absmax.shape[1]
    per_step = count // steps
    g = unpack_gram(s.gram, np.float64)
    diag = np.diag(g).copy()
    floor = 1e-12 * max(float(diag.max()), 0.0) + 1e-30  # a column of zeros is exact
    absmax2 = np.asarray(s.absmax, np.float64) ** 2  # [S, K]
    bound = np.tile(per_step * absmax2.sum(axis=0), width // k)  # column j reads channel j % K
    kept_sq = np.sum(np.asarray(s.rows, np.float64).reshape(-1, width) ** 2, axis=0)
    for bad, what in ((diag < 0, "negative (a sum of squares)"),
                      (diag > bound * (1 + _DIAG_RTOL) + floor,
                       "above the rows summed times their channel's absmax squared"),
                      (diag < kept_sq * (1 - _DIAG_RTOL) - floor,
                       "below the kept rows' sum of squares (which it includes)")):
        if bad.any():
            j = int(np.argmax(bad))
            fail("gram", f"{np.count_nonzero(bad)} diagonal values {what} (first: column {j}, "
                 f"{diag[j]:.6g}; the kept rows give {kept_sq[j]:.6g}, the bound is "
                 f"{bound[j]:.6g})")
    scale = np.sqrt(np.maximum(diag, 0))
    live = scale > np.sqrt(floor)
    if not live.all() and np.any(np.abs(g[~live]) > floor):
        fail("gram", "a column whose diagonal is 0 holds non-zero entries (not a Gram matrix)")
    inv = np.where(live, 1.0 / np.where(live, scale, 1.0), 0.0)
    g *= inv[:, None]  # in place: g becomes the correlation matrix (zero where dead)
    g *= inv[None, :]
    np.fill_diagonal(g, 0.0)
    i, j = np.unravel_index(int(np.argmax(np.abs(g))), g.shape)
    if abs(g[i, j]) > 1 + _PSD_SLACK:
        fail("gram", f"entry [{i}, {j}] = {g[i, j] * scale[i] * scale[j]:.6g} exceeds "
             f"sqrt(G_ii G_jj) = {scale[i] * scale[j]:.6g} (Cauchy-Schwarz: not a Gram matrix)")
    np.fill_diagonal(g, live + _PSD_SLACK)
    try:
        np.linalg.cholesky(g)
    except np.linalg.LinAlgError:
        fail("gram", f"not positive semi-definite within rounding (its correlation matrix "
             f"plus {_PSD_SLACK} I has no Cholesky factor)")


def load_calibration(path: str | os.PathLike):
    """``(Calibration, recipe, cfg, meta)`` from a ``save_calibration`` directory.

    Raises ``CalibrationError`` naming the field for a missing, corrupt, edited or inconsistent
    directory.
    """
    path = pathlib.Path(path).expanduser()
    _check_format(path)
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
        stats = {p: LayerStats(**{f: arrays[f"{i}.{f}"] for f in _STAT_FIELDS[:-1]},
                               gram_rows=arrays[f"{i}.gram_rows"])
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
