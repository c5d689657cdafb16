"""Large-batch offline generation into a resumable directory, sharded over the local devices.

``generate_to_dir(out, model, params, cfg, num_samples=N, ...)`` draws samples ``0 .. N-1`` in
batches of ``batch_per_device x local devices``. Each batch is sharded over a one-axis
``jax.sharding.Mesh`` of this process's devices (axis ``"data"``; the parameters are replicated)
and sampled by the same jitted scan as ``sample``: sample ``i`` depends only on
``(seed, i, label_i)``, not on the device count, the batch size or the process count. With
several processes (``jax.distributed.initialize()`` beforehand) process ``p`` of ``P`` takes
the batches ``b`` with ``b % P == p`` and writes only those.

Layout of ``out`` (kind ``generation``)::

    metadata.json            format, kind, the run's fingerprint (source, config, seed, labels,
                             number of samples, guidance scale, CFG plan)
    shards/00000000.npz      per batch: "samples" float32 [n, ...], "labels", "indices"
    images/00000000.png      per image sample (uint8, [-1, 1] mapped to 0..255); not for videos
    manifest-P.jsonl         per process: one line per finished batch
                             {"start", "stop", "labels", "files"}, appended only after every
                             file of the batch is complete on disk

Every file is written to a temporary name and renamed into place; a batch counts as done only
once its manifest line is there (a torn last line is ignored). Re-running the same call after a
crash or a kill therefore redoes only unfinished batches and ends with exactly the files of an
uninterrupted run. A directory made by a different run (another model, seed, label list...)
is refused, naming what differs; nothing in it is touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time

import jax
import numpy as np

from trdq_jax import files
from trdq_jax._version import __version__
from trdq_jax.config import to_dict

FORMAT = "trdq_jax.generation/1"
KIND = "generation"
SHARDS, IMAGES = "shards", "images"


def _manifest_name(process: int) -> str:
    return f"manifest-{process}.jsonl"


def default_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """``i % num_classes``: every class in turn."""
    return np.arange(num_samples, dtype=np.int64) % num_classes


def _check_labels(labels, num_samples: int, null: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (num_samples,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected {num_samples} integer labels (one per sample), got "
                         f"{labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() > null:
        raise ValueError(f"labels: expected values in [0, {null}] ({null} = unconditional), got "
                         f"[{labels.min()}, {labels.max()}]")
    return labels.astype(np.int32)


def fingerprint(cfg, source: str, num_samples: int, labels: np.ndarray, seed: int,
                cfg_scale: float, share_cfg) -> dict:
    """What makes two runs the same run (a batch size or a device count does not)."""
    plan = share_cfg if isinstance(share_cfg, bool) else {
        "name": share_cfg.name, "sha256": hashlib.sha256(share_cfg.dumps().encode()).hexdigest()}
    return {"source": source, "config": to_dict(cfg), "num_samples": int(num_samples),
            "seed": int(seed), "cfg_scale": float(cfg_scale), "share_cfg": plan,
            "labels_sha256": hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest()}


def _open_dir(out, run: dict, arg: str) -> pathlib.Path:
    """The output directory for ``run``: created (metadata only) or checked to be this run's."""
    target = pathlib.Path(out).expanduser().resolve()
    if files.dir_kind(target) is None:
        meta = {"format": FORMAT, "kind": KIND, "library_version": __version__, "run": run}

        def write(tmp: pathlib.Path) -> None:
            (tmp / SHARDS).mkdir()
            (tmp / IMAGES).mkdir()
            files.write_json(tmp / files.METADATA_FILE, meta)

        try:
            files.write_dir(target, write, kind=KIND, arg=arg)
        except files.OutputError:
            if files.dir_kind(target) != KIND:  # not another process of this run creating it
                raise
    if files.dir_kind(target) != KIND:
        raise files.OutputError(f"{arg}: {str(target)!r} is "
                                f"{files.describe(files.dir_kind(target))}, not a generation "
                                "directory")
    stored = json.loads((target / files.METADATA_FILE).read_text()).get("run", {})
    differs = sorted(k for k in set(stored) | set(run) if stored.get(k) != run.get(k))
    if differs:
        raise ValueError(f"{arg}: {str(target)!r} holds another run (differs in "
                         f"{', '.join(differs)}); use a new directory, nothing was changed")
    return target


def finished_batches(out: pathlib.Path) -> dict[int, dict]:
    """``{start: manifest entry}`` of every batch whose manifest line is complete and whose
    files exist (a torn last line, from a kill mid-append, is ignored)."""
    done = {}
    for manifest in sorted(out.glob("manifest-*.jsonl")):
        for line in manifest.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the torn tail of a killed append
            if all((out / f).is_file() for f in entry.get("files", [])):
                done[int(entry["start"])] = entry
    return done


def _atomic(path: pathlib.Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_batch(out: pathlib.Path, start: int, samples: np.ndarray, labels: np.ndarray,
                 images: bool) -> list[str]:
    from PIL import Image

    from trdq_jax.viz import to_uint8
    names = [f"{SHARDS}/{start:08d}.npz"]
    indices = np.arange(start, start + len(samples))
    def save_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, samples=samples, labels=labels, indices=indices)

    _atomic(out / names[0], save_npz)
    if images:
        pixels = to_uint8(samples)
        for i, img in zip(indices, pixels):
            name = f"{IMAGES}/{i:08d}.png"
            mode = "L" if img.shape[-1] == 1 else "RGB"
            data = img[..., 0] if img.shape[-1] == 1 else img
            _atomic(out / name, lambda tmp, d=data, m=mode: Image.fromarray(d, m).save(
                tmp, format="PNG"))
            names.append(name)
    return names


