"""Save and restore parameter pytrees with orbax, plus JSON metadata and an integrity manifest.

Layout of a checkpoint directory::

    DIR/metadata.json   {"format", "library_version", "kind", "config_kind", "config", "extra",
                         "manifest": {"arrays": {path: shape, dtype, sha256}, "fields": {...}}}
    DIR/params/         orbax tree (synchronous write: a failure is raised, never left to a thread)
    DIR/vae/            (optional) the float autoencoder a latent model decodes with: orbax
                        tree; its config and array manifest are metadata's "vae" field

A checkpoint is written through ``trdq_jax.files.write_dir``: into a temporary sibling, then
swapped into place, so a crash never leaves a half-written ``DIR`` and an existing checkpoint is
replaced only with ``overwrite=True`` and only by one of the same kind. ``restore`` checks the
metadata against its recorded digests, every array against the manifest, float arrays for
NaN / Inf, and the stored config against the one you expect; each failure is one
``CheckpointError`` naming the cause.
This module knows nothing about models: ``trdq_jax.models.load_checkpoint`` adds the check of
the tree against a model's abstract params.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax import files, manifest
from trdq_jax._version import __version__
from trdq_jax.config import (ConfigError, ExperimentConfig, MODEL_CONFIGS, VAEConfig, dict_diff,
                             experiment_from_dict, model_config_from_dict, to_dict,
                             vae_config_from_dict)

FORMAT = "trdq_jax.checkpoint/2"
METADATA_FILE = files.METADATA_FILE
KINDS = ("float", "quantized")


class CheckpointError(manifest.IntegrityError):
    """A checkpoint is missing, unreadable, truncated, edited or does not match the expected
    config."""


def _config_dict(cfg) -> tuple[str, dict]:
    if isinstance(cfg, ExperimentConfig):
        return "experiment", to_dict(cfg)
    if isinstance(cfg, tuple(MODEL_CONFIGS.values())):
        return "model", to_dict(cfg)
    raise TypeError(f"cfg: expected an ExperimentConfig or a model config, got {type(cfg).__name__}")


def _host_tree(params: Any):
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("params: the tree holds no arrays")
    bad = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
           if not hasattr(v, "shape") or not hasattr(v, "dtype")]
    if bad:
        raise ValueError(f"params: expected a pytree of arrays, these leaves are not: {bad[:5]}")
    return jax.tree.map(np.asarray, jax.device_get(params))


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs every failed write as a multi-page ERROR through absl; the failure is raised
    to the caller anyway, so silence the duplicate."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _orbax_save(directory: pathlib.Path, tree) -> None:
    """Write ``tree`` with orbax into ``directory``; a failed file-system write is raised as the
    ``OSError`` it was (tensorstore reports ENOSPC / EROFS as a ValueError carrying the code).

    After the first failure, tensorstore's other pending writes go on in its own threads for
    a moment and re-create missing directories; ``files.write_dir`` removes the temporary until
    it stays removed, so nothing of this write outlives the error."""
    import orbax.checkpoint as ocp
    with _quiet_orbax():
        ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        try:
            ckptr.save(directory, args=ocp.args.StandardSave(tree))
        except Exception as e:
            code = re.search(r"os_error_code='(\d+)'", str(e))
            if code:
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None
            if "No space left on device" in str(e):  # the code is missing from some messages
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
            raise
        finally:
            ckptr.close()


# Beyond the arrays' bytes: orbax's _METADATA (about the size of metadata.json) and small files.
_SAVE_OVERHEAD = 64 << 10


def _bytes_needed(tree, meta: dict) -> int:
    """About what ``save`` puts on disk: the arrays' bytes (orbax compresses little of trained
    weights), ``metadata.json`` and orbax's own metadata of about the same size."""
    arrays = sum(int(leaf.nbytes) for leaf in jax.tree.leaves(tree))
    return arrays + 2 * len(json.dumps(meta, indent=1, default=float)) + _SAVE_OVERHEAD


def save(path: str | os.PathLike, params: Any, cfg, *, kind: str = "float",
         extra: dict | None = None, vae: tuple[VAEConfig, Any] | None = None,
         overwrite: bool = False, arg: str = "path") -> pathlib.Path:
    """Write ``params`` and metadata to ``path`` atomically; returns the resolved path.

    Args:
      path: target directory: new, empty, or (with ``overwrite``) a checkpoint of this ``kind``.
      params: any pytree of arrays (nested dicts), e.g. float params or a quantized tree.
      cfg: the ``ExperimentConfig`` or model config the params belong to.
      kind: ``"float"`` or ``"quantized"``.
      extra: JSON-serialisable metadata stored alongside (digested like the rest).
      vae: ``(VAEConfig, params)`` of the autoencoder a latent denoiser's samples decode with
        (float; stored in ``DIR/vae``, read back by ``restore_vae``).
      arg: the argument name used in error messages (``--out`` for the CLI).

    A file system without room for about the arrays' bytes plus metadata is refused before
    anything is written (an ``OSError`` with ``errno.ENOSPC`` naming the bytes needed and free);
    a write that fails midway leaves nothing behind.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    tree = _host_tree(params)
    config_kind, config = _config_dict(cfg)
    body = {"format": FORMAT, "library_version": __version__, "kind": kind,
            "config_kind": config_kind, "config": config, "extra": extra or {}}
    vae_tree = None
    if vae is not None:
        vae_cfg, vae_params = vae
        if not isinstance(vae_cfg, VAEConfig):
            raise TypeError(f"vae: expected (VAEConfig, params), got a "
                            f"{type(vae_cfg).__name__} first")
        vae_tree = _host_tree(vae_params)
        body["vae"] = {"config": to_dict(vae_cfg),
                       "arrays": manifest.array_entries(manifest.flat_arrays(vae_tree))}
    try:
        json.dumps(body)
    except TypeError as e:  # fail before writing anything
        raise TypeError(f"extra: expected JSON-serialisable metadata ({e})") from None
    meta = {**body, "manifest": manifest.make_manifest(body, manifest.flat_arrays(tree))}

    def write(tmp: pathlib.Path) -> None:
        _orbax_save(tmp / "params", tree)
        if vae_tree is not None:
            _orbax_save(tmp / VAE_DIR, vae_tree)
        files.crash_point("arrays-written")
        files.write_json(tmp / METADATA_FILE, meta)

    needed = _bytes_needed(tree, meta) + (0 if vae_tree is None else _bytes_needed(vae_tree, {}))
    return files.write_dir(path, write, kind=kind, overwrite=overwrite, arg=arg,
                           needed_bytes=needed)


VAE_DIR = "vae"


def vae_config(meta: dict) -> VAEConfig | None:
    """The ``VAEConfig`` recorded in a checkpoint's metadata, None when it holds no VAE."""
    if "vae" not in meta:
        return None
    try:
        return vae_config_from_dict(meta["vae"]["config"])
    except (ConfigError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"metadata vae.config: not a valid VAE config ({e})") from None


