"""Every output the project writes goes through ``write_file`` / ``write_dir`` (and files inside
a directory it owns through ``replace_file``).

The contract:

- The new output is written into a temporary sibling (``.NAME.trdq-tmp.PID.RAND``) that its
  writer holds an ``flock`` on, flushed to disk, and only then moved into place: with
  ``renameat2(RENAME_NOREPLACE)`` where nothing was there, else by atomically exchanging it with
  the old output (``RENAME_EXCHANGE``; elsewhere two renames, see below). Until that moment the
  previous output is untouched, and a crash or kill at any point leaves either the complete old
  output or the complete new one.
- An existing target is replaced only with ``overwrite=True`` and only when this project wrote
  it: a directory whose ``metadata.json`` carries ``"format": "trdq_jax...."`` and the same
  ``kind`` (and holds no other output), a file whose embedded marker (``file_kind``) names the
  same kind, or an empty directory. What the swap displaced is checked again, so something that
  appeared at the target while the output was written is put back, not deleted. Everything else
  is refused naming the path: a foreign non-empty directory, a file where a directory is
  expected (and vice versa), a path inside another output, the current directory, any of its
  parents, the home directory and ``/``.
- A failed write removes its temporary before the error is raised, and keeps removing it until
  it stays absent for a short quiet period (background writers such as orbax's tensorstore
  threads may re-create it for a moment after the first failure; see ``_discard``); in the rare
  case it is still there after ``_SETTLE_LIMIT_S``, the error names it. Errors read
  ``ARG: cannot write 'PATH': <cause> (nothing was changed)``, with ``errno`` set but no
  ``[Errno N]`` prefix. ``check_free_space`` (``write_dir(needed_bytes=...)``) refuses a write
  that cannot fit before anything is written.
- Temporaries whose writer is gone (its lock is free) are removed by the next write to the same
  target. With the two-rename fallback, a crash between the renames leaves the old output as
  ``.NAME.trdq-old.PID.RAND``; the next write (or ``recover``) moves it back, and a failure of
  the second rename moves it back at once.

Not covered: a training run's orbax checkpoints (orbax's own atomic step directories) and its
append-only ``metrics.jsonl`` (a torn last line is dropped on resume).
``crash_point(name)`` lets the tests SIGKILL a writer at a named point (``TRDQ_CRASH_AT=name``).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import pathlib
import shutil
import signal
import time
import uuid
from typing import Callable

METADATA_FILE = "metadata.json"
FORMAT_PREFIX = "trdq_jax."
_TMP, _OLD = ".trdq-tmp.", ".trdq-old."
_PNG_KEY = "trdq_jax.kind"

KIND_NAMES = {
    "float": "float checkpoint",
    "quantized": "quantized checkpoint",
    "calibration": "calibration directory",
    "samples": "sample directory",
    "demo": "demo directory",
    "figure": "figure",
    "report": "report",
    "cfg_plan": "CFG sharing plan",
    "cfg_analysis": "CFG analysis directory",
    "generation": "generation directory",
    "export": "sample export (npz)",
    "prompt_embedding": "cached prompt embedding (npz)",
}


class OutputError(ValueError):
    """A target the project refuses to write or replace (the message names the path and why)."""


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process here when ``TRDQ_CRASH_AT == name``."""
    if os.environ.get("TRDQ_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- ownership


def dir_kind(path: str | os.PathLike) -> str | None:
    """The ``kind`` of a directory this project wrote (its ``metadata.json``), else None."""
    meta = pathlib.Path(path) / METADATA_FILE
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if (isinstance(data, dict) and isinstance(data.get("format"), str)
            and data["format"].startswith(FORMAT_PREFIX) and isinstance(data.get("kind"), str)):
        return data["kind"]
    return None


def file_kind(path: str | os.PathLike) -> str | None:
    """The ``kind`` marker of a file this project wrote, else None.

    PNG: the text chunk ``trdq_jax.kind``; JSON: a top-level object with a ``trdq_jax.``
    ``format`` and a ``kind``; npz: such a JSON object in its ``trdq_export`` member (a 0-d
    string array, read without unpickling). Other files are never recognised as ours.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".png":
            from PIL import Image
            with Image.open(path) as image:
                kind = getattr(image, "text", {}).get(_PNG_KEY)
            return kind if isinstance(kind, str) else None
        data = None
        if suffix == ".json":
            data = json.loads(path.read_text())
        elif suffix == ".npz":
            data = npz_marker(path)
        if (isinstance(data, dict) and str(data.get("format", "")).startswith(FORMAT_PREFIX)
                and isinstance(data.get("kind"), str)):
            return data["kind"]
    except Exception:  # unreadable or not what its name says: not ours
        return None
    return None


NPZ_MARKER = "trdq_export"
_NPZ_MARKER_LIMIT = 64 << 20  # a foreign file's member is not read when larger than this


def npz_marker(path: str | os.PathLike) -> dict | None:
    """The JSON object in the ``NPZ_MARKER`` member of an npz (a 0-d string array), else None
    (not a zip, no such member, too large, not JSON): nothing is unpickled."""
    import zipfile

    import numpy as np
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(f"{NPZ_MARKER}.npy")
            if info.file_size > _NPZ_MARKER_LIMIT:
                return None
            with zf.open(info) as f:
                value = np.lib.format.read_array(f, allow_pickle=False)
        data = json.loads(str(value[()]))
    except Exception:  # not a zip, no marker, not JSON: not ours
        return None
    return data if isinstance(data, dict) else None


def png_marker(kind: str) -> dict[str, str]:
    """PNG text chunks marking a figure as written by this project (``file_kind`` reads it)."""
    from trdq_jax._version import __version__
    return {_PNG_KEY: kind, "Software": f"trdq_jax {__version__}"}


def describe(kind: str | None) -> str:
    """How an output of ``kind`` (None: not ours) is named in messages."""
    if kind is None:
        return "not written by trdq_jax"
    return f"a trdq_jax {KIND_NAMES.get(kind, kind)}"


def _protected(path: pathlib.Path) -> str | None:
    cwd = pathlib.Path.cwd().resolve()
    if path == pathlib.Path(path.anchor):
        return "the file-system root"
    if path == cwd:
        return "the current directory"
    if path in cwd.parents:
        return "a parent of the current directory"
    if path == pathlib.Path.home().resolve():
        return "the home directory"
    return None


def resolve_target(path: str | os.PathLike, *, kind: str, overwrite: bool, is_dir: bool,
                   arg: str = "path") -> pathlib.Path:
    """Check that ``path`` may receive a new output of ``kind``; returns it resolved.

    Raises ``OutputError`` naming ``arg`` and the path when it must not be written.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise OutputError(f"{arg}: expected a path, got {path!r}")
    try:
        target = pathlib.Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop, an unknown ~user
        raise OutputError(f"{arg}: cannot resolve {str(path)!r}: {e}") from None
    why = _protected(target)
    if why:
        raise OutputError(f"{arg}: refusing to write over {str(target)!r}: it is {why}; "
                          "choose a new path for the output")
    recover(target)
    ancestor = next(p for p in target.parents if p.exists())
    if not ancestor.is_dir():
        raise OutputError(f"{arg}: {str(ancestor)!r} is a file, not a directory to write into")
    if not os.access(ancestor, os.W_OK | os.X_OK):  # EROFS and permissions, before any work
        raise OutputError(f"{arg}: cannot write {str(target)!r}: {str(ancestor)!r} is not "
                          "writable (read-only file system or permissions)")
    owner = next((a for a in target.parents if dir_kind(a) is not None), None)
    if owner is not None:
        raise OutputError(f"{arg}: {str(target)!r} is inside {str(owner)!r}, "
                          f"{describe(dir_kind(owner))}; outputs do not nest (replacing that one "
                          "would delete this one): choose a path outside it")
    if not target.exists():
        return target
    want = KIND_NAMES.get(kind, kind)
    if is_dir:
        if not target.is_dir():
            raise OutputError(f"{arg}: {str(target)!r} is a file, expected a directory for the "
                              f"{want}; refusing to replace it")
        if not any(target.iterdir()):
            return target  # an empty directory holds nothing to lose
        found = dir_kind(target)
    else:
        if target.is_dir():
            raise OutputError(f"{arg}: {str(target)!r} is a directory, expected a file for the "
                              f"{want}; refusing to replace it")
        found = file_kind(target)
    if not overwrite:
        raise OutputError(f"{arg}: {str(target)!r} exists ({describe(found)}); pass "
                          "--overwrite / overwrite=True to replace it")
    if found != kind:
        raise OutputError(f"{arg}: {str(target)!r} is {describe(found)}, not a trdq_jax {want}; "
                          "--overwrite only replaces an output of the same kind, refusing to "
                          "touch it")
    nested = _nested_output(target) if is_dir else None
    if nested is not None:
        raise OutputError(f"{arg}: {str(target)!r} holds another output, {str(nested)!r} "
                          f"({describe(dir_kind(nested))}); refusing to replace both")
    return target


def _nested_output(root: pathlib.Path) -> pathlib.Path | None:
    """A directory below ``root`` that is an output of its own, if any."""
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            if dir_kind(pathlib.Path(dirpath) / name) is not None:
                return pathlib.Path(dirpath) / name
    return None


def _replaceable(path: pathlib.Path, kind: str, is_dir: bool) -> bool:
    """What ``resolve_target`` allowed is still there: an empty directory or an output of
    ``kind`` (checked again after the swap, in case it changed while the new one was written)."""
    if is_dir:
        return path.is_dir() and not path.is_symlink() and (
            not any(path.iterdir()) or (dir_kind(path) == kind and _nested_output(path) is None))
    return path.is_file() and file_kind(path) == kind


# ----------------------------------------------------------------------------- temporaries


def _lock(path: pathlib.Path) -> int | None:
    """Hold an exclusive ``flock`` on ``path`` (a directory or a file) until the returned
    descriptor is closed, which the kernel also does when the process dies; None where the
    platform has no ``flock``."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _writer_alive(path: pathlib.Path, pid: int) -> bool:
    """Is the writer of the temporary ``path`` still at work? It holds a lock on it while it
    writes (``_lock``); without ``flock``, whether process ``pid`` exists."""
    try:
        import fcntl
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except (PermissionError, OverflowError, ValueError):
            return pid >= 0
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # gone already
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the probe's own lock
    return False


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _siblings(target: pathlib.Path, marker: str) -> list[tuple[pathlib.Path, int]]:
    """Temporaries of ``target`` with ``marker`` and the pid that made them."""
    prefix = f".{target.name}{marker}"
    out = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return out
    for p in entries:
        if p.name.startswith(prefix):
            pid = p.name[len(prefix):].split(".", 1)[0]
            out.append((p, int(pid) if pid.isdigit() else -1))
    return out


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError:  # e.g. it became a directory meanwhile: the caller checks again
            pass


# A failed write's temporary must stay absent this long before it counts as gone, and the
# removal gives up after _SETTLE_LIMIT_S (then the error names the leftover).
_QUIET_S, _SETTLE_LIMIT_S, _POLL_S = 0.25, 10.0, 0.005


def _discard(path: pathlib.Path) -> bool:
    """Remove the temporary ``path`` of a failed write and make sure it stays removed; returns
    whether it is gone.

    A writer's background threads can outlive the error they reported: tensorstore (under
    orbax) goes on with its pending writes after the first one failed and re-creates missing
    parent directories, so a single ``rmtree`` can be undone a few milliseconds later. Remove
    again whenever it reappears, until it has stayed absent for ``_QUIET_S``; give up after
    ``_SETTLE_LIMIT_S``."""
    deadline = time.monotonic() + _SETTLE_LIMIT_S
    absent_since = None
    while True:
        now = time.monotonic()
        if os.path.lexists(path):
            absent_since = None
            if now >= deadline:
                return False
            _remove(path)
            if os.path.lexists(path):  # a writer is still at work inside: let it run a moment
                time.sleep(_POLL_S)
            continue
        if absent_since is None:
            absent_since = now
        elif now - absent_since >= _QUIET_S:
            return True
        time.sleep(_POLL_S)


def recover(target: str | os.PathLike) -> None:
    """Clean up after writers of ``target`` that died: remove their temporaries, and move an
    old output back if a crash between the two fallback renames left ``target`` missing."""
    target = pathlib.Path(target)
    for tmp, pid in _siblings(target, _TMP):
        if not _writer_alive(tmp, pid):
            _discard(tmp)  # its writer's threads may still be touching it (see ``_discard``)
    for old, pid in _siblings(target, _OLD):
        if _writer_alive(old, pid):
            continue
        if not os.path.lexists(target):
            os.rename(old, target)
        else:
            _remove(old)


def _temp_sibling(target: pathlib.Path, marker: str) -> pathlib.Path:
    return target.parent / f".{target.name}{marker}{os.getpid()}.{uuid.uuid4().hex[:8]}"


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_quietly(path: pathlib.Path) -> None:
    """Flush a directory entry where the platform allows it (some file systems refuse)."""
    try:
        _fsync(path)
    except OSError:
        pass


def _fsync_tree(root: pathlib.Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(pathlib.Path(dirpath) / name)
        _fsync(pathlib.Path(dirpath))


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(a: pathlib.Path, b: pathlib.Path, flag: int) -> bool:
    """Linux ``renameat2(a, b, flag)``; False where unsupported (other systems, some file
    systems); raises OSError (e.g. EEXIST for NOREPLACE) otherwise."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flag) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Atomically swap two paths; False where unsupported."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _appeared(arg: str, target: pathlib.Path) -> OutputError:
    return OutputError(f"{arg}: {str(target)!r} appeared or changed while the output was being "
                       "written (another writer?); left it as it is, nothing was written")


