"""The on-disk layout of a generation directory, and the checks that make its resume exact.

Layout (kind ``generation``)::

    metadata.json            format, kind, the run's fingerprint (``run``), ``shard_size`` and
                             a manifest of these fields and of the conditioning's arrays
    labels.npy               int64 [N]: the label of every sample of a class-conditional run;
    cond.npz                 or every sample's conditioning of another kind (its pytree's leaves
                             ``[N, ...]`` by path); neither for an unconditional model
    shards/00000064.npz      samples [start, start + shard_size) of the fixed shard grid:
                             "samples" float32 [n, ...] (videos [n, F, H, W, C]), "indices"
                             int64 [n], and a label run's "labels" int32 [n]
    images/00000064.png      per image sample (uint8, [-1, 1] mapped to 0..255); not for videos
    manifest-P.jsonl         per writing process P: one line per finished shard, appended only
                             after every file of the shard is complete on disk

A manifest line (``entry``)::

    {"start", "stop", "shard", "bytes", "sha256", "process", "host",
     "samples": [{"index", "label" (or "cond": a digest), "seed", "file", "bytes",
                  "sha256"}, ...],
     "entry_sha256": sha256 of the line's other fields}

The shard grid (``shard_grid``) depends only on ``num_samples`` (and the sample counts a run
grew through) and ``shard_size`` (fixed when the directory is
made), never on the batch size, the device count or the process count of a run, so a resumed
run with other ones writes the same files. A shard counts as done only when a line for it
verifies (``verify``): the line's own checksum, its fields against the run (grid position,
indices, labels, seed, file names), and every file it names against its size and sha256, the
shard opened to check the indices and labels it holds. Anything else (a torn or edited line, a
truncated or deleted shard or PNG) leaves the shard to be done again.

Files are written to ``.NAME.trdq-tmp.PID.HOST`` beside their target while their writer holds an
``flock`` on them, then renamed into place. ``clean_stale_temporaries`` removes those of this
host whose writer is gone (another host's are left to that host).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import pathlib
import socket
import zipfile

import numpy as np

from trdq_jax import files, manifest

FORMAT = "trdq_jax.generation/2"
KIND = "generation"
SHARDS, IMAGES, LABELS, COND_FILE = "shards", "images", "labels.npy", "cond.npz"
COND = "cond"  # manifest names of the conditioning's leaves: "cond['emb']"...
DEFAULT_SHARD_SIZE = 64
_TMP = ".trdq-tmp."
_ENTRY_DIGEST = "entry_sha256"


class GenerationDirError(ValueError):
    """A generation directory that cannot be used as it is (its message names path and cause)."""


def host() -> str:
    """This machine's name as it appears in temporary file names (no dots or slashes)."""
    return "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname()) or "host"


def shard_name(start: int) -> str:
    return f"{SHARDS}/{start:08d}.npz"


def image_name(index: int) -> str:
    return f"{IMAGES}/{index:08d}.png"


def manifest_name(process: int) -> str:
    return f"manifest-{process}.jsonl"


def shard_grid(meta: dict) -> dict[int, range]:
    """``{start: sample indices}`` of every shard of a directory, in index order: each extent
    of the run (``[0, N1)``, then ``[N1, N2)`` once grown to N2, ...) cut into ``shard_size``
    pieces from its own start, so growing a run never changes an existing shard."""
    size, grid, begin = meta["shard_size"], {}, 0
    for end in meta.get("extents") or [meta["run"]["num_samples"]]:
        grid.update({s: range(s, min(s + size, end)) for s in range(begin, end, size)})
        begin = end
    return grid


