"""Export a generation directory's images as one ``.npz`` in the layout FID tools read.

``export_npz(generation_dir, out_file)`` writes (``numpy.savez`` layout, stored uncompressed):

    arr_0        uint8 [n, H, W, 3]: the samples' PNGs, decoded (grayscale repeated to 3
                 channels), in sample-index order
    arr_1        int64 [n]: each exported sample's class label; only for a run conditioned on
                 class labels (an unconditional run, or one conditioned on another pytree, e.g.
                 text embeddings, has no ``arr_1``: its conditioning stays in the generation
                 directory's ``cond.npz``)
    indices      int64 [n]: which samples of the generation directory ``arr_0`` holds
    trdq_export  a 0-d unicode array holding JSON, the marker that says trdq_jax wrote the file:
                 ``{"format": "trdq_jax.export/1", "kind": "export", "generation", "run_sha256",
                 "num_samples", "count", "indices_sha256", "samples_sha256", "shape",
                 "per_class", "labels", "library_version"}``

This is what guided-diffusion's ``evaluations/evaluator.py`` (the ADM suite) reads: it opens the
zip member ``arr_0.npy`` alone (streamed, npy format 1.0 or 2.0), and looks for other members
only to find precomputed ``mu``/``sigma`` statistics, so the extra members are ignored. Other
tools (torch-fidelity, clean-fid) take ``np.load(f)["arr_0"]`` as a uint8 NHWC batch.

The images are the generation directory's PNG files, not its shard arrays (a latent model's
shards hold latents, its PNGs the decoded pixels). Only shards whose manifest line and files
verify (``generation_dir.verify``) are used, and every PNG's bytes are checked again against
their manifest sha256 as they are decoded; a damaged one stops the export naming its index.

Writing: the file is streamed image by image into a temporary sibling (memory: one image, not
the whole array) and moved into place atomically (``trdq_jax.files``): a kill or a full disk
leaves no partial file, the free space is checked first. An existing file is replaced only
when it carries the ``trdq_export`` marker and ``overwrite=True``; anything else is refused,
naming the path. A re-export that would write exactly the file already there (the same run,
the same samples and PNG checksums, the file intact) writes nothing and needs no
``overwrite``: re-running ``trdq generate --export-npz`` on a finished directory is a no-op.
Replacing an export by a different one (a partial ``allow_missing`` export by the finished
one, another ``per_class``, another run) needs ``overwrite=True``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import re
import time
import zipfile

import numpy as np

from trdq_jax import files
from trdq_jax.sampling import generation_dir as gd

FORMAT = "trdq_jax.export/1"
KIND = "export"
MARKER = files.NPZ_MARKER


class ExportError(ValueError):
    """A generation directory that cannot be exported as asked (the message says why)."""


# ----------------------------------------------------------------------------- small helpers


def ranges(indices) -> str:
    """Sorted ints as compact ranges: ``[0, 1, 2, 5, 7, 8]`` -> ``"0..2, 5, 7..8"``."""
    indices = np.asarray(indices, np.int64)
    if not len(indices):
        return "none"
    cuts = np.flatnonzero(np.diff(indices) != 1) + 1
    parts = []
    for run in np.split(indices, cuts):
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}..{run[-1]}")
    return ", ".join(parts)


def _listed(indices, limit: int = 8) -> str:
    """``ranges`` shortened to ``limit`` ranges for a one-line message."""
    parts = ranges(indices).split(", ")
    more = len(parts) - limit
    return ", ".join(parts[:limit]) + (f" (+{more} more ranges)" if more > 0 else "")


def read_marker(path: str | os.PathLike) -> dict | None:
    """The ``trdq_export`` marker of an npz this module wrote, else None (any other file)."""
    data = files.npz_marker(path)
    if (data is not None and str(data.get("format", "")).startswith("trdq_jax.export/")
            and data.get("kind") == KIND):
        return data
    return None


def _intact(path: pathlib.Path) -> bool:
    """Every member of the zip ``path`` reads back with its CRC."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except Exception:
        return False