def _append(manifest: pathlib.Path, entry: dict) -> None:
    """One manifest line, flushed to disk; after a torn tail (a kill mid-append) the line
    starts on a new line, so the torn one stays the only unreadable line."""
    torn = False
    if manifest.exists() and manifest.stat().st_size:
        with open(manifest, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(manifest, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def generate_to_dir(out, model, params, cfg, *, num_samples: int, labels=None, seed: int = 0,
                    batch_per_device: int | None = None, cfg_scale: float | None = None,
                    apply_fn=None, sampler=None, share_cfg=False, source: str = "",
                    progress: bool = False, arg: str = "out") -> dict:
    """Generate ``num_samples`` samples into ``out`` (see the module docstring); resumable.

    labels: ints ``[num_samples]`` (default ``i % num_classes``); ``apply_fn`` / ``sampler``:
    as in ``generate`` (a quantized denoiser and its segment-table sampler); ``share_cfg``: a
    bool or a ``CFGPlan``; ``source``: how the weights are named in the fingerprint.
    Returns ``{"out", "num_samples", "generated", "skipped", "seconds", "samples_per_s",
    "devices", "processes"}`` for this process.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    from trdq_jax.models import input_shape
    from trdq_jax.sampling import Sampler, denoise_fn_for, sample
    from trdq_jax.sampling.generate import null_label
    from trdq_jax.sampling.scan_sampler import initial_noise

    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
            or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
    null = null_label(cfg.model)
    labels = _check_labels(default_labels(num_samples, cfg.model.num_classes)
                           if labels is None else labels, num_samples, null)
    devices = jax.local_devices()
    if batch_per_device is None:
        batch_per_device = max(1, cfg.generation.batch_size // len(devices))
    if isinstance(batch_per_device, bool) or not isinstance(batch_per_device, (int, np.integer)) \
            or batch_per_device < 1:
        raise ValueError(f"batch_per_device: expected a positive int, got {batch_per_device!r}")
    sampler = sampler or Sampler.from_config(cfg.sampler)
    cfg_scale = cfg.sampler.cfg_scale if cfg_scale is None else float(cfg_scale)
    files.resolve_target(out, kind=KIND, overwrite=True, is_dir=True, arg=arg)
    run = fingerprint(cfg, source, num_samples, labels, seed, cfg_scale, share_cfg)
    target = _open_dir(out, run, arg)
    process, processes = jax.process_index(), jax.process_count()
    batch = batch_per_device * len(devices)
    starts = [s for b, s in enumerate(range(0, num_samples, batch)) if b % processes == process]
    done = finished_batches(target)
    todo = [s for s in starts if s not in done]
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    data, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh,
                                                                                 PartitionSpec())
    params = jax.device_put(params, replicated)
    apply_fn = apply_fn or denoise_fn_for(model)
    images = len(input_shape(cfg.model)) == 4
    manifest = target / _manifest_name(process)
    bar = None
    if progress and process == 0:
        from tqdm import tqdm
        bar = tqdm(total=sum(min(batch, num_samples - s) for s in starts), unit="sample",
                   desc="generate", initial=sum(min(batch, num_samples - s)
                                                for s in starts if s in done))
    t0 = time.perf_counter()
    generated = 0
    for start in todo:
        n = min(batch, num_samples - start)
        padded = -(-n // len(devices)) * len(devices)  # the last batch, padded to the mesh
        chunk = np.concatenate([labels[start:start + n], np.full(padded - n, labels[0],
                                                                 np.int32)])
        shape = input_shape(cfg.model, padded)
        x_T = jax.device_put(initial_noise(seed, shape, start), data)
        x = sample(apply_fn, params, sampler, chunk, seed=seed, cfg_scale=cfg_scale,
                   null_label=null, shape=shape, share_cfg=share_cfg, sample_offset=start,
                   x_T=x_T)
        samples = np.asarray(jax.device_get(x))[:n]
        names = _write_batch(target, start, samples, labels[start:start + n], images)
        files.crash_point(f"generate-{start}-written")
        _append(manifest, {"start": start, "stop": start + n,
                           "labels": labels[start:start + n].tolist(), "files": names})
        files.crash_point(f"generate-{start}-done")
        generated += n
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    return {"out": str(target), "num_samples": int(num_samples), "generated": generated,
            "skipped": int(sum(min(batch, num_samples - s) for s in starts if s in done)),
            "seconds": round(seconds, 3),
            "samples_per_s": round(generated / seconds, 3) if generated else None,
            "devices": len(devices), "processes": processes}


def load_generated(out) -> tuple[np.ndarray, np.ndarray]:
    """``(samples [N, ...], labels [N])`` of a finished generation directory, in index order;
    ValueError when samples are missing."""
    out = pathlib.Path(out)
    if files.dir_kind(out) != KIND:
        raise ValueError(f"out: {str(out)!r} is not a generation directory")
    run = json.loads((out / files.METADATA_FILE).read_text())["run"]
    done = finished_batches(out)
    got, labels, covered = [], [], 0
    for start in sorted(done):
        if start != covered:
            break
        with np.load(out / f"{SHARDS}/{start:08d}.npz") as data:
            got.append(data["samples"])
            labels.append(data["labels"])
        covered = done[start]["stop"]
    if covered != run["num_samples"]:
        raise ValueError(f"out: {str(out)!r} holds samples 0..{covered - 1} of "
                         f"{run['num_samples']}: resume the run to finish it")
    return np.concatenate(got), np.concatenate(labels)
