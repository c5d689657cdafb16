"""Large-batch offline generation into a resumable directory, sharded over the local devices.

``generate_to_dir(out, model, params, cfg, num_samples=N, ...)`` draws samples ``0 .. N-1``.
Their files follow a fixed grid of ``shard_size`` samples per shard (the layout and its checks
are ``trdq_jax.sampling.generation_dir``). Samples are computed in batches of
``batch_per_device x data-axis size`` (or ``batch_size``), each sharded over a
``jax.sharding.Mesh`` of this process's devices with axes ``("data", "model")``: the batch along
``"data"``, each parameter's widest dimension divisible by the ``"model"`` size along
``"model"`` (``model_parallel=1``, the default, replicates the parameters). Sample ``i`` depends
only on ``(seed, i, label_i)``: not on the batch it landed in, the device count or the process
count (up to float rounding: XLA may block a matmul differently for another batch size). With
several processes (``jax.distributed.initialize()`` beforehand) process ``p`` of ``P`` owns the
shards ``k`` with ``k % P == p`` and writes only those.

Which samples exist and what each holds depends only on the run's identity. A run (or a
resumed one, with any batch size, device count or process count) computes exactly the samples
of its shards that do not verify: a torn or edited manifest line, a truncated or deleted shard
or PNG is done again, and stale temporaries of this host's dead writers are removed first. A
directory made by a different run (another model, seed, label list...) is refused, naming what
differs; nothing in it is touched. A failed write (a full disk, a file system gone read-only)
stops the run with an ``OSError`` naming the file; what was finished stays, and the same call
resumes once the disk has room. Non-finite samples stop the run naming their indices, unless
``allow_nonfinite`` (then they are written and listed in the manifest line and the summary).
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
from trdq_jax.sampling import generation_dir as gd
from trdq_jax.sampling.generation_dir import KIND

MAX_SAMPLES = 2 ** 31  # sample indices are int32
_HOST_BYTES_PER_SAMPLE = 24  # labels (int32 + int64 for the digest) and a batch's indices


class NonFiniteSamplesError(ValueError):
    """Samples came out NaN or infinite; the message names their indices."""


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


def fingerprint(cfg, source: str, num_samples: int, cond, seed: int, cfg_scale: float,
                share_cfg, sampler=None, params=None, null_cond=None) -> dict:
    """What makes two runs the same run (a batch size or a device count does not): the
    weights (``source`` and the sha256 of ``params``' bytes), the config, the sampler's steps
    and segments, the seed, the conditioning (``cond``: a ``generation_dir.RunCond``, or class
    labels) and its null, the guidance and the CFG plan."""
    plan = share_cfg if isinstance(share_cfg, bool) else {
        "name": share_cfg.name, "sha256": hashlib.sha256(share_cfg.dumps().encode()).hexdigest()}
    cond = cond if isinstance(cond, gd.RunCond) else gd.RunCond.of(labels=cond)
    run = {"source": source, "config": to_dict(cfg), "num_samples": int(num_samples),
           "seed": int(seed), "cfg_scale": float(cfg_scale), "share_cfg": plan}
    if cond.labels is not None:
        run["labels_sha256"] = tree_digest(cond.labels)
    elif cond.leaves is not None:
        run["cond_sha256"] = tree_digest(cond.leaves)
        run["null_cond_sha256"] = tree_digest(null_cond)
    if sampler is not None:
        run["sampler"] = _sampler_record(sampler)
    if params is not None:
        run["params_sha256"] = tree_digest(params)
    return run


def check_out(out, arg: str = "out") -> pathlib.Path:
    """``out`` resolved, when it may become (or already is) a generation directory; else an
    ``OutputError`` naming ``arg`` and the cause (a file, a directory with other contents,
    another output, a damaged generation directory, an unwritable place...)."""
    if isinstance(out, (str, os.PathLike)) and str(out):  # else resolve_target says what is wrong
        path = pathlib.Path(out).expanduser()
        if path.is_dir():
            found = files.dir_kind(path)
            if found == KIND or (found is None and gd.looks_like_generation(path)):
                try:
                    gd.read_metadata(path, arg)
                except gd.GenerationDirError as e:
                    raise files.OutputError(str(e)) from None
            elif found is not None:
                raise files.OutputError(f"{arg}: {str(path)!r} is {files.describe(found)}, not "
                                        "a generation directory; refusing to touch it: choose "
                                        "a new directory")
            elif any(path.iterdir()):
                raise files.OutputError(f"{arg}: {str(path)!r} holds files not written by "
                                        "trdq_jax; refusing to touch them: choose a new (or "
                                        "empty) directory")
    return files.resolve_target(out, kind=KIND, overwrite=True, is_dir=True, arg=arg)


def _open_dir(target: pathlib.Path, run: dict, cond: "gd.RunCond", images: bool,
              shard_size: int | None, arg: str) -> tuple[dict, "gd.RunCond"]:
    """``(metadata, conditioning)`` of the generation directory ``target`` for ``run``:
    created (metadata, conditioning and empty folders only) or checked to be this run's."""
    if files.dir_kind(target) != KIND:
        meta = gd.new_metadata(run, shard_size or gd.DEFAULT_SHARD_SIZE, cond, images,
                               __version__)
        try:
            files.write_dir(target, lambda tmp: gd.write_new(tmp, meta, cond), kind=KIND,
                            arg=arg)
        except files.OutputError:
            if files.dir_kind(target) != KIND:  # not another process of this run creating it
                raise
    try:
        meta, stored_cond = gd.read_metadata(target, arg)
    except gd.GenerationDirError as e:
        raise files.OutputError(str(e)) from None
    stored = meta["run"]
    differs = sorted(k for k in set(stored) | set(run) if stored.get(k) != run.get(k))
    if differs and set(differs) <= _GROWABLE and run["num_samples"] != stored["num_samples"]:
        meta, stored_cond = _grow(target, meta, stored_cond, run, cond, arg)
        differs = []
    if differs:
        raise ValueError(f"{arg}: {str(target)!r} holds another run (differs in "
                         f"{', '.join(differs)}); use a new directory, nothing was changed")
    if shard_size is not None and shard_size != meta["shard_size"]:
        raise ValueError(f"shard_size: {str(target)!r} was made with shard_size "
                         f"{meta['shard_size']}, got {shard_size}; leave it out to resume with "
                         "the directory's own (it fixes which files hold which samples)")
    return meta, stored_cond


_GROWABLE = {"num_samples", "labels_sha256", "cond_sha256"}


def _grow(target: pathlib.Path, meta: dict, stored: "gd.RunCond", run: dict,
          cond: "gd.RunCond", arg: str):
    """Grow the run in ``target`` to ``run["num_samples"]`` when it only adds samples (the
    stored ones and their conditioning unchanged): the conditioning file and then
    ``metadata.json`` are replaced, each atomically; the shards of the existing samples stay as
    they are (``generation_dir.shard_grid``). Shrinking is refused. With several processes,
    process 0 grows it and the others wait for it."""
    old, new = meta["run"]["num_samples"], run["num_samples"]
    if new < old:
        raise ValueError(f"num_samples: {str(target)!r} holds a run of {old} samples; {new} "
                         f"would drop samples {new}..{old - 1}, and shrinking is refused: "
                         "use a new directory (or read the first ones with load_generated)")
    if any(not np.array_equal(a[:old], b) for a, b in
           zip(cond.arrays().values(), stored.arrays().values())):
        raise ValueError(f"{arg}: {str(target)!r} holds another run (the conditioning of its "
                         f"first {old} samples differs); use a new directory, nothing was "
                         "changed")
    if jax.process_index() != 0:
        return _grown_by_process_0(target, run, arg)
    grown = gd.new_metadata(run, meta["shard_size"], cond, meta["images"], __version__,
                            meta["extents"] + [new])
    try:
        if grown["cond_file"]:
            gd.write_atomic(target / grown["cond_file"], gd.cond_bytes(cond))
        files.crash_point("generate-grow-cond-written")
        gd.write_atomic(target / files.METADATA_FILE,
                        (json.dumps(grown, indent=1, default=float) + "\n").encode())
    except OSError as e:
        raise _stopped_by(e, pathlib.Path(e.filename or target), arg) from e
    if meta.get("cond_file") and meta["cond_file"] != grown["cond_file"]:
        (target / meta["cond_file"]).unlink(missing_ok=True)  # ours, replaced
    return gd.read_metadata(target, arg)


def _grown_by_process_0(target: pathlib.Path, run: dict, arg: str, patience: float = 600.0):
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        time.sleep(1.0)
        meta, cond = gd.read_metadata(target, arg)
        if meta["run"] == run:
            return meta, cond
    raise ValueError(f"{arg}: process 0 did not grow {str(target)!r} to {run['num_samples']} "
                     f"samples within {patience:.0f} s; run process 0 too")


def finished_shards(out) -> dict[int, dict]:
    """``{shard start: manifest entry}`` of every shard of the generation directory ``out``
    whose manifest line and files verify (``generation_dir.verify``)."""
    out = pathlib.Path(out)
    meta, cond = gd.read_metadata(out, "out")
    return gd.verify(out, meta, cond).done


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
    message = (f"{arg}: cannot write {str(path)!r}: {e.strerror or e}; the shards finished so "
               "far are kept and the same command resumes from them once the directory is "
               "writable again")
    stopped = OSError(message)  # str() is the message alone, so the CLI can rename ``arg``
    stopped.errno = e.errno
    return stopped


def _check_num_samples(num_samples) -> None:
    """Refuse a sample count this machine cannot even index: above the int32 sample indices,
    or more labels and indices than the host memory holds."""
    _check_positive(num_samples, "num_samples")
    if num_samples > MAX_SAMPLES:
        raise ValueError(f"num_samples: expected at most 2**31 = {MAX_SAMPLES} (sample indices "
                         f"are int32), got {num_samples}")
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on every platform
        return
    needed = num_samples * _HOST_BYTES_PER_SAMPLE
    if needed > available:
        raise ValueError(f"num_samples: {num_samples} samples need about "
                         f"{files.format_bytes(needed)} of host memory for their labels and indices, "
                         f"{files.format_bytes(available)} are available; generate fewer per directory")


def _disk_bytes(num_samples: int, sample_shape: tuple, images: bool, shard_size: int,
                block: int, image_shape: tuple | None = None) -> int:
    """An upper estimate of the bytes ``num_samples`` samples take on disk: float32 shards and
    PNGs (at most their raw bytes plus headers; ``image_shape`` when the pictures are decoded
    pixels, not the samples), each rounded up to the file system's ``block``, and manifest
    lines."""
    values = int(np.prod(sample_shape))
    ceil = lambda n: -(-n // block) * block  # noqa: E731
    shards = -(-num_samples // shard_size)
    png = ceil(int(np.prod(image_shape or sample_shape)) + 300) if images else 0
    return (shards * ceil(4 * values * shard_size + 2000) + num_samples * (png + 300))


def _pending_batches(starts, grid: dict, batch: int):
    """Int64 index arrays of ``batch`` samples (the last one fewer) of the shards ``starts``
    (of ``grid``), in index order: a batch may span shards, and they need not be adjacent."""
    chunk, held = [], 0
    for start in starts:
        indices = np.asarray(grid[start], np.int64)
        while len(indices):
            taken = indices[:batch - held]
            chunk.append(taken)
            held += len(taken)
            indices = indices[len(taken):]
            if held == batch:
                yield np.concatenate(chunk)
                chunk, held = [], 0
    if chunk:
        yield np.concatenate(chunk)


def generate_to_dir(out, model, params, cfg, *, num_samples: int, labels=None, cond=None,
                    null_cond=None, seed: int = 0,
                    batch_per_device: int | None = None, batch_size: int | None = None,
                    model_parallel: int = 1, cfg_scale: float | None = None, apply_fn=None,
                    sampler=None, share_cfg=False, source: str = "",
                    shard_size: int | None = None, allow_nonfinite: bool = False,
                    vae=None, decode_chunk: int | None = None, run_info: dict | None = None,
                    progress: bool = False, on_shard=None, arg: str = "out") -> dict:
    """Generate ``num_samples`` samples into ``out`` (see the module docstring); resumable.

    labels: ints ``[num_samples]`` (default for a class-conditional model: ``i %
    num_classes``); or cond, null_cond: any conditioning pytree with leading axis num_samples
    and its null (``trdq_jax.sampling.conditioning``; recorded in ``cond.npz`` and, per sample,
    as a digest in the manifest); neither for a model without classes (an
    ``ExternalModelConfig`` one): unconditional. batch_per_device: samples per
    data-axis device per batch, or batch_size: samples per batch of this process (a multiple of
    the data-axis size); default ``generation.batch_size`` spread over the devices;
    model_parallel: the ``"model"`` axis size (parameters split over it, for models that do not
    fit one device); ``apply_fn`` / ``sampler``: as in ``generate`` (a quantized denoiser and
    its segment-table sampler); ``share_cfg``: a bool or a ``CFGPlan``; ``source``: how the
    weights are named in the fingerprint; ``shard_size``: samples per file of the shard grid,
    fixed when the directory is made (default 64; a resume may leave it out);
    ``allow_nonfinite``: write NaN/Inf samples (listed in the summary and their shard's
    manifest line) instead of stopping; ``on_shard(entry)``: called with each finished shard's
    manifest entry once it is on disk (monitoring; whatever it raises, e.g. a
    ``KeyboardInterrupt``, stops the run with every finished shard kept); ``vae``: ``(VAEConfig,
    params)`` of a latent model (``trdq_jax.checkpoint.restore_vae``): the shards keep the
    latents and the PNGs are the decoded pixels, decoded on the devices right after each batch
    is sampled, ``decode_chunk`` samples at a time (default ``decode.DEFAULT_DECODE_CHUNK``;
    part of the fingerprint: the VAE's config and weights); ``run_info``: JSON describing the
    conditioning for people (e.g. ``{"prompts": [...], "null_branch": ...}``: sample i took
    prompt i mod P), recorded in the run (``metadata.json``) and part of its fingerprint. Returns ``{"out",
    "num_samples", "shard_size", "extents", "generated", "skipped", "redone", "unreadable_lines",
    "removed_temporaries", "nonfinite", "seconds", "samples_per_s", "devices", "mesh",
    "processes"}`` for this process (``redone``: ``{shard file: why}`` of this process's shards
    whose files or manifest lines did not verify); with a ``vae`` also ``"decode_seconds"``,
    the part of ``"seconds"`` spent decoding (the sampler's result awaited first).
    """
    from jax.sharding import NamedSharding, PartitionSpec

    from trdq_jax.models import input_shape
    from trdq_jax.sampling import Sampler, denoise_fn_for, sample
    from trdq_jax.sampling.generate import null_label
    from trdq_jax.sampling.scan_sampler import initial_noise

    _check_num_samples(num_samples)
    if shard_size is not None:
        _check_positive(shard_size, "shard_size")
    labels, cond, null = _run_conditioning(cfg, num_samples, labels, cond, null_cond)
    mesh = make_mesh(model_parallel)
    data_size = mesh.shape["data"]
    batch = _batch(cfg, data_size, batch_per_device, batch_size)
    sampler = sampler or Sampler.from_config(cfg.sampler)
    cfg_scale = cfg.sampler.cfg_scale if cfg_scale is None else float(cfg_scale)
    target = check_out(out, arg)
    sample_shape = input_shape(cfg.model, 1)[1:]
    images = len(sample_shape) == 3 and sample_shape[-1] in (1, 3)  # gray or RGB pictures
    image_shape, decode = None, None
    if vae is not None:
        from trdq_jax.sampling import decode as decoding
        decoding.check_vae_for(cfg.model, vae[0], "vae")
        images, image_shape = True, decoding.pixel_shape(cfg.model, vae[0])
        decode = decoding.make_decoder(*vae, chunk=decode_chunk or decoding.DEFAULT_DECODE_CHUNK)
    block = gd.block_size(target)
    if files.dir_kind(target) != KIND:  # a new directory: every sample is to be written
        gd.no_space(target, _disk_bytes(num_samples, sample_shape, images,
                                        shard_size or gd.DEFAULT_SHARD_SIZE, block, image_shape),
                    arg, f"{num_samples} samples of shape {list(sample_shape)}")
    run_cond = gd.RunCond.of(labels, cond)
    run = fingerprint(cfg, source, num_samples, run_cond, seed, cfg_scale, share_cfg, sampler,
                      params, null)
    if vae is not None:
        run["vae"] = {"config": to_dict(vae[0]), "params_sha256": tree_digest(vae[1])}
    if run_info:
        run["text"] = json.loads(json.dumps(run_info))
    meta, _ = _open_dir(target, run, run_cond, images, shard_size, arg)
    size, grid = meta["shard_size"], gd.shard_grid(meta)
    process, processes = jax.process_index(), jax.process_count()
    mine = [s for k, s in enumerate(grid) if k % processes == process]
    removed = gd.clean_stale_temporaries(target)
    found = gd.verify(target, meta, run_cond, mine)
    todo = [s for s in mine if s not in found.done]
    count = lambda starts: sum(len(grid[s]) for s in starts)  # noqa: E731
    pending, skipped = count(todo), count(found.done)
    gd.no_space(target, _disk_bytes(pending, sample_shape, images, size, block, image_shape), arg,
                f"the {pending} samples still to generate")
    data = NamedSharding(mesh, PartitionSpec("data"))
    params = jax.device_put(params, param_sharding(mesh, params))
    apply_fn = apply_fn or denoise_fn_for(model)
    manifest = target / gd.manifest_name(process)
    bar = None
    if progress and process == 0:
        from tqdm import tqdm
        bar = tqdm(total=pending + skipped, unit="sample", desc="generate", initial=skipped,
                   dynamic_ncols=True)
    buffers = {}  # shard start -> [samples of it computed so far]
    t0 = time.perf_counter()
    generated, nonfinite, decode_seconds = 0, [], 0.0
    try:
        for indices in _pending_batches(todo, grid, batch):
            n = len(indices)
            padded = -(-n // data_size) * data_size  # padded to the data axis
            chosen = np.concatenate([indices, np.full(padded - n, indices[-1])])
            shape = (padded, *sample_shape)
            x_T = jax.device_put(initial_noise(seed, shape, sample_indices=chosen), data)
            batch_cond, batch_null = _batch_conditioning(labels, cond, null, chosen, data)
            x = sample(apply_fn, params, sampler, batch_cond, seed=seed, cfg_scale=cfg_scale,
                       shape=shape, share_cfg=share_cfg, sample_indices=chosen, x_T=x_T,
                       **batch_null)
            samples = np.asarray(jax.device_get(x))[:n]
            pixels = None
            if decode is not None:
                t_decode = time.perf_counter()
                pixels = np.asarray(jax.device_get(decode(x)))[:n]
                decode_seconds += time.perf_counter() - t_decode
            for start, rows, rows_pixels in _by_shard(indices, samples, grid, pixels):
                buffers.setdefault(start, []).append((rows, rows_pixels))
                want = len(grid[start])
                if sum(len(r) for r, _ in buffers[start]) < want:
                    continue
                held = buffers.pop(start)
                shard = np.concatenate([r for r, _ in held])
                shard_pixels = None if decode is None else np.concatenate([p for _, p in held])
                bad = [start + int(i) for i in gd.nonfinite_rows(shard)]
                if bad and not allow_nonfinite:
                    raise NonFiniteSamplesError(
                        f"samples {_listed(bad)} came out NaN or infinite; their shard "
                        f"{gd.shard_name(start)} was not written (the shards finished before it "
                        "are kept): check the model and x_T, or pass allow_nonfinite=True "
                        "(--allow-nonfinite) to write them anyway")
                nonfinite += bad
                entry = _finish_shard(target, manifest, start, shard, run_cond, seed, images,
                                      process, arg, shard_pixels)
                generated += len(shard)
                if bar is not None:
                    bar.update(len(shard))
                if on_shard is not None:
                    on_shard(entry)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    return {"out": str(target), "num_samples": int(num_samples), "shard_size": size,
            "extents": meta["extents"],
            "generated": generated, "skipped": int(skipped),
            "redone": {gd.shard_name(s): why for s, why in sorted(found.redo.items())},
            "unreadable_lines": found.unreadable, "removed_temporaries": removed,
            "nonfinite": nonfinite, "seconds": round(seconds, 3),
            "samples_per_s": round(generated / seconds, 3) if generated else None,
            "devices": len(mesh.devices.flat), "mesh": dict(mesh.shape),
            "processes": processes,
            **({"decode_seconds": round(decode_seconds, 3)} if decode is not None else {})}


def _run_conditioning(cfg, num_samples: int, labels, cond, null_cond):
    """``(labels int32 [N] or None, cond pytree or None, null)`` of a run: class labels (given,
    or ``i % num_classes`` for a class-conditional model) with the config's null label, a
    conditioning pytree with its ``null_cond``, or nothing (unconditional)."""
    from trdq_jax.sampling import conditioning
    from trdq_jax.sampling.generate import null_label
    if labels is not None and cond is not None:
        raise ValueError("labels: give labels (class labels) or cond (a conditioning pytree), "
                         "not both")
    if cond is not None:
        cond = conditioning.check_cond(cond, "cond", n=num_samples)
        return None, cond, conditioning.check_null(null_cond, cond)
    classes = getattr(cfg.model, "num_classes", 0)
    if labels is None and not classes:
        if null_cond is not None:
            raise ValueError("null_cond: an unconditional run (no labels, no cond) takes none")
        return None, None, None
    null = null_label(cfg.model) if null_cond is None else null_cond
    labels = _check_labels(default_labels(num_samples, classes) if labels is None else labels,
                           num_samples, null)
    return labels, None, null


def _batch_conditioning(labels, cond, null, chosen: np.ndarray, sharding):
    """``(cond of the samples chosen, {"null_label" or "null_cond": ...})`` for ``sample``,
    each leaf placed along the mesh's data axis like the batch."""
    from trdq_jax.sampling import conditioning
    if labels is not None:
        return jax.device_put(labels[chosen], sharding), {"null_label": null}
    if cond is None:
        return None, {}
    return (jax.device_put(conditioning.take(cond, chosen), sharding),
            {"null_cond": conditioning.take_null(null, cond, chosen)})


def _listed(indices: list[int], limit: int = 10) -> str:
    return ", ".join(map(str, indices[:limit])) + (
        f" (+{len(indices) - limit} more)" if len(indices) > limit else "")


def _by_shard(indices: np.ndarray, samples: np.ndarray, grid: dict, pixels=None):
    """``(shard start, rows, rows of pixels or None)`` runs of a batch's samples (``indices``
    ascending)."""
    bounds = np.asarray(list(grid))
    starts = bounds[np.searchsorted(bounds, indices, side="right") - 1]
    cuts = np.flatnonzero(np.diff(starts)) + 1
    split_pixels = [None] * (len(cuts) + 1) if pixels is None else np.split(pixels, cuts)
    for rows, first, rows_pixels in zip(np.split(samples, cuts), np.split(starts, cuts),
                                        split_pixels):
        yield int(first[0]), rows, rows_pixels


def _finish_shard(target, manifest, start, shard, run_cond, seed, images, process, arg,
                  pixels=None) -> dict:
    """Write one complete shard, its PNGs (of ``pixels`` when given) and then its manifest
    line; an ``OSError`` becomes the resumable-stop message."""
    try:
        entry = gd.write_shard(target, start, shard, run_cond, seed, images, process, pixels)
        files.crash_point(f"generate-{start}-written")
        gd.append_entry(manifest, entry, f"generate-{start}-manifest")
    except OSError as e:
        raise _stopped_by(e, pathlib.Path(e.filename or target), arg) from e
    files.crash_point(f"generate-{start}-done")
    return entry


def load_generated(out) -> tuple[np.ndarray, np.ndarray | None]:
    """``(samples [N, ...], labels int32 [N])`` of a finished generation directory, in index
    order, every shard verified (labels None for a run not conditioned on class labels);
    ``ValueError`` naming the missing or damaged samples otherwise."""
    out = pathlib.Path(out)
    meta, cond = gd.read_metadata(out, "out")
    found = gd.verify(out, meta, cond)
    grid = gd.shard_grid(meta)
    missing = [s for s in grid if s not in found.done]
    if missing:
        ranges = ", ".join(f"{s}..{grid[s].stop - 1}"
                           + (f" ({found.redo[s]})" if s in found.redo else "")
                           for s in missing[:5])
        raise ValueError(f"out: {str(out)!r} lacks samples {ranges}"
                         + (f" and {len(missing) - 5} more shards" if len(missing) > 5 else "")
                         + ": resume the run to finish it")
    got = []
    for start in grid:
        with np.load(out / gd.shard_name(start), allow_pickle=False) as data:
            got.append(data["samples"])
    return np.concatenate(got), None if cond.labels is None else cond.labels.astype(np.int32)
