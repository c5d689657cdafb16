"""Save and restore parameter pytrees with orbax, plus JSON metadata.

Layout of a checkpoint directory::

    DIR/metadata.json   {"format", "library_version", "kind", "config", "extra"}
    DIR/params/         orbax StandardCheckpointer tree

A checkpoint is written into a temporary sibling directory and renamed into place only when
complete, so a crash never leaves a half-written ``DIR``. ``restore`` checks the stored config
against the one you expect and turns every unreadable/truncated/mismatched case into one
``CheckpointError``.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from typing import Any

import jax
import numpy as np

from trdq_jax.config import (ExperimentConfig, MODEL_CONFIGS, dict_diff, experiment_from_dict,
                             model_config_from_dict, to_dict)

FORMAT = "trdq_jax.checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, truncated or does not match the expected config."""


def _library_version() -> str:
    from trdq_jax import __version__
    return __version__


def _config_dict(cfg) -> tuple[str, dict]:
    if isinstance(cfg, ExperimentConfig):
        return "experiment", to_dict(cfg)
    if isinstance(cfg, tuple(MODEL_CONFIGS.values())):
        return "model", to_dict(cfg)
    raise TypeError(f"cfg: expected an ExperimentConfig or a model config, got {type(cfg).__name__}")


def save(path: str | os.PathLike, params: Any, cfg, *, kind: str = "float",
         extra: dict | None = None, overwrite: bool = False) -> pathlib.Path:
    """Write ``params`` and metadata to ``path`` atomically.

    Args:
      path: target directory (must not exist unless ``overwrite``).
      params: any pytree of arrays (float params, or a quantized pytree later).
      cfg: the ``ExperimentConfig`` or model config the params belong to.
      kind: free-form tag of what the tree holds (``"float"``, ``"quantized"``...).
      extra: JSON-serialisable metadata stored alongside.
    """
    path = pathlib.Path(path).expanduser().absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"path: {str(path)!r} exists; pass overwrite=True to replace it")
    if not jax.tree.leaves(params):
        raise ValueError("params: the tree holds no arrays")
    config_kind, config = _config_dict(cfg)
    meta = {"format": FORMAT, "library_version": _library_version(), "kind": kind,
            "config_kind": config_kind, "config": config, "extra": extra or {}}
    json.dumps(meta)  # fail before writing anything if extra is not serialisable
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        import orbax.checkpoint as ocp
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", jax.tree.map(np.asarray, params))
            ckptr.wait_until_finished()
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2))
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata dict of a checkpoint (raises ``CheckpointError`` if absent or corrupt)."""
    path = pathlib.Path(path)
    meta_file = path / "metadata.json"
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r}: no checkpoint directory there")
    if not meta_file.is_file():
        raise CheckpointError(f"{str(path)!r}: metadata.json is missing (not a trdq_jax checkpoint, "
                              "or an interrupted write)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(meta_file)!r}: corrupt metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r}: unknown format {meta.get('format')!r}, "
                              f"expected {FORMAT!r}")
    return meta


def stored_config(meta: dict):
    """The config object recorded in a checkpoint's metadata."""
    if meta["config_kind"] == "experiment":
        return experiment_from_dict(meta["config"])
    return model_config_from_dict(meta["config"])


def restore(path: str | os.PathLike, cfg=None, *, target: Any = None):
    """Restore ``(params, stored_cfg)`` from ``path``.

    Args:
      cfg: if given, the stored config must equal it (an ``ExperimentConfig`` is compared by its
        model config when the checkpoint stores only a model config, and vice versa).
      target: optional abstract tree (e.g. ``jax.eval_shape`` output); when given, restored arrays
        must match its structure, shapes and dtypes. Float checkpoints of known models are checked
        against the model's abstract params automatically.
    """
    path = pathlib.Path(path).expanduser().absolute()  # orbax refuses relative paths
    meta = read_metadata(path)
    stored = stored_config(meta)
    if cfg is not None:
        _check_same_config(stored, cfg, path)
    if target is None and meta["kind"] == "float":
        from trdq_jax.models import abstract_params
        target = abstract_params(_model_cfg(stored))
    try:
        import orbax.checkpoint as ocp
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(path / "params")
    except Exception as e:  # orbax raises many types for missing/truncated files
        raise CheckpointError(f"{str(path)!r}: cannot read the parameter tree "
                              f"(missing or truncated files?): {type(e).__name__}: {e}") from None
    if target is not None:
        _check_tree_matches(params, target, path)
    return params, stored


def _model_cfg(cfg):
    return cfg.model if isinstance(cfg, ExperimentConfig) else cfg


def _check_same_config(stored, expected, path) -> None:
    a, b = stored, expected
    if isinstance(a, ExperimentConfig) != isinstance(b, ExperimentConfig):
        a, b = _model_cfg(a), _model_cfg(b)
    if a != b:
        da, db = to_dict(a), to_dict(b)
        diffs = dict_diff(da, db)
        raise CheckpointError(f"{str(path)!r}: stored config differs from the expected one: "
                              + "; ".join(diffs))


def _check_tree_matches(params, target, path) -> None:
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(target)[0]}
    problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
    for k in sorted(set(got) & set(want)):
        if tuple(got[k].shape) != tuple(want[k].shape) or np.dtype(got[k].dtype) != np.dtype(want[k].dtype):
            problems.append(f"{k}: stored {got[k].dtype}{list(got[k].shape)}, "
                            f"expected {np.dtype(want[k].dtype)}{list(want[k].shape)}")
    if problems:
        raise CheckpointError(f"{str(path)!r}: parameter tree does not match the model: "
                              + "; ".join(problems[:20])
                              + (f" (+{len(problems) - 20} more)" if len(problems) > 20 else ""))