# ----------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class RunCond:
    """The conditioning of every sample of a run, as its directory stores it: class labels
    (``labels`` int64 ``[N]``, in ``labels.npy``), another conditioning pytree (``leaves``:
    ``{keystr path: [N, ...]}``, in ``cond.npz``) or nothing (an unconditional model). Each
    sample's manifest record names its label, or a digest of its conditioning."""

    labels: np.ndarray | None = None
    leaves: dict | None = None

    @classmethod
    def of(cls, labels=None, cond=None) -> "RunCond":
        if labels is not None:
            return cls(labels=np.ascontiguousarray(np.asarray(labels, np.int64)))
        if cond is None:
            return cls()
        import jax
        return cls(leaves={jax.tree_util.keystr(k): np.ascontiguousarray(np.asarray(v))
                           for k, v in jax.tree_util.tree_flatten_with_path(cond)[0]})

    def arrays(self) -> dict:
        """What the directory stores, by manifest name."""
        if self.labels is not None:
            return {LABELS: self.labels}
        return {f"{COND}{k}": v for k, v in (self.leaves or {}).items()}

    def record(self, i: int) -> dict:
        """The conditioning part of sample ``i``'s manifest record."""
        if self.labels is not None:
            return {"label": int(self.labels[i])}
        if self.leaves is None:
            return {}
        digest = hashlib.sha256()
        for name in sorted(self.leaves):
            digest.update(name.encode() + np.ascontiguousarray(self.leaves[name][i]).tobytes())
        return {"cond": digest.hexdigest()[:16]}

    def count(self) -> int | None:
        found = self.arrays()
        return None if not found else len(next(iter(found.values())))


def new_metadata(run: dict, shard_size: int, cond: RunCond, images: bool,
                 library_version: str, extents: list[int] | None = None) -> dict:
    """The ``metadata.json`` of a directory for ``run`` (``cond``: stored beside it, in the
    file ``cond_file`` names; ``images``: whether samples get PNGs; ``extents``: the sample
    counts it grew through, default ``[N]``), with a manifest of its fields and arrays."""
    n = run["num_samples"]
    extents = list(extents or [n])
    first = len(extents) == 1
    name = None if cond.count() is None else (
        (LABELS if first else f"labels-{n}.npy") if cond.labels is not None
        else (COND_FILE if first else f"cond-{n}.npz"))
    body = {"format": FORMAT, "kind": KIND, "library_version": library_version,
            "shard_size": int(shard_size), "images": bool(images), "extents": extents,
            "cond_file": name, "run": run}
    return {**body, "manifest": manifest.make_manifest(body, cond.arrays())}


def cond_bytes(cond: RunCond) -> bytes:
    """The stored conditioning file's bytes (``.npy`` of labels or ``.npz`` of leaves)."""
    buffer = io.BytesIO()
    if cond.labels is not None:
        np.save(buffer, cond.labels, allow_pickle=False)
    else:
        np.savez(buffer, **cond.leaves)
    return buffer.getvalue()


def write_new(tmp: pathlib.Path, meta: dict, cond: RunCond) -> None:
    """Fill the temporary of a new generation directory (``files.write_dir``'s writer)."""
    (tmp / SHARDS).mkdir()
    (tmp / IMAGES).mkdir()
    if meta["cond_file"]:
        (tmp / meta["cond_file"]).write_bytes(cond_bytes(cond))
    files.write_json(tmp / files.METADATA_FILE, meta)


def _read_cond(out: pathlib.Path, body: dict, names) -> RunCond:
    file = body.get("cond_file") or (LABELS if LABELS in names else COND_FILE)
    if not names:
        return RunCond()
    if not isinstance(file, str) or "/" in file or not file.startswith(("labels", "cond")):
        raise ValueError(f"cond_file {file!r} is not this layout's")
    if LABELS in names:
        return RunCond(labels=np.load(out / file, allow_pickle=False))
    with np.load(out / file, allow_pickle=False) as data:
        return RunCond(leaves={k: data[k] for k in data.files})


