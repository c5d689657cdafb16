"""Every file and directory the project writes goes through ``write_file`` / ``write_dir``.

The contract:

- The new output is written into a temporary sibling (``.NAME.trdq-tmp.PID.RAND``), flushed to
  disk, and only then moved into place: a file with one ``os.replace``, a directory by atomically
  exchanging it with the old one (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames
  and a recovery step, see below). Until that moment the previous output is untouched, and a
  crash at any point leaves either the complete old output or the complete new one.
- An existing target is replaced only with ``overwrite=True`` and only when this project wrote
  it: a directory whose ``metadata.json`` carries ``"format": "trdq_jax...."`` and the same
  ``kind``, a file whose embedded marker (``file_kind``) names the same kind, or an empty
  directory. Everything else is refused naming the path: a foreign non-empty directory, a file
  where a directory is expected (and vice versa), the current directory, any of its parents, the
  home directory and ``/``.
- Stale temporaries (their writer's process is gone) are removed by the next write to the same
  target. With the two-rename fallback, a crash between the renames leaves the old output as
  ``.NAME.trdq-old.PID.RAND``; the next write (or ``recover``) moves it back.

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
    ``format`` and a ``kind``. Other files are never recognised as ours.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".png":
            from PIL import Image
            with Image.open(path) as image:
                kind = getattr(image, "text", {}).get(_PNG_KEY)
            return kind if isinstance(kind, str) else None
        if suffix == ".json":
            data = json.loads(path.read_text())
            if (isinstance(data, dict) and str(data.get("format", "")).startswith(FORMAT_PREFIX)
                    and isinstance(data.get("kind"), str)):
                return data["kind"]
    except Exception:  # unreadable or not what its name says: not ours
        return None
    return None


def png_marker(kind: str) -> dict[str, str]:
    """PNG text chunks marking a figure as written by this project (``file_kind`` reads it)."""
    from trdq_jax._version import __version__
    return {_PNG_KEY: kind, "Software": f"trdq_jax {__version__}"}


def _describe(kind: str | None) -> str:
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
    target = pathlib.Path(path).expanduser().resolve()
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
        raise OutputError(f"{arg}: {str(target)!r} exists ({_describe(found)}); pass "
                          "--overwrite / overwrite=True to replace it")
    if found != kind:
        raise OutputError(f"{arg}: {str(target)!r} is {_describe(found)}, not a trdq_jax {want}; "
                          "--overwrite only replaces an output of the same kind, refusing to "
                          "touch it")
    return target


# ----------------------------------------------------------------------------- temporaries


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def recover(target: str | os.PathLike) -> None:
    """Clean up after writers of ``target`` that died: remove their temporaries, and move an
    old output back if a crash between the two fallback renames left ``target`` missing."""
    target = pathlib.Path(target)
    for tmp, pid in _siblings(target, _TMP):
        if not _pid_alive(pid):
            _remove(tmp)
    for old, pid in _siblings(target, _OLD):
        if _pid_alive(pid):
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


_RENAME_EXCHANGE = 2


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _move_into_place(tmp: pathlib.Path, target: pathlib.Path) -> None:
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        crash_point("exchanged")
        _remove(tmp)  # tmp now holds the previous output
        return
    old = _temp_sibling(target, _OLD)
    os.rename(target, old)
    crash_point("between-renames")
    os.rename(tmp, target)
    _remove(old)


# ----------------------------------------------------------------------------- writers


def _write_error(arg: str, target: pathlib.Path, e: OSError) -> OSError:
    """The OSError of a failed write, restated for the target (not the temporary)."""
    message = f"{arg}: cannot write {str(target)!r}: {e.strerror or e} (nothing was changed)"
    return OSError(e.errno, message) if e.errno is not None else OSError(message)


def _make_parents(target: pathlib.Path) -> list[pathlib.Path]:
    """Create the missing parents of ``target``; returns them, deepest first."""
    missing = []
    for parent in target.parents:
        if parent.exists():
            break
        missing.append(parent)
    for parent in reversed(missing):
        parent.mkdir()
    return missing


def _remove_empty(dirs: list[pathlib.Path]) -> None:
    for d in dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def _staging(target: pathlib.Path, tmp: pathlib.Path, arg: str):
    """Around writing ``tmp`` and moving it to ``target``: creates missing parents, restates an
    OSError for the target, and on the way out removes ``tmp`` (and, unless the caller set
    ``state["done"]``, the parents it created)."""
    created, state = [], {"done": False}
    try:
        created = _make_parents(target)
        yield state
    except OSError as e:
        raise _write_error(arg, target, e) from None
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)
        if not state["done"]:
            _remove_empty(created)


def write_dir(path: str | os.PathLike, write: Callable[[pathlib.Path], None], *, kind: str,
              overwrite: bool = False, arg: str = "path") -> pathlib.Path:
    """Write a directory of ``kind`` atomically: ``write(tmp)`` fills a fresh temporary
    sibling, which must end up holding a ``metadata.json`` with a ``trdq_jax.`` format and
    this ``kind``; it is then flushed and moved to ``path``. Returns the resolved path.
    """
    target = resolve_target(path, kind=kind, overwrite=overwrite, is_dir=True, arg=arg)
    tmp = _temp_sibling(target, _TMP)
    with _staging(target, tmp, arg) as state:
        tmp.mkdir()
        crash_point("tmp-created")
        write(tmp)
        if dir_kind(tmp) != kind:
            raise RuntimeError(f"write_dir: the writer left no {METADATA_FILE} of kind {kind!r}")
        _fsync_tree(tmp)
        crash_point("written")
        _move_into_place(tmp, target)
        state["done"] = True
    _fsync_quietly(target.parent)
    return target


def write_file(path: str | os.PathLike, write: Callable[[pathlib.Path], None], *, kind: str,
               overwrite: bool = False, arg: str = "path") -> pathlib.Path:
    """Write one file of ``kind`` atomically (``replace_file``) after ``resolve_target`` allowed
    it. The caller embeds the kind marker (``png_marker``, or ``format``/``kind`` keys in JSON)
    so that ``overwrite`` can recognise the file later. Returns the resolved path.
    """
    target = resolve_target(path, kind=kind, overwrite=overwrite, is_dir=False, arg=arg)
    return replace_file(target, write, arg=arg)


def replace_file(path: str | os.PathLike, write: Callable[[pathlib.Path], None], *,
                 arg: str = "path") -> pathlib.Path:
    """Atomically (re)write a file whose replacement the caller already decided on, e.g. one
    inside a directory the project owns: ``write(tmp)`` creates the temporary sibling (same
    suffix as ``path``), which is flushed and renamed over ``path``."""
    target = pathlib.Path(path).expanduser().absolute()
    recover(target)
    tmp = _temp_sibling(target, _TMP)
    tmp = tmp.with_name(tmp.name + target.suffix)  # writers pick the format by suffix
    with _staging(target, tmp, arg) as state:
        write(tmp)
        if not tmp.is_file():
            raise RuntimeError(f"replace_file: the writer did not create {tmp}")
        _fsync(tmp)
        crash_point("written")
        os.replace(tmp, target)
        state["done"] = True
    _fsync_quietly(target.parent)
    return target


def write_json(path: pathlib.Path, data) -> None:
    """Write JSON to ``path`` (inside a ``write_dir`` temporary, or as a ``write_file`` body)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=float)
        f.write("\n")
