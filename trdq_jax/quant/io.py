"""Saving and restoring quantized pytrees (no float weights needed to restore).

The arrays go through ``trdq_jax.checkpoint`` (orbax, int8 exact); the static fields of every
``QLinear`` (bits, modes, rotation kind), the recipe and the step -> segment table go into the
JSON metadata, so restoring rebuilds the exact pytree.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax import checkpoint
from trdq_jax.quant.qlinear import QLinear
from trdq_jax.quant.recipe import Recipe
from trdq_jax.quant.transform import quantized_layer_paths

_STATIC = ("in_features", "w_bits", "a_bits", "a_mode", "a_symmetric", "rotation", "rotation_block")
_ARRAYS = tuple(f.name for f in dataclasses.fields(QLinear) if f.name not in _STATIC)


def _layer(qparams, path):
    node = qparams["layers"]
    for name in path.split("/"):
        node = node[name]
    return node


def save_quantized(path: str | os.PathLike, qparams, cfg, recipe: Recipe, segment_of_step,
                   *, overwrite: bool = False):
    """Write a quantized model: arrays via orbax, static layer fields/recipe/segments as JSON."""
    layers = {p: {f: getattr(_layer(qparams, p), f) for f in _STATIC}
              for p in quantized_layer_paths(qparams)}
    tree = {"float": qparams["float"], "layers": {}}
    for p in layers:
        q = _layer(qparams, p)
        node = tree["layers"]
        for name in p.split("/")[:-1]:
            node = node.setdefault(name, {})
        node[p.split("/")[-1]] = {f: getattr(q, f) for f in _ARRAYS if getattr(q, f) is not None}
    extra = {"recipe": dataclasses.asdict(recipe), "layers": layers,
             "segment_of_step": [int(v) for v in np.asarray(segment_of_step)]}
    return checkpoint.save(path, tree, cfg, kind="quantized", extra=extra, overwrite=overwrite)


def load_quantized(path: str | os.PathLike, cfg=None):
    """``(qparams, stored_cfg, recipe, segment_of_step)`` from a ``save_quantized`` directory."""
    meta = checkpoint.read_metadata(path)
    if meta["kind"] != "quantized":
        raise checkpoint.CheckpointError(f"{str(path)!r}: holds a {meta['kind']!r} checkpoint, "
                                         "expected a quantized one")
    tree, stored = checkpoint.restore(path, cfg)
    extra = meta["extra"]
    layers: dict = {}
    for p, static in extra["layers"].items():
        node = tree["layers"]
        for name in p.split("/"):
            node = node[name]
        arrays = {f: jnp.asarray(v) for f, v in node.items()}
        q = QLinear(**arrays, **static)
        target = layers
        for name in p.split("/")[:-1]:
            target = target.setdefault(name, {})
        target[p.split("/")[-1]] = q
    recipe_fields = {k: tuple(v) if isinstance(v, list) else v for k, v in extra["recipe"].items()}
    qparams = {"float": jax.tree.map(jnp.asarray, tree.get("float", {})), "layers": layers}
    return qparams, stored, Recipe(**recipe_fields), np.asarray(extra["segment_of_step"], np.int32)
