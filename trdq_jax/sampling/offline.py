"""Large-batch offline generation into a resumable directory, sharded over the local devices.

``generate_to_dir(out, model, params, cfg, num_samples=N, ...)`` draws samples ``0 .. N-1`` in
batches of ``batch_per_device x data-axis size`` (or ``batch_size``). Each batch is sharded over
a ``jax.sharding.Mesh`` of this process's devices with axes ``("data", "model")``: the batch
along ``"data"``, each parameter's widest dimension divisible by the ``"model"`` size along
``"model"`` (``model_parallel=1``, the default, replicates the parameters), and sampled by the
same jitted scan as ``sample``: sample ``i`` depends only on
``(seed, i, label_i)``, not on the device count, the batch size or the process count. With
several processes (``jax.distributed.initialize()`` beforehand) process ``p`` of ``P`` takes
the batches ``b`` with ``b % P == p`` and writes only those.

Layout of ``out`` (kind ``generation``)::

    metadata.json            format, kind, the run's fingerprint (source, config, seed, labels,
                             number of samples, guidance scale, CFG plan)
    shards/00000000.npz      per batch: "samples" float32 [n, ...] (videos [n, F, H, W, C]),
                             "labels" int32 [n], "indices" int64 [n]
    images/00000000.png      per image sample (uint8, [-1, 1] mapped to 0..255); not for videos
    manifest-P.jsonl         per process: one line per finished batch, appended only after every
                             file of the batch is complete on disk:
                             {"start", "stop", "shard", "samples": [{"index", "label", "seed",
                             "file"}, ...]} ("file": the PNG, or the shard for a video)

Every file is written to a temporary name and renamed into place; a batch counts as done only
once its manifest line is there (a torn last line is ignored). Re-running the same call after a
crash or a kill therefore redoes only unfinished batches and ends with exactly the files of an
uninterrupted run. A directory made by a different run (another model, seed, label list...)
is refused, naming what differs; nothing in it is touched. A failed write (a full disk, a file
system gone read-only) stops the run with an ``OSError`` naming the file; what was finished
stays, and the same call resumes once the disk has room.
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
from trdq_jax.manifest import tree_digest
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


def _sampler_record(sampler) -> dict:
    """The sampler's defining data: its steps and segments (ints, identical on every backend;
    the float coefficients follow from them and the config's schedule)."""
    return {"solver": sampler.solver, "num_train_steps": int(sampler.num_train_steps),
            "stochastic": bool(sampler.stochastic), "num_segments": int(sampler.num_segments),
            "train_timesteps": np.asarray(sampler.train_timesteps).astype(int).tolist(),
            "segment_of_step": np.asarray(sampler.segment_of_step).astype(int).tolist()}


def fingerprint(cfg, source: str, num_samples: int, labels: np.ndarray, seed: int,
                cfg_scale: float, share_cfg, sampler=None, params=None) -> dict:
    """What makes two runs the same run (a batch size or a device count does not): the
    weights (``source`` and the sha256 of ``params``' bytes), the config, the sampler's steps
    and segments, the seed, the labels, the guidance and the CFG plan."""
    plan = share_cfg if isinstance(share_cfg, bool) else {
        "name": share_cfg.name, "sha256": hashlib.sha256(share_cfg.dumps().encode()).hexdigest()}
    run = {"source": source, "config": to_dict(cfg), "num_samples": int(num_samples),
           "seed": int(seed), "cfg_scale": float(cfg_scale), "share_cfg": plan,
           "labels_sha256": hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest()}
    if sampler is not None:
        run["sampler"] = _sampler_record(sampler)
    if params is not None:
        run["params_sha256"] = tree_digest(params)
    return run


def check_out(out, arg: str = "out") -> pathlib.Path:
    """``out`` resolved, when it may become (or already is) a generation directory; else an
    ``OutputError`` naming ``arg`` (a file, a foreign directory, another output, an unwritable
    place...)."""
    if isinstance(out, (str, os.PathLike)) and str(out):  # else resolve_target says what is wrong
        path = pathlib.Path(out).expanduser()
        found = files.dir_kind(path) if path.is_dir() else None
        if found not in (None, KIND):
            raise files.OutputError(f"{arg}: {str(path)!r} is {files.describe(found)}, not a "
                                    "generation directory; refusing to touch it: choose a new "
                                    "directory")
    return files.resolve_target(out, kind=KIND, overwrite=True, is_dir=True, arg=arg)


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


def _entry_files(entry: dict) -> set[str]:
    return {entry["shard"], *(s["file"] for s in entry["samples"])}