def _move_into_place(tmp: pathlib.Path, target: pathlib.Path, *, existed: bool, kind: str,
                     is_dir: bool, arg: str) -> None:
    """Move the finished ``tmp`` to ``target``, replacing only what ``resolve_target`` allowed:
    nothing if the target was absent then, else an output of ``kind`` (or an empty directory),
    checked again on what the swap displaced."""
    if existed:
        try:
            swapped = _exchange(tmp, target)
        except FileNotFoundError:  # removed meanwhile: nothing left to replace
            existed = swapped = False
    if not existed:
        try:
            if _renameat2(tmp, target, _RENAME_NOREPLACE):
                return
        except FileExistsError:
            raise _appeared(arg, target) from None
        if os.path.lexists(target):  # no NOREPLACE here: check just before the rename
            raise _appeared(arg, target)
        os.rename(tmp, target)
        return
    if swapped:
        crash_point("exchanged")
        if not _replaceable(tmp, kind, is_dir):  # tmp now holds what was displaced
            _exchange(tmp, target)
            raise _appeared(arg, target)
        _remove(tmp)
        return
    if not _replaceable(target, kind, is_dir):
        raise _appeared(arg, target)
    old = _temp_sibling(target, _OLD)
    lock = _lock(target) if is_dir else None  # marks the old copy as in use while it is aside
    try:
        os.rename(target, old)
        crash_point("between-renames")
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)  # put the old output back before reporting
            raise
    finally:
        _unlock(lock)
    _remove(old)