def restore_vae(path: str | os.PathLike) -> tuple[VAEConfig, Any] | None:
    """``(VAEConfig, params)`` of the autoencoder stored with a checkpoint (numpy arrays,
    checked against its manifest and for NaN / Inf), or None when the checkpoint has none."""
    path = pathlib.Path(path).expanduser().absolute()
    meta = read_metadata(path)
    cfg = vae_config(meta)
    if cfg is None:
        return None
    params = _orbax_restore(path / VAE_DIR, path, "the VAE's parameter tree")
    arrays = manifest.flat_arrays(params)
    manifest.check_arrays(meta["vae"].get("arrays", {}), arrays, f"{str(path)!r} (vae)",
                          CheckpointError)
    _check_finite(arrays, path)
    return cfg, params


_LOADERS = {"float": "trdq_jax.models.load_checkpoint / --checkpoint",
            "quantized": "trdq_jax.quant.load_quantized / --quantized"}


def read_metadata(path: str | os.PathLike, kind: str | None = None) -> dict:
    """The metadata dict of a checkpoint, its field digests checked (``CheckpointError`` if
    absent, corrupt, edited, or, when ``kind`` is given, of another kind)."""
    meta, _, _ = manifest.read_record(path, formats={k: FORMAT for k in KINDS},
                                      noun="checkpoint directory", error=CheckpointError)
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(f"{str(path)!r}: holds a {meta['kind']!r} checkpoint, expected a "
                              f"{kind} one (load it with {_LOADERS[meta['kind']]})")
    return meta


def stored_config(meta: dict):
    """The config object recorded in a checkpoint's metadata."""
    try:
        if meta.get("config_kind") == "experiment":
            return experiment_from_dict(meta["config"])
        if meta.get("config_kind") == "model":
            return model_config_from_dict(meta["config"])
    except (ConfigError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"metadata config: not a valid config ({e})") from None
    raise CheckpointError(f"metadata config_kind: expected 'experiment' or 'model', got "
                          f"{meta.get('config_kind')!r}")


def restore(path: str | os.PathLike, cfg=None):
    """Restore ``(params, stored_cfg)`` from ``path``; arrays come back as numpy, checked
    against the manifest and, when float, for NaN / Inf (``CheckpointError`` naming the array).

    Args:
      cfg: if given, the stored config must equal it (an ``ExperimentConfig`` is compared by its
        model config when the checkpoint stores only a model config, and vice versa).
    Whether the tree is a given model's is ``trdq_jax.models.load_checkpoint``'s check.
    """
    path = pathlib.Path(path).expanduser().absolute()  # orbax refuses relative paths
    meta = read_metadata(path)
    record = meta["manifest"]
    stored = stored_config(meta)
    if cfg is not None:
        _check_same_config(stored, cfg, path)
    params = _orbax_restore(path / "params", path, "the parameter tree")
    arrays = manifest.flat_arrays(params)
    manifest.check_arrays(record["arrays"], arrays, str(path), CheckpointError)
    _check_finite(arrays, path)
    return params, stored


def _orbax_restore(directory: pathlib.Path, path: pathlib.Path, what: str):
    try:
        import orbax.checkpoint as ocp
        with _quiet_orbax():
            ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
            try:
                return ckptr.restore(directory)
            finally:
                ckptr.close()
    except Exception as e:  # orbax raises many types for missing/truncated files
        raise CheckpointError(f"{str(path)!r}: cannot read {what} "
                              f"(missing or truncated files?): {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}") from None


def _check_finite(arrays: dict, path: pathlib.Path) -> None:
    for name, value in arrays.items():
        if jnp.issubdtype(value.dtype, jnp.floating) and not np.isfinite(value).all():
            raise CheckpointError(f"{str(path)!r}: array {name} holds {np.isnan(value).sum()} "
                                  f"NaN and {np.isinf(value).sum()} infinite values; parameters "
                                  "must be finite")


def _model_cfg(cfg):
    return cfg.model if isinstance(cfg, ExperimentConfig) else cfg


def _check_same_config(stored, expected, path) -> None:
    a, b = stored, expected
    if isinstance(a, ExperimentConfig) != isinstance(b, ExperimentConfig):
        a, b = _model_cfg(a), _model_cfg(b)
    if a != b:
        diffs = dict_diff(to_dict(a), to_dict(b))
        raise CheckpointError(f"{str(path)!r}: stored config differs from the expected one: "
                              + "; ".join(diffs))