def check_target(out_file, overwrite: bool, arg: str) -> tuple[pathlib.Path, dict | None]:
    """``(target resolved, marker of the trdq export already there or None)``; an
    ``OutputError`` naming ``arg`` and the path for a target that must not be written (an
    existing export of trdq passes even without ``overwrite``: ``export_npz`` decides once it
    knows whether the new one differs)."""
    if not isinstance(out_file, (str, os.PathLike)) or not str(out_file):
        raise files.OutputError(f"{arg}: expected a path, got {out_file!r}")
    path = pathlib.Path(out_file).expanduser()
    if not path.is_file():  # nothing there, a directory...: the project's checks say what

        return files.resolve_target(out_file, kind=KIND, overwrite=overwrite, is_dir=False,
                                    arg=arg), None
    target = path.resolve()
    files.recover(target)  # temporaries of killed exports
    marker = read_marker(target)
    if marker is None:
        raise files.OutputError(f"{arg}: {str(target)!r} exists and was not written by trdq_jax "
                                "(no trdq_export marker); refusing to replace it: choose "
                                "another path")
    owner = next((a for a in target.parents if files.dir_kind(a) is not None), None)
    if owner is not None:
        raise files.OutputError(f"{arg}: {str(target)!r} is inside {str(owner)!r}, "
                                f"{files.describe(files.dir_kind(owner))}; outputs do not nest: "
                                "choose a path outside it")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise files.OutputError(f"{arg}: cannot write {str(target)!r}: {str(target.parent)!r} "
                                "is not writable (read-only file system or permissions)")
    return target, marker


# ----------------------------------------------------------------------------- selection


def _selection(meta: dict, cond: gd.RunCond, per_class: int | None) -> np.ndarray:
    """The sample indices asked for, available or not: all, or the first ``per_class`` of
    each class of the run (by index)."""
    n = meta["run"]["num_samples"]
    if per_class is None:
        return np.arange(n, dtype=np.int64)
    picked = []
    classes, counts = np.unique(cond.labels, return_counts=True)
    short = [(int(c), int(k)) for c, k in zip(classes, counts) if k < per_class]
    if short:
        c, k = short[0]
        raise ExportError(f"per_class: class {c} has only {k} samples in the run (of "
                          f"{len(classes)} classes, {len(short)} have fewer than {per_class}); "
                          "ask for fewer per class or generate more")
    for c in classes:
        picked.append(np.flatnonzero(cond.labels == c)[:per_class])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _per_class_available(available: np.ndarray, cond: gd.RunCond, per_class: int) -> np.ndarray:
    """The first ``per_class`` available samples of each class of the run."""
    picked = []
    labels = cond.labels[available]
    for c in np.unique(cond.labels):
        have = available[labels == c]
        if len(have) < per_class:
            raise ExportError(f"per_class: class {int(c)} has only {len(have)} finished samples, "
                              f"{per_class} asked for; resume the generation to finish more, or "
                              "ask for fewer per class")
        picked.append(have[:per_class])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _damaged(found: gd.Verified, grid: dict, starts, where: pathlib.Path) -> ExportError:
    start = min(starts)
    why = found.redo[start]
    shard = grid[start]
    hit = re.search(r"images/(\d+)\.png", why)
    which = f"sample {int(hit.group(1))}" if hit else f"samples {shard.start}..{shard.stop - 1}"
    more = f" (and {len(starts) - 1} more shards)" if len(starts) > 1 else ""
    return ExportError(f"generation_dir: {which} of {str(where)!r} does not verify ({why}){more}; "
                       "resume the generation (the same trdq generate command) to redo it, then "
                       "export again")


# ----------------------------------------------------------------------------- the export