def read_metadata(out: pathlib.Path, arg: str) -> tuple[dict, RunCond]:
    """``(metadata, conditioning)`` of the generation directory ``out``, checked against their
    manifest; ``GenerationDirError`` naming the path and the cause for a corrupt, edited,
    older-layout or damaged one."""
    try:
        meta, body, record = manifest.read_record(out, formats={KIND: FORMAT},
                                                  noun="generation directory",
                                                  error=GenerationDirError)
        file = out / str(body.get("cond_file") or (LABELS if LABELS in record["arrays"]
                                                    else COND_FILE))
        try:
            cond = _read_cond(out, body, record["arrays"])
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise GenerationDirError(f"{str(file)!r}: missing or truncated "
                                     f"({type(e).__name__})") from None
        manifest.check_arrays(record["arrays"], cond.arrays(), str(out), GenerationDirError)
        size, run, extents = body.get("shard_size"), body.get("run"), body.get("extents")
        if (isinstance(size, bool) or not isinstance(size, int) or size < 1
                or not isinstance(body.get("images"), bool) or not isinstance(run, dict)
                or cond.count() not in (None, run.get("num_samples"))
                or not isinstance(extents, list) or not extents
                or extents[-1] != run.get("num_samples")
                or any(not isinstance(e, int) or e < 1 for e in extents)
                or extents != sorted(set(extents))):
            raise GenerationDirError(f"{str(out / files.METADATA_FILE)!r}: damaged (shard_size "
                                     f"{size!r}, or a run that does not match {file.name})")
    except GenerationDirError as e:
        raise GenerationDirError(f"{arg}: {e}; this directory cannot be used: move it aside "
                                 "and generate into a new one") from None
    return meta, cond


def looks_like_generation(path: pathlib.Path) -> bool:
    """A directory with this layout's folders, whatever its metadata says (for messages)."""
    return (path / SHARDS).is_dir() and (path / IMAGES).is_dir()


# ----------------------------------------------------------------------------- writing


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entry_digest(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != _ENTRY_DIGEST}
    return _digest(json.dumps(body, sort_keys=True).encode())


def _temporary(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f".{path.name}{_TMP}{os.getpid()}.{host()}")


def write_atomic(path: pathlib.Path, data: bytes, crash_name: str | None = None) -> None:
    """``data`` to ``path`` through a locked temporary, flushed, then renamed into place. An
    ``OSError`` names ``path``; the temporary is removed where the file system still allows
    it (else ``clean_stale_temporaries`` of the next run on this host removes it)."""
    tmp = _temporary(path)
    fd = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _lock(fd)
        half = len(data) // 2
        os.write(fd, data[:half]) if half else None
        if crash_name:
            files.crash_point(f"{crash_name}-partial")
        view = memoryview(data)[half:]
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    finally:
        if fd is not None:
            os.close(fd)
        try:
            tmp.unlink()
        except OSError:  # renamed (the usual case), or a file system gone read-only
            pass


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # no flock: liveness falls back to the pid (files._writer_alive)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def shard_bytes(samples: np.ndarray, indices: np.ndarray, **arrays) -> bytes:
    """The npz bytes of a shard: "samples", "indices" and ``arrays`` (a label run's "labels")."""
    buffer = io.BytesIO()
    np.savez(buffer, samples=samples, indices=indices, **arrays)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    """A PNG of one uint8 image ``[H, W, C]`` (C = 1: grayscale, 3: RGB)."""
    from PIL import Image
    buffer = io.BytesIO()
    if pixels.shape[-1] == 1:
        Image.fromarray(pixels[..., 0], "L").save(buffer, format="PNG")
    else:
        Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def nonfinite_rows(samples: np.ndarray) -> np.ndarray:
    """Positions of the samples (rows of ``[n, ...]``) that hold a NaN or an infinity."""
    return np.flatnonzero(~np.isfinite(samples.reshape(len(samples), -1)).all(axis=1))


