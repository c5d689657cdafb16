"""What a weight file holds, told from its bytes before any library parses it.

The readers' own errors describe their parsers, not the file ("header too large", "File is not
a zip file", numpy's "pickled data" for anything that is not a zip); these checks read the
first bytes, a safetensors header or a zip archive's end record and say, naming the path, what
is wrong in the project's words:

- ``'P' is empty (0 bytes)`` / ``'P' is truncated: holds N of M bytes`` (a cut download or
  copy);
- ``'P' is not a safetensors file: ...`` / ``'P' is not a .npz file: ...`` (something else under
  that name: text such as an HTML error page, another format), saying what it looks like;
- ``'P' is a pickle, refused: ...`` (a pickle or a PyTorch zip holding ``data.pkl``): trdq_jax
  never unpickles such files; the message says how to convert.

``check_safetensors(path)`` and ``check_npz(path)`` raise ``WeightFileError`` (a ``ValueError``)
and otherwise return, so that the library read that follows only meets files of the right
shape. Callers restate the error as their own kind (``ConversionError``, ``CalibrationError``,
...). Only the standard library is used; nothing is unpickled or decompressed.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
import zipfile

# the safetensors reader refuses larger headers (safetensors' MAX_HEADER_SIZE)
MAX_SAFETENSORS_HEADER = 100_000_000
_ZIP_LOCAL, _ZIP_END = b"PK\x03\x04", b"PK\x05\x06"  # an empty zip is only its end
_NPY_MAGIC = b"\x93NUMPY"
_CONVERT = ("trdq_jax never unpickles (loading a pickle can run any code); save the weights as "
            ".safetensors where you trust the file (safetensors.torch.save_file(torch.load(path), "
            "'model.safetensors')), or name a PyTorch checkpoint .pt and install the [torch] "
            "extra (read with torch.load(weights_only=True))")


class WeightFileError(ValueError):
    """A file is missing, empty, truncated, of another format than its name says, or a pickle.
    The message names the path."""


def _size_and_head(path: pathlib.Path, n: int = 64) -> tuple[int, bytes]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return size, f.read(n)
    except FileNotFoundError:
        raise WeightFileError(f"{str(path)!r}: no such file") from None
    except IsADirectoryError:
        raise WeightFileError(f"{str(path)!r} is a directory, expected a file") from None
    except OSError as e:
        raise WeightFileError(f"{str(path)!r}: cannot read it ({e.strerror or e})") from None


def is_pickle(head: bytes) -> bool:
    """A pickle of protocol 2..5 (what ``torch.save``'s legacy format and ``pickle.dump`` write)
    starts with the PROTO opcode 0x80 and the protocol number."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _zip_names(path: pathlib.Path) -> list[str] | None:
    """The member names of a zip archive (read from its central directory only), else None."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None


def _torch_zip(names: list[str] | None) -> bool:
    """``torch.save``'s zip layout: ``ARCHIVE/data.pkl`` plus the tensors' storages."""
    return names is not None and any(n == "data.pkl" or n.endswith("/data.pkl") for n in names)


def _refused_pickle(path: pathlib.Path, torch_zip: bool = False) -> WeightFileError:
    what = " (a PyTorch zip checkpoint: its data.pkl is a pickle)" if torch_zip else ""
    return WeightFileError(f"{str(path)!r} is a pickle, refused{what}: {_CONVERT}")


def _looks_like(head: bytes) -> str:
    """What the first bytes of a file of the wrong format look like, for the message."""
    if head.startswith(_ZIP_LOCAL) or head.startswith(_ZIP_END):
        return "it is a zip archive (an .npz?)"
    if head.startswith(_NPY_MAGIC):
        return "it is a single .npy array"
    if head.startswith(b"\x89HDF"):
        return "it is an HDF5 file (.h5)"
    text = head[:48]
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        decoded = None
    if decoded is not None and all(c.isprintable() or c in "\r\n\t" for c in decoded):
        shown = " ".join(decoded.split()) + ("..." if len(head) > len(text) else "")
        return f"it holds text ({shown!r}), e.g. an error page saved instead of the file"
    return f"it starts with the bytes {head[:8].hex(' ')}"


def _empty(path: pathlib.Path, kind: str) -> WeightFileError:
    return WeightFileError(f"{str(path)!r} is empty (0 bytes); expected a {kind} file: "
                           "truncated (an interrupted download or copy?)")


def _truncated(path: pathlib.Path, size: int, needed: int, what: str = "") -> WeightFileError:
    return WeightFileError(f"{str(path)!r} is truncated: holds {size:,} of {needed:,} bytes"
                           f"{what} (an interrupted download or copy?)")


# ----------------------------------------------------------------------------- safetensors


def check_safetensors(path: str | os.PathLike) -> dict:
    """Check that ``path`` is a whole safetensors file; returns its header (tensor name ->
    ``{"dtype", "shape", "data_offsets"}``, plus ``"__metadata__"`` when present).

    Layout: 8-byte little-endian header length ``n``, ``n`` bytes of a JSON object starting
    with ``{``, then the data, whose extent is the largest ``data_offsets`` end.
    Raises ``WeightFileError`` naming the path: empty, truncated (``holds N of M bytes``), not
    a safetensors file (what it looks like instead), a pickle (refused).
    """
    path = pathlib.Path(path)
    size, head = _size_and_head(path)
    if size == 0:
        raise _empty(path, ".safetensors")
    if is_pickle(head):
        raise _refused_pickle(path)
    if head.startswith(_ZIP_LOCAL) and _torch_zip(_zip_names(path)):
        raise _refused_pickle(path, torch_zip=True)
    if size < 8:
        looks = _looks_like(head)
        if looks.startswith("it holds text"):
            raise WeightFileError(f"{str(path)!r} is not a safetensors file: {looks}")
        raise _truncated(path, size, 8, ", not even the 8-byte header length")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_SAFETENSORS_HEADER or n < 2 or (len(head) > 8 and head[8:9] != b"{"):
        looks = _looks_like(head)
        if looks.startswith("it starts with the bytes"):  # no better guess: say what is wrong
            looks += (f" (a header length of {n:,} bytes, beyond the {MAX_SAFETENSORS_HEADER:,} "
                      "a safetensors header may have)" if n > MAX_SAFETENSORS_HEADER else
                      " (no JSON header after the 8-byte header length)")
        raise WeightFileError(f"{str(path)!r} is not a safetensors file: {looks}")
    if size < 8 + n:
        raise _truncated(path, size, 8 + n, " needed by its header alone")
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise WeightFileError(f"{str(path)!r} is not a safetensors file: its {n:,}-byte header "
                              "is not JSON") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{str(path)!r} is not a safetensors file: its header is not a "
                              "JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0
                           for o in offsets) or offsets[0] > offsets[1]):
            raise WeightFileError(f"{str(path)!r} is not a safetensors file: header entry "
                                  f"{name!r} has no valid data_offsets [begin, end]")
        end = max(end, offsets[1])
    if size < 8 + n + end:
        raise _truncated(path, size, 8 + n + end)
    return header


# ----------------------------------------------------------------------------- npz


def _zip_end_record(path: pathlib.Path, size: int) -> bool:
    """Does the file end with a zip end-of-central-directory record (within the last
    22 + 65535 bytes: the record and its longest comment)?"""
    with open(path, "rb") as f:
        start = max(0, size - (22 + 65535))
        f.seek(start)
        tail = f.read()
    at = tail.rfind(_ZIP_END)
    return at >= 0 and len(tail) - at >= 22


def check_npz(path: str | os.PathLike) -> None:
    """Check that ``path`` is a whole ``.npz`` (zip) archive, without reading its arrays.

    Raises ``WeightFileError`` naming the path: empty, truncated (a zip whose end record is
    missing), not a .npz file (a single .npy array, text, anything that is not a zip), a
    pickle or a PyTorch zip checkpoint (refused).
    """
    path = pathlib.Path(path)
    size, head = _size_and_head(path)
    if size == 0:
        raise _empty(path, ".npz")
    if is_pickle(head):
        raise _refused_pickle(path)
    if head.startswith(_NPY_MAGIC):
        raise WeightFileError(f"{str(path)!r} is not a .npz file: it holds a single .npy "
                              "array, not a .npz archive of named arrays (np.savez(path, "
                              "**arrays))")
    if not (head.startswith(_ZIP_LOCAL) or head.startswith(_ZIP_END)):
        if len(head) < 4 and _ZIP_LOCAL.startswith(head):
            raise WeightFileError(f"{str(path)!r} is truncated: holds {size} bytes of a zip "
                                  "archive (an interrupted download or copy?)")
        raise WeightFileError(f"{str(path)!r} is not a .npz file: not a zip archive, "
                              f"{_looks_like(head)}")
    if not _zip_end_record(path, size):
        raise WeightFileError(f"{str(path)!r} is truncated: the zip archive stops after "
                              f"{size:,} bytes, before its closing directory record (an "
                              "interrupted download or copy?)")
    names = _zip_names(path)
    if _torch_zip(names):
        raise _refused_pickle(path, torch_zip=True)
    if names is None:
        raise WeightFileError(f"{str(path)!r} is not a .npz file: a damaged zip archive (its "
                              "directory cannot be read)")