# ----------------------------------------------------------------------------- writers


def os_error(code: int | None, message: str) -> OSError:
    """An OSError whose ``str`` is exactly ``message`` (no ``[Errno N]`` prefix) while ``errno``
    is ``code``; of the subclass ``OSError(code, ...)`` would pick (``FileNotFoundError``...)."""
    cls = type(OSError(code, "")) if code is not None else OSError
    error = cls(message)
    error.errno = code
    return error


def _write_error(arg: str, target: pathlib.Path, e: OSError,
                 leftover: pathlib.Path | None = None) -> OSError:
    """The OSError of a failed write, restated for the target (not the temporary)."""
    return os_error(e.errno, f"{arg}: cannot write {str(target)!r}: {e.strerror or e} "
                             f"{_unchanged(target, leftover)}")


def _unchanged(target: pathlib.Path, leftover: pathlib.Path | None) -> str:
    """What a failed write left: nothing, or (rarely) a temporary it could not remove."""
    if leftover is None:
        return "(nothing was changed)"
    return (f"({str(target)!r} was not changed, but the temporary {str(leftover)!r} could not "
            "be removed: a background writer kept re-creating it; the next write to "
            f"{str(target)!r} removes it, or delete it yourself)")


def format_bytes(n: float) -> str:
    """``n`` bytes for messages: "4.4 MB", "512 bytes"."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def free_bytes(path: str | os.PathLike) -> tuple[int, pathlib.Path] | None:
    """``(bytes free, directory asked)`` on the file system that would hold ``path`` (asked at
    its nearest existing parent); None where the platform cannot tell."""
    path = pathlib.Path(path).expanduser().absolute()
    where = next((p for p in path.parents if p.exists()), None)
    if where is None or not hasattr(os, "statvfs"):
        return None
    try:
        st = os.statvfs(where)
    except OSError:
        return None
    root = hasattr(os, "geteuid") and os.geteuid() == 0  # root may use the reserved blocks
    return st.f_frsize * (st.f_bfree if root else st.f_bavail), where


def check_free_space(target: str | os.PathLike, needed_bytes: int, arg: str = "path") -> None:
    """Refuse, before anything is written, an output of about ``needed_bytes`` that the file
    system holding ``target`` has no room for.

    ``needed_bytes`` is the caller's estimate of everything the write puts on disk (array
    ``nbytes`` plus metadata and a margin); the temporary sibling lives on the target's file
    system until it is renamed into place, so an existing output being replaced does not count
    as free. Raises an ``OSError`` with ``errno`` ``ENOSPC`` in one line naming ``arg``, the
    path, the bytes needed and free::

        --out: cannot write '/d/q': No space left on device: needs about 4.4 MB, 1.0 MB free
        on '/d' (nothing was changed)

    Does nothing where the free space cannot be read (no ``statvfs``, an unreadable parent).
    """
    found = free_bytes(target)
    if found is None:
        return
    free, where = found
    if needed_bytes > free:
        raise os_error(errno.ENOSPC, f"{arg}: cannot write {str(target)!r}: "
                                     f"{os.strerror(errno.ENOSPC)}: needs about "
                                     f"{format_bytes(needed_bytes)}, {format_bytes(free)} free "
                                     f"on {str(where)!r} (nothing was changed)")


def _make_parents(target: pathlib.Path) -> list[pathlib.Path]:
    """Create the missing parents of ``target``; returns them, deepest first."""
    missing = []
    for parent in target.parents:
        if parent.exists():
            break
        missing.append(parent)
    made = []
    for parent in reversed(missing):
        try:
            parent.mkdir()
        except FileExistsError:  # another writer made it meanwhile: not ours to remove
            continue
        made.append(parent)
    return made[::-1]


def _remove_empty(dirs: list[pathlib.Path]) -> None:
    for d in dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def _staging(target: pathlib.Path, tmp: pathlib.Path, arg: str):
    """Around writing ``tmp`` and moving it to ``target``: creates missing parents, restates an
    OSError for the target, and on the way out removes ``tmp`` (for good: ``_discard``) and,
    unless the caller set ``state["done"]``, the parents it created."""
    created, state = [], {"done": False, "lock": None}
    leftover = None
    try:
        created = _make_parents(target)
        yield state
    except OSError as e:
        leftover = _cleanup(tmp, state, created)
        raise _write_error(arg, target, e, leftover) from None
    except Exception as e:
        leftover = _cleanup(tmp, state, created)
        if leftover is not None:  # the cause, and what it left behind
            raise OSError(f"{arg}: cannot write {str(target)!r}: {type(e).__name__}: {e} "
                          f"{_unchanged(target, leftover)}") from e
        raise
    finally:
        if state.get("cleaned") is None:  # success, or an interrupt (BaseException)
            _cleanup(tmp, state, created)


def _cleanup(tmp: pathlib.Path, state: dict, created: list[pathlib.Path]) -> pathlib.Path | None:
    """Remove ``tmp`` (which, after a successful swap, is already gone), release its lock and,
    unless the write is done, the parents it created; returns ``tmp`` if it could not be
    removed."""
    state["cleaned"] = True
    gone = _discard(tmp) if os.path.lexists(tmp) else True
    _unlock(state["lock"])
    state["lock"] = None
    if not state["done"]:
        _remove_empty(created)
    return None if gone else tmp


def write_dir(path: str | os.PathLike, write: Callable[[pathlib.Path], None], *, kind: str,
              overwrite: bool = False, arg: str = "path",
              needed_bytes: int | None = None) -> pathlib.Path:
    """Write a directory of ``kind`` atomically: ``write(tmp)`` fills a fresh temporary
    sibling, which must end up holding a ``metadata.json`` with a ``trdq_jax.`` format and
    this ``kind``; it is then flushed and moved to ``path``. Returns the resolved path.

    ``needed_bytes``: the caller's estimate of the output's size; when given, a file system
    without that much room is refused before anything is written (``check_free_space``).
    """
    target = resolve_target(path, kind=kind, overwrite=overwrite, is_dir=True, arg=arg)
    if needed_bytes is not None:
        check_free_space(target, needed_bytes, arg)
    existed = os.path.lexists(target)
    tmp = _temp_sibling(target, _TMP)
    with _staging(target, tmp, arg) as state:
        tmp.mkdir()
        state["lock"] = _lock(tmp)  # a later run sees a live writer, not a stale temporary
        crash_point("tmp-created")
        write(tmp)
        if dir_kind(tmp) != kind:
            raise RuntimeError(f"write_dir: the writer left no {METADATA_FILE} of kind {kind!r}")
        _fsync_tree(tmp)
        crash_point("written")
        _move_into_place(tmp, target, existed=existed, kind=kind, is_dir=True, arg=arg)
        state["done"] = True
    _fsync_quietly(target.parent)
    return target


def write_file(path: str | os.PathLike, write: Callable[[pathlib.Path], None], *, kind: str,
               overwrite: bool = False, arg: str = "path") -> pathlib.Path:
    """Write one file of ``kind`` atomically after ``resolve_target`` allowed it: ``write(tmp)``
    fills the temporary sibling (same suffix as ``path``), which is flushed and moved into place
    replacing only what was allowed. The caller embeds the kind marker (``png_marker``, or
    ``format``/``kind`` keys in JSON) so that ``overwrite`` can recognise the file later.
    Returns the resolved path.
    """
    target = resolve_target(path, kind=kind, overwrite=overwrite, is_dir=False, arg=arg)
    existed = os.path.lexists(target)
    return _write_one_file(target, write, arg, lambda tmp: _move_into_place(
        tmp, target, existed=existed, kind=kind, is_dir=False, arg=arg))


def replace_file(path: str | os.PathLike, write: Callable[[pathlib.Path], None], *,
                 arg: str = "path") -> pathlib.Path:
    """Atomically (re)write a file whose replacement the caller already decided on, e.g. one
    inside a directory the project owns (a training run's ``config.json``): no ownership checks,
    ``write(tmp)`` fills the temporary sibling, which is flushed and renamed over ``path``."""
    target = pathlib.Path(path).expanduser().absolute()
    recover(target)
    return _write_one_file(target, write, arg, lambda tmp: os.replace(tmp, target))


def _write_one_file(target: pathlib.Path, write, arg: str, move) -> pathlib.Path:
    tmp = _temp_sibling(target, _TMP)
    tmp = tmp.with_name(tmp.name + target.suffix)  # writers pick the format by suffix
    with _staging(target, tmp, arg) as state:
        tmp.touch()
        state["lock"] = _lock(tmp)
        write(tmp)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise RuntimeError(f"the writer of {str(target)!r} wrote nothing")
        _fsync(tmp)
        crash_point("written")
        move(tmp)
        state["done"] = True
    _fsync_quietly(target.parent)
    return target


def write_json(path: pathlib.Path, data) -> None:
    """Write JSON to ``path`` (inside a ``write_dir`` temporary, or as a ``write_file`` body)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=float)
        f.write("\n")
