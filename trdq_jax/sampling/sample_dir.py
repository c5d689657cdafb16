"""Sample directories: what ``trdq sample`` writes, as one unit.

Layout (written through ``trdq_jax.files.write_dir``: all files appear together or not at all)::

    DIR/samples.npz     "samples" float32 [N, ...spatial, C], "labels" int [N]; a latent
                        model's also "pixels" uint8 [N, H, W, 3], its decoded pictures
    DIR/grid.png        one labelled row per class (``grid_rows``)
    DIR/metadata.json   format, kind "samples", source, config, seed, cfg_scale, share_cfg,
                        manifest (the npz arrays and digests of these fields)
"""
from __future__ import annotations

import os
import pathlib
import zipfile

import numpy as np

from trdq_jax import files, manifest
from trdq_jax._version import __version__
from trdq_jax.config import to_dict
from trdq_jax.sampling.generation_dir import nonfinite_rows

FORMAT = "trdq_jax.samples/1"
SAMPLES_FILE, GRID_FILE = "samples.npz", "grid.png"


def save_sample_dir(path: str | os.PathLike, samples: np.ndarray, labels: np.ndarray, *, cfg,
                    source: str, grid_rows: list, row_labels: list[str], title: str,
                    info: dict | None = None, pixels: np.ndarray | None = None,
                    overwrite: bool = False, arg: str = "path") -> pathlib.Path:
    """Write ``samples`` float ``[N, ...]`` with their ``labels`` int ``[N]``, the grid of
    ``grid_rows`` and the metadata (``info``: extra JSON fields such as seed and cfg_scale;
    ``pixels``: uint8 ``[N, H, W, C]`` decoded pictures of latent samples)."""
    from trdq_jax.viz import save_grid
    samples, labels = np.asarray(samples, np.float32), np.asarray(labels)
    if labels.shape != samples.shape[:1]:
        raise ValueError(f"labels: expected shape ({samples.shape[0]},), got {labels.shape}")
    bad = nonfinite_rows(samples)
    if len(bad):
        listed = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        raise ValueError(f"samples: {len(bad)} of {len(samples)} samples are NaN or infinite "
                         f"(indices {listed}); nothing was written: the model (or its "
                         "quantization) diverged on them")
    arrays = {"samples": samples, "labels": labels}
    if pixels is not None:
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.shape[:1] != samples.shape[:1]:
            raise ValueError(f"pixels: expected uint8 [{len(samples)}, H, W, C], got "
                             f"{pixels.dtype} {list(pixels.shape)}")
        arrays["pixels"] = pixels
    body = {"format": FORMAT, "kind": "samples", "library_version": __version__,
            "source": source, "config": to_dict(cfg), "num_samples": int(len(labels)),
            **(info or {})}
    meta = {**body, "manifest": manifest.make_manifest(body, arrays)}

    def write(tmp: pathlib.Path) -> None:
        np.savez(tmp / SAMPLES_FILE, **arrays)
        files.crash_point("arrays-written")
        save_grid(tmp / GRID_FILE, grid_rows, row_labels, title=title)
        files.write_json(tmp / files.METADATA_FILE, meta)

    return files.write_dir(path, write, kind="samples", overwrite=overwrite, arg=arg)


def load_sample_dir(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(samples, labels, metadata)`` of a ``save_sample_dir`` directory, checked against its
    manifest (``IntegrityError`` naming the cause otherwise)."""
    path = pathlib.Path(path).expanduser()
    meta, _, record = manifest.read_record(path, formats={"samples": FORMAT},
                                           noun="sample directory")
    from trdq_jax.models.weight_files import WeightFileError, check_npz
    try:  # missing, empty, truncated or foreign (a pickle is never unpickled)
        check_npz(path / SAMPLES_FILE)
    except WeightFileError as e:
        raise manifest.IntegrityError(str(e)) from None
    try:
        with np.load(path / SAMPLES_FILE, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise manifest.IntegrityError(f"{str(path / SAMPLES_FILE)!r} is damaged "
                                      f"({type(e).__name__}: {e})") from None
    manifest.check_arrays(record["arrays"], arrays, str(path / SAMPLES_FILE))
    return arrays["samples"], arrays["labels"], meta