def write_shard(out: pathlib.Path, start: int, samples: np.ndarray, cond: RunCond, seed: int,
                images: bool, process: int, pixels: np.ndarray | None = None) -> dict:
    """Write one shard (and its PNGs); returns its manifest entry (not yet appended).

    pixels: uint8 ``[n, H, W, C]`` pictures of the samples (a latent model's decoded images);
    by default the samples themselves are the pictures (``viz.to_uint8``)."""
    from trdq_jax.viz import to_uint8
    indices = np.arange(start, start + len(samples), dtype=np.int64)
    held = {} if cond.labels is None else {"labels": cond.labels[indices].astype(np.int32)}
    data = shard_bytes(samples, indices, **held)
    name = shard_name(start)
    write_atomic(out / name, data, f"generate-{start}-shard")
    files.crash_point(f"generate-{start}-shard-written")
    records = []
    if images and pixels is None:
        pixels = to_uint8(np.nan_to_num(samples))  # NaN: mid-gray pixels
    for k, i in enumerate(indices):
        record = {"index": int(i), **cond.record(int(i)), "seed": int(seed), "file": name}
        if images:
            png = png_bytes(pixels[k])
            record.update(file=image_name(int(i)), bytes=len(png), sha256=_digest(png))
            write_atomic(out / record["file"], png)
            if k == 0:
                files.crash_point(f"generate-{start}-image-written")
        records.append(record)
    entry = {"start": int(start), "stop": int(start + len(samples)), "shard": name,
             "bytes": len(data), "sha256": _digest(data), "process": int(process),
             "host": host(), "samples": records}
    bad = nonfinite_rows(samples)
    if len(bad):  # written only when the caller allowed it: recorded, never silent
        entry["nonfinite"] = [int(start + i) for i in bad]
    entry[_ENTRY_DIGEST] = _entry_digest(entry)
    return entry