def export_npz(generation_dir, out_file, *, allow_missing: bool = False,
               per_class: int | None = None, overwrite: bool = False, progress: bool = False,
               arg: str = "out_file") -> dict:
    """Write the images of the generation directory ``generation_dir`` to ``out_file`` as an
    npz with ``arr_0`` uint8 ``[n, H, W, 3]`` and, for a class-label run, ``arr_1`` int64
    labels (see the module docstring for the layout, the marker and the replacement rules).

    allow_missing: export the samples that are finished (their indices recorded in
    ``indices`` and the summary) instead of refusing a directory that lacks some;
    per_class: only the first ``per_class`` samples (by index) of each class of the run, in
    index order (a class-label run only; a class with fewer is refused, naming it);
    overwrite: replace an existing export written by trdq_jax (never anything else).
    Refused: a run whose samples are not images (no PNGs), samples that do not verify (a
    damaged PNG: resume the generation to redo it), missing samples without
    ``allow_missing``. Returns ``{"out", "generation", "num_exported", "shape", "labels",
    "indices", "missing", "per_class", "unchanged", "bytes", "seconds"}``.
    """
    t0 = time.perf_counter()
    if per_class is not None and (isinstance(per_class, bool)
                                  or not isinstance(per_class, (int, np.integer))
                                  or per_class < 1):
        raise ValueError(f"per_class: expected a positive int, got {per_class!r}")
    target, existing = check_target(out_file, overwrite, arg)
    where = pathlib.Path(generation_dir).expanduser()
    if files.dir_kind(where) != gd.KIND:
        found_kind = files.dir_kind(where) if where.is_dir() else None
        what = ("does not exist" if not where.exists() else
                "is not a directory" if not where.is_dir() else
                f"is {files.describe(found_kind)}, not a generation directory")
        raise ExportError(f"generation_dir: {str(where)!r} {what} (trdq generate --out DIR "
                          "writes one)")
    try:
        meta, cond = gd.read_metadata(where, "generation_dir")
    except gd.GenerationDirError as e:
        raise ExportError(str(e)) from None
    if not meta["images"]:
        raise ExportError(f"generation_dir: {str(where)!r} holds samples that are not images "
                          "(e.g. videos; no PNGs were written): FID tools take images, nothing "
                          "to export (load_generated reads the shards)")
    if per_class is not None and cond.labels is None:
        raise ExportError(f"per_class: {str(where)!r} holds a run without class labels; "
                          "export all its samples instead")
    grid = gd.shard_grid(meta)
    bounds = np.asarray(list(grid), np.int64)
    wanted = _selection(meta, cond, per_class)
    shard_of = lambda idx: bounds[np.searchsorted(bounds, idx, side="right") - 1]  # noqa: E731
    starts = sorted(set(int(s) for s in np.unique(shard_of(wanted)))) if (
        per_class is None or not allow_missing) else list(grid)
    found = gd.verify(where, meta, cond, starts)
    damaged = sorted(s for s in found.redo if s in set(starts))
    if damaged:
        raise _damaged(found, grid, damaged, where)
    done = np.asarray(sorted(found.done), np.int64)
    if per_class is not None and allow_missing:  # the first K finished ones of each class
        every = np.arange(meta["run"]["num_samples"], dtype=np.int64)
        available = every[np.isin(shard_of(every), done)]
        chosen = _per_class_available(available, cond, per_class)
        missing = np.setdiff1d(wanted, chosen)  # of the first K per class, those left out
    else:
        finished = np.isin(shard_of(wanted), done)
        missing, chosen = wanted[~finished], wanted[finished]
        if len(missing) and not allow_missing:
            raise ExportError(f"generation_dir: {str(where)!r} lacks {len(missing)} of the "
                              f"{len(wanted)} samples to export ({_listed(missing)}); resume "
                              "the generation (the same trdq generate command) to finish them, "
                              "or pass --allow-missing / allow_missing=True to export the "
                              f"{len(chosen)} finished ones")
    if not len(chosen):
        raise ExportError(f"generation_dir: {str(where)!r} has no finished samples yet; nothing "
                          "to export")
    records = {r["index"]: r for s in np.unique(shard_of(chosen))
               for r in found.done[int(s)]["samples"]}
    first = _decode(where, records[int(chosen[0])])
    shape = list(first.shape)
    labels = None if cond.labels is None else cond.labels[chosen].astype(np.int64)
    marker = _marker(where, meta, chosen, records, shape, per_class, labels is not None)
    summary = {"out": str(target), "generation": str(where.resolve()),
               "num_exported": int(len(chosen)), "shape": [int(len(chosen)), *shape],
               "labels": labels is not None, "indices": _listed(chosen),
               "missing": int(len(missing)), "per_class": per_class}
    if existing is not None:
        same = {k: v for k, v in existing.items() if k != "library_version"} == \
            {k: v for k, v in marker.items() if k != "library_version"}
        if same and _intact(target):
            return {**summary, "unchanged": True, "bytes": target.stat().st_size,
                    "seconds": round(time.perf_counter() - t0, 3)}
        if not overwrite:
            raise files.OutputError(
                f"{arg}: {str(target)!r} exists (a trdq_jax export of {existing.get('count')} "
                f"samples of {existing.get('generation')!r}, not this export); pass --overwrite "
                "/ overwrite=True to replace it")
    pixels = int(np.prod(shape))
    files.check_free_space(target, len(chosen) * (pixels + 16) + len(json.dumps(marker)) * 4
                           + (1 << 16), arg)

    def write(tmp: pathlib.Path) -> None:
        _write_npz(tmp, where, chosen, records, first, labels, marker, progress)

    files.write_file(target, write, kind=KIND, overwrite=existing is not None, arg=arg)
    return {**summary, "unchanged": False, "bytes": target.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 3)}


