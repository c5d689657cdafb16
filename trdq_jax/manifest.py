"""Integrity records for the directories the project writes.

A manifest sits in a directory's ``metadata.json`` under ``"manifest"``::

    {"arrays": {NAME: {"shape": [...], "dtype": "int8", "sha256": HEX}},
     "fields": {DOTTED.FIELD: SHORT_HEX}}

``arrays`` describes every stored array (``NAME`` is its ``jax.tree_util.keystr`` path, or its
npz key); ``fields`` holds a short digest of every other metadata value, so that a hand-edited
value (``a_bits``, ``num_heads``, a segment table) is refused naming the field instead of
silently producing garbage. Both are checked by ``check_arrays`` / ``check_fields`` on restore.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from trdq_jax import files


class IntegrityError(ValueError):
    """Stored arrays or metadata do not match what was recorded when they were written."""


def _as_numpy(value) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(value))


def array_digest(value) -> str:
    """sha256 over an array's bytes (C order)."""
    return hashlib.sha256(_as_numpy(value).tobytes()).hexdigest()


def tree_digest(tree) -> str:
    """sha256 over the dtype, shape and bytes of every leaf of ``tree`` (tree order): one
    fingerprint of a parameter pytree."""
    import jax
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        arr = _as_numpy(leaf)
        digest.update(f"{arr.dtype}{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def flat_arrays(tree) -> dict[str, Any]:
    """``{keystr path: leaf}`` of a pytree (a flat ``{name: array}`` dict keys as ``['name']``)."""
    import jax
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def array_entries(arrays: Mapping[str, Any]) -> dict[str, dict]:
    """Manifest entries of ``{name: array}``: shape, dtype and sha256 of each."""
    out = {}
    for name, value in arrays.items():
        arr = _as_numpy(value)
        out[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype),
                     "sha256": array_digest(arr)}
    return out


def check_arrays(recorded: Mapping[str, dict], arrays: Mapping[str, Any], where: str,
                 error: type = IntegrityError) -> None:
    """Raise ``error`` (an ``IntegrityError``) naming the first arrays that are missing, unexpected, or differ
    from ``recorded`` in shape, dtype or checksum."""
    problems = [f"missing array {k}" for k in sorted(set(recorded) - set(arrays))]
    problems += [f"unexpected array {k}" for k in sorted(set(arrays) - set(recorded))]
    for name in sorted(set(recorded) & set(arrays)):
        want, arr = recorded[name], _as_numpy(arrays[name])
        if list(arr.shape) != list(want.get("shape", [])) or str(arr.dtype) != want.get("dtype"):
            problems.append(f"{name}: stored {arr.dtype}{list(arr.shape)}, the manifest says "
                            f"{want.get('dtype')}{want.get('shape')}")
        elif array_digest(arr) != want.get("sha256"):
            problems.append(f"{name}: checksum differs from the manifest (corrupted or edited)")
    if problems:
        raise error(f"{where}: arrays do not match the manifest: "
                             + "; ".join(problems[:8])
                             + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))


def _leaves(value, prefix: str = ""):
    if isinstance(value, dict) and value:
        for key in sorted(value):
            yield from _leaves(value[key], f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def field_digests(meta: Mapping[str, Any]) -> dict[str, str]:
    """``{dotted field: digest}`` for every leaf value of ``meta`` (lists count as one value)."""
    return {name: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
            for name, value in _leaves(dict(meta))}


def check_fields(meta: Mapping[str, Any], recorded: Mapping[str, str], where: str,
                 error: type = IntegrityError) -> None:
    """Raise ``IntegrityError`` naming the metadata fields edited, added or removed since the
    digests ``recorded`` were taken."""
    now = field_digests(meta)
    changed = sorted(k for k in set(now) & set(recorded) if now[k] != recorded[k])
    added, removed = sorted(set(now) - set(recorded)), sorted(set(recorded) - set(now))
    if changed or added or removed:
        parts = ([f"changed {', '.join(changed[:6])}"] if changed else []) + (
            [f"added {', '.join(added[:6])}"] if added else []) + (
            [f"removed {', '.join(removed[:6])}"] if removed else [])
        raise error(f"{where}: metadata was edited after it was written ("
                             + "; ".join(parts) + "); these values are fixed when the output is "
                             "made: write it again instead of editing it")


def make_manifest(meta: Mapping[str, Any], arrays: Mapping[str, Any]) -> dict:
    """The ``"manifest"`` entry for ``meta`` (without a manifest) and its ``{name: array}``."""
    return {"arrays": array_entries(arrays), "fields": field_digests(meta)}


def split_manifest(meta: Mapping[str, Any], where: str,
                   error: type = IntegrityError) -> tuple[dict, dict]:
    """``(meta without the manifest, manifest)``; refuses metadata that has none."""
    body = dict(meta)
    manifest = body.pop("manifest", None)
    if (not isinstance(manifest, dict) or not isinstance(manifest.get("arrays"), dict)
            or not isinstance(manifest.get("fields"), dict)):
        raise error(f"{where}: metadata has no valid manifest (written by an older "
                             "trdq_jax, or edited); write the output again")
    return body, manifest


def read_record(path: str | os.PathLike, *, formats: Mapping[str, str], noun: str,
                error: type = IntegrityError) -> tuple[dict, dict, dict]:
    """Read and check the ``metadata.json`` of an output directory.

    ``formats``: ``{kind: format}`` accepted; ``noun`` names the directory in messages
    ("checkpoint directory"). Returns ``(meta, body, record)``: the whole metadata, it without
    the manifest, and the manifest, after the field digests were checked. Raises ``error``
    naming the path for a missing, foreign, corrupt, other-kind, other-version or edited one.
    """
    path = pathlib.Path(path).expanduser()
    meta_file = path / files.METADATA_FILE
    if not path.is_dir():
        raise error(f"{str(path)!r}: no {noun} there")
    if not meta_file.is_file():
        raise error(f"{str(path)!r}: not a {noun} (not written by trdq_jax: no "
                    f"{files.METADATA_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{str(meta_file)!r}: corrupt metadata ({e})") from None
    if not isinstance(meta, dict):
        raise error(f"{str(meta_file)!r}: corrupt metadata (not a JSON object)")
    kind = files.dir_kind(path)
    if kind not in formats:
        raise error(f"{str(path)!r}: not a {noun} ({files.describe(kind)})")
    if meta["format"] != formats[kind]:
        raise error(f"{str(path)!r}: format {meta['format']!r}, expected {formats[kind]!r} "
                    "(written by another trdq_jax version); write it again with this one")
    body, record = split_manifest(meta, str(meta_file), error)
    check_fields(body, record["fields"], str(meta_file), error)
    return meta, body, record