def append_entry(path: pathlib.Path, entry: dict, crash_name: str | None = None) -> None:
    """One manifest line, flushed to disk. After a torn tail (a kill mid-append) the line starts
    on a new line, so the torn one stays the only unreadable line."""
    line = (json.dumps(entry) + "\n").encode()
    try:
        if path.exists() and path.stat().st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        with open(path, "ab") as f:
            if crash_name:
                f.write(line[: len(line) // 2])
                f.flush()
                files.crash_point(f"{crash_name}-partial")
                line = line[len(line) // 2:]
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a partly written line is a torn tail: ignored, the shard redone
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def clean_stale_temporaries(out: pathlib.Path) -> list[str]:
    """Remove the temporaries in ``out/shards`` and ``out/images`` left by dead writers of this
    host (a kill mid-write, a file system that went read-only); returns their names. Those of
    live writers and of other hosts are left alone."""
    removed, me = [], host()
    for folder in (out / SHARDS, out / IMAGES):
        try:
            names = [n for n in os.listdir(folder) if n.startswith(".") and _TMP in n]
        except OSError:
            continue
        for name in names:
            pid, _, owner = name.rsplit(_TMP, 1)[1].partition(".")
            if owner != me or not pid.isdigit():
                continue
            path = folder / name
            if not files._writer_alive(path, int(pid)):
                try:
                    path.unlink()
                    removed.append(f"{folder.name}/{name}")
                except FileNotFoundError:
                    pass
    return removed


# ----------------------------------------------------------------------------- verifying


@dataclasses.dataclass
class Verified:
    """What ``verify`` found. done: ``{shard start: entry}`` of verified shards; redo:
    ``{shard start: why}`` for shards named by some line that did not verify; unreadable: how
    many lines could not be read at all (a torn append from a kill)."""

    done: dict
    redo: dict
    unreadable: int


def _file_problem(out: pathlib.Path, name: str, size, sha256) -> str | None:
    try:
        data = (out / name).read_bytes()
    except FileNotFoundError:
        return f"{name} is missing"
    except OSError as e:
        return f"{name} is unreadable ({e.strerror})"
    if len(data) != size:
        return (f"{name} is truncated ({len(data)} of {size} bytes)" if len(data) < size
                else f"{name} has {len(data)} bytes, its manifest line says {size}")
    if _digest(data) != sha256:
        return f"{name} differs from its manifest line (checksum; edited or damaged)"
    return None


def _entry_problem(out: pathlib.Path, entry: dict, run: dict, cond: RunCond, grid: dict,
                   images: bool) -> str | None:
    """Why ``entry`` does not verify, or None."""
    if entry.get(_ENTRY_DIGEST) != _entry_digest(entry):
        return "its manifest line was edited (the line's checksum differs)"
    start = entry["start"]
    want = grid.get(start)
    if want is None or entry["stop"] != want.stop:
        shard = "" if want is None else f", not the shard's {want.start}..{want.stop - 1}"
        return f"its manifest line names samples {start}..{entry['stop'] - 1}{shard}"
    if entry["shard"] != shard_name(start) or len(entry["samples"]) != len(want):
        return "its manifest line names other files or another sample count"
    for i, record in zip(want, entry["samples"]):
        file = image_name(i) if images else shard_name(start)
        expected = {"index": i, **cond.record(i), "seed": run["seed"], "file": file}
        if any(record.get(k) != v for k, v in expected.items()) or (
                set(record) & {"label", "cond"}) != (set(expected) & {"label", "cond"}):
            return f"its manifest line's record of sample {i} does not match the run"
    problem = _file_problem(out, entry["shard"], entry["bytes"], entry["sha256"])
    if problem is None:
        try:
            with np.load(out / entry["shard"], allow_pickle=False) as data:
                held = np.array_equal(data["indices"], np.asarray(want)) and (
                    cond.labels is None or np.array_equal(data["labels"], cond.labels[want.start:
                                                                                      want.stop]))
        except (OSError, ValueError, KeyError, EOFError) as e:
            return f"{entry['shard']} cannot be opened ({type(e).__name__})"
        if not held:
            return f"{entry['shard']} holds other indices or labels than its manifest line"
    for record in entry["samples"] if images and problem is None else ():
        problem = _file_problem(out, record["file"], record["bytes"], record["sha256"])
        if problem:
            break
    return problem


def verify(out: pathlib.Path, meta: dict, cond: RunCond, starts=None) -> Verified:
    """Check every manifest line of ``out`` that names one of ``starts`` (default: every shard)
    against the run (``meta``, ``cond`` from ``read_metadata``) and the files; see the module
    docstring."""
    run, grid, images = meta["run"], shard_grid(meta), meta["images"]
    wanted = None if starts is None else set(starts)
    done, redo, unreadable = {}, {}, 0
    for listing in sorted(out.glob("manifest-*.jsonl")):
        try:
            lines = listing.read_bytes().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                entry = json.loads(line)
                start = entry["start"]
                if not isinstance(start, int) or isinstance(start, bool):
                    raise TypeError(start)
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                unreadable += bool(line.strip())
                continue
            if (wanted is not None and start not in wanted) or start in done:
                continue
            try:
                problem = _entry_problem(out, entry, run, cond, grid, images)
            except (KeyError, TypeError, IndexError, ValueError, AttributeError):
                problem = "its manifest line is malformed"
            if problem is None:
                done[start] = entry
                redo.pop(start, None)
            else:
                redo[start] = problem
    return Verified(done=done, redo=redo, unreadable=unreadable)


def block_size(path: pathlib.Path) -> int:
    """The allocation unit of the file system that holds (or will hold) ``path``."""
    probe = next(p for p in (path, *path.parents) if p.exists())
    return os.statvfs(probe).f_frsize or 4096


def no_space(path: pathlib.Path, needed: int, arg: str, what: str) -> None:
    """Refuse (``OSError`` ENOSPC, nothing written) when the file system of ``path`` has less
    than ``needed`` bytes free; ``what`` says what the bytes are for."""
    found = files.free_bytes(path)
    if found is not None and needed > found[0]:
        raise files.os_error(errno.ENOSPC, f"{arg}: cannot write {str(path)!r}: "
                                           f"{os.strerror(errno.ENOSPC)}: {what} need about "
                                           f"{files.format_bytes(needed)}, "
                                           f"{files.format_bytes(found[0])} free on "
                                           f"{str(found[1])!r} (nothing was written)")