def _marker(where: pathlib.Path, meta: dict, chosen: np.ndarray, records: dict, shape: list,
            per_class, labels: bool) -> dict:
    from trdq_jax._version import __version__
    run = json.dumps(meta["run"], sort_keys=True, default=float).encode()
    samples = hashlib.sha256()
    for i in chosen:
        samples.update(f"{int(i)}:{records[int(i)]['sha256']}\n".encode())
    return {"format": FORMAT, "kind": KIND, "generation": str(where.resolve()),
            "run_sha256": hashlib.sha256(run).hexdigest(),
            "num_samples": int(meta["run"]["num_samples"]), "count": int(len(chosen)),
            "indices": _listed(chosen),
            "indices_sha256": hashlib.sha256(np.asarray(chosen, np.int64).tobytes()).hexdigest(),
            "samples_sha256": samples.hexdigest(), "shape": shape, "per_class": per_class,
            "labels": labels, "library_version": __version__}


def _decode(where: pathlib.Path, record: dict, shape=None) -> np.ndarray:
    """The PNG of a manifest record as uint8 ``[H, W, 3]``, its bytes checked against the
    record's sha256 first."""
    from PIL import Image
    index, name = record["index"], record["file"]
    resume = "resume the generation (the same trdq generate command) to redo it"
    try:
        data = (where / name).read_bytes()
    except OSError as e:
        raise ExportError(f"generation_dir: sample {index}: cannot read {name} "
                          f"({e.strerror or e}); {resume}") from None
    if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ExportError(f"generation_dir: sample {index}: {name} differs from its manifest "
                          f"line (damaged or changed during the export); {resume}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode not in ("L", "RGB"):
                raise ExportError(f"generation_dir: sample {index}: {name} is a {image.mode} "
                                  "PNG, expected grayscale (L) or RGB")
            pixels = np.asarray(image.convert("RGB"), np.uint8)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"generation_dir: sample {index}: {name} cannot be decoded "
                          f"({type(e).__name__}); {resume}") from None
    if shape is not None and list(pixels.shape) != list(shape):
        raise ExportError(f"generation_dir: sample {index}: {name} is {list(pixels.shape)}, the "
                          f"first exported one {list(shape)}; every image must have one size")
    return pixels


def _write_npz(tmp: pathlib.Path, where: pathlib.Path, chosen: np.ndarray, records: dict,
               first: np.ndarray, labels, marker: dict, progress: bool) -> None:
    """The npz, ``arr_0`` streamed one PNG at a time (numpy.savez's layout: stored members
    ``NAME.npy``, zip64)."""
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(chosen), unit="image", desc="export", dynamic_ncols=True)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                    "fortran_order": False, "shape": (len(chosen), *first.shape)})
                half = len(chosen) // 2
                for k, i in enumerate(chosen):
                    image = first if k == 0 else _decode(where, records[int(i)], first.shape)
                    f.write(np.ascontiguousarray(image).tobytes())
                    if bar is not None:
                        bar.update(1)
                    if k == half:
                        files.crash_point("export-half-written")
            members = {"indices": np.asarray(chosen, np.int64),
                       MARKER: np.array(json.dumps(marker, sort_keys=True))}
            if labels is not None:
                members = {"arr_1": labels, **members}
            for name, value in members.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, value, allow_pickle=False)
    finally:
        if bar is not None:
            bar.close()