def finished_batches(out: pathlib.Path) -> dict[int, dict]:
    """``{start: manifest entry}`` of every batch whose manifest line is complete and whose
    files exist (a torn last line, from a kill mid-append, is ignored)."""
    done = {}
    for manifest in sorted(out.glob("manifest-*.jsonl")):
        for line in manifest.read_text().splitlines():
            try:
                entry = json.loads(line)
                complete = all((out / f).is_file() for f in _entry_files(entry))
                start = int(entry["start"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # the torn tail of a killed append (or an edited line): redone
            if complete:
                done[start] = entry
    return done


def _atomic(path: pathlib.Path, write) -> None:
    """``write(tmp)``, fsync, rename over ``path``. Not ``files.replace_file``: that one scans
    the directory for stale temporaries on every call, quadratic over tens of thousands of
    PNGs in one directory. A kill mid-write can leave a hidden ``.NAME.tmpPID`` here; it is
    never named by the manifest, and not removed (another host's writer may own it)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # named for the file it was meant to be, not the temporary
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_batch(out: pathlib.Path, start: int, samples: np.ndarray, labels: np.ndarray,
                 seed: int, images: bool) -> dict:
    """Write one batch's shard (and PNGs); returns its manifest entry."""
    from PIL import Image

    from trdq_jax.viz import to_uint8
    shard = f"{SHARDS}/{start:08d}.npz"
    indices = np.arange(start, start + len(samples), dtype=np.int64)

    def save_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, samples=samples, labels=labels, indices=indices)

    _atomic(out / shard, save_npz)
    names = [shard] * len(samples)
    if images:
        pixels = to_uint8(samples)
        for k, (i, img) in enumerate(zip(indices, pixels)):
            names[k] = f"{IMAGES}/{i:08d}.png"
            mode = "L" if img.shape[-1] == 1 else "RGB"
            data = img[..., 0] if img.shape[-1] == 1 else img
            _atomic(out / names[k], lambda tmp, d=data, m=mode: Image.fromarray(d, m).save(
                tmp, format="PNG"))
    return {"start": start, "stop": start + len(samples), "shard": shard,
            "samples": [{"index": int(i), "label": int(l), "seed": int(seed), "file": f}
                        for i, l, f in zip(indices, labels, names)]}


def _append(manifest: pathlib.Path, entry: dict) -> None:
    """One manifest line, flushed to disk; after a torn tail (a kill mid-append) the line
    starts on a new line, so the torn one stays the only unreadable line."""
    torn = False
    if manifest.exists() and manifest.stat().st_size:
        with open(manifest, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    try:
        with open(manifest, "a") as f:
            f.write(("\n" if torn else "") + json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a partly written line is a torn tail: ignored, the batch redone
        raise OSError(e.errno, e.strerror or str(e), str(manifest)) from e


def _check_positive(value, arg: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{arg}: expected a positive int, got {value!r}")


def make_mesh(model_parallel: int = 1, devices=None):
    """A ``Mesh`` of ``devices`` (default: this process's) with axes ``("data", "model")`` of
    sizes ``(len(devices) // model_parallel, model_parallel)``, both ``AxisType.Auto`` (XLA
    places the collectives)."""
    devices = list(jax.local_devices() if devices is None else devices)
    _check_positive(model_parallel, "model_parallel")
    if len(devices) % model_parallel:
        raise ValueError(f"model_parallel: expected a divisor of the {len(devices)} local "
                         f"devices, got {model_parallel}")
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((len(devices) // model_parallel, model_parallel), ("data", "model"),
                         devices=devices, axis_types=(auto, auto))


def param_sharding(mesh, params):
    """Per leaf of ``params``: its widest dimension that the ``"model"`` axis divides is split
    along ``"model"``; scalars, vectors too small to split and a model axis of 1 replicate."""
    from jax.sharding import NamedSharding, PartitionSpec
    size = mesh.shape["model"]
    replicated = NamedSharding(mesh, PartitionSpec())

    def rule(leaf):
        shape = np.shape(leaf)
        dims = [d for d in range(len(shape)) if shape[d] % size == 0 and shape[d] >= 2 * size]
        if size == 1 or not dims:
            return replicated
        widest = max(dims, key=lambda d: shape[d])
        spec = [None] * len(shape)
        spec[widest] = "model"
        return NamedSharding(mesh, PartitionSpec(*spec))
    return jax.tree.map(rule, params)


def _batch(cfg, data_size: int, batch_per_device, batch_size) -> int:
    """Samples per batch of this process: ``batch_size`` (a multiple of the data axis), else
    ``batch_per_device x data_size`` (default: ``generation.batch_size`` spread over it)."""
    if batch_per_device is not None and batch_size is not None:
        raise ValueError("batch_size: give batch_per_device or batch_size, not both")
    if batch_size is not None:
        _check_positive(batch_size, "batch_size")
        if batch_size % data_size:
            raise ValueError(f"batch_size: expected a multiple of the data axis size "
                             f"{data_size} (the batch is split evenly over its devices), got "
                             f"{batch_size}")
        return int(batch_size)
    if batch_per_device is None:
        batch_per_device = max(1, cfg.generation.batch_size // data_size)
    _check_positive(batch_per_device, "batch_per_device")
    return int(batch_per_device) * data_size


def _stopped_by(e: OSError, path: pathlib.Path, arg: str) -> OSError:
    message = (f"{arg}: cannot write {str(path)!r}: {e.strerror or e}; the batches finished so "
               "far are kept and the same command resumes from them once the directory is "
               "writable again")
    stopped = OSError(message)  # str() is the message alone, so the CLI can rename ``arg``
    stopped.errno = e.errno
    return stopped


def generate_to_dir(out, model, params, cfg, *, num_samples: int, labels=None, seed: int = 0,
                    batch_per_device: int | None = None, batch_size: int | None = None,
                    model_parallel: int = 1, cfg_scale: float | None = None, apply_fn=None,
                    sampler=None, share_cfg=False, source: str = "", progress: bool = False,
                    on_batch=None, arg: str = "out") -> dict:
    """Generate ``num_samples`` samples into ``out`` (see the module docstring); resumable.

    labels: ints ``[num_samples]`` (default ``i % num_classes``); batch_per_device: samples per
    data-axis device per batch, or batch_size: samples per batch of this process (a multiple of
    the data-axis size); default ``generation.batch_size`` spread over the devices;
    model_parallel: the ``"model"`` axis size (parameters split over it, for models that do not
    fit one device); ``apply_fn`` / ``sampler``: as in ``generate`` (a quantized denoiser and
    its segment-table sampler); ``share_cfg``: a bool or a ``CFGPlan``; ``source``: how the
    weights are named in the fingerprint; ``on_batch(entry)``: called with each finished
    batch's manifest entry once it is on disk (monitoring; whatever it raises, e.g. a
    ``KeyboardInterrupt``, stops the run with every finished batch kept). Returns ``{"out",
    "num_samples", "generated", "skipped", "seconds", "samples_per_s", "devices", "mesh",
    "processes"}`` for this process.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    from trdq_jax.models import input_shape
    from trdq_jax.sampling import Sampler, denoise_fn_for, sample
    from trdq_jax.sampling.generate import null_label
    from trdq_jax.sampling.scan_sampler import initial_noise

    _check_positive(num_samples, "num_samples")
    null = null_label(cfg.model)
    labels = _check_labels(default_labels(num_samples, cfg.model.num_classes)
                           if labels is None else labels, num_samples, null)
    mesh = make_mesh(model_parallel)
    data_size = mesh.shape["data"]
    batch = _batch(cfg, data_size, batch_per_device, batch_size)
    sampler = sampler or Sampler.from_config(cfg.sampler)
    cfg_scale = cfg.sampler.cfg_scale if cfg_scale is None else float(cfg_scale)
    check_out(out, arg)
    run = fingerprint(cfg, source, num_samples, labels, seed, cfg_scale, share_cfg, sampler,
                      params)
    target = _open_dir(out, run, arg)
    process, processes = jax.process_index(), jax.process_count()
    starts = [s for b, s in enumerate(range(0, num_samples, batch)) if b % processes == process]
    done = finished_batches(target)
    todo = [s for s in starts if s not in done]
    data = NamedSharding(mesh, PartitionSpec("data"))
    params = jax.device_put(params, param_sharding(mesh, params))
    apply_fn = apply_fn or denoise_fn_for(model)
    images = len(input_shape(cfg.model)) == 4
    manifest = target / _manifest_name(process)
    size = lambda s: min(batch, num_samples - s)  # noqa: E731
    skipped = sum(size(s) for s in starts if s in done)
    bar = None
    if progress and process == 0:
        from tqdm import tqdm
        bar = tqdm(total=sum(size(s) for s in starts), unit="sample", desc="generate",
                   initial=skipped, dynamic_ncols=True)
    t0 = time.perf_counter()
    generated = 0
    try:
        for start in todo:
            n = size(start)
            padded = -(-n // data_size) * data_size  # the last batch, padded to the data axis
            chunk = np.concatenate([labels[start:start + n],
                                    np.full(padded - n, labels[0], np.int32)])
            shape = input_shape(cfg.model, padded)
            x_T = jax.device_put(initial_noise(seed, shape, start), data)
            x = sample(apply_fn, params, sampler, chunk, seed=seed, cfg_scale=cfg_scale,
                       null_label=null, shape=shape, share_cfg=share_cfg, sample_offset=start,
                       x_T=x_T)
            samples = np.asarray(jax.device_get(x))[:n]
            try:
                entry = _write_batch(target, start, samples, labels[start:start + n], seed,
                                     images)
                files.crash_point(f"generate-{start}-written")
                _append(manifest, entry)
            except OSError as e:
                raise _stopped_by(e, pathlib.Path(e.filename or target), arg) from e
            files.crash_point(f"generate-{start}-done")
            generated += n
            if bar is not None:
                bar.update(n)
            if on_batch is not None:
                on_batch(entry)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    return {"out": str(target), "num_samples": int(num_samples), "generated": generated,
            "skipped": int(skipped), "seconds": round(seconds, 3),
            "samples_per_s": round(generated / seconds, 3) if generated else None,
            "devices": len(mesh.devices.flat), "mesh": dict(mesh.shape),
            "processes": processes}


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
