"""Model construction from configs: modules, initial and abstract params, input shapes."""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from trdq_jax.config import (ClassifierConfig, DiTConfig, ExternalModelConfig, ModelConfig,
                             PixArtConfig, UNetConfig, VideoDiTConfig)
from trdq_jax.models.dit import DiT


def build_model(cfg: ModelConfig) -> nn.Module:
    """The Flax module for a model config."""
    if isinstance(cfg, DiTConfig):
        return DiT(cfg)
    if isinstance(cfg, VideoDiTConfig):
        from trdq_jax.models.video_dit import VideoDiT
        return VideoDiT(cfg)
    if isinstance(cfg, UNetConfig):
        from trdq_jax.models.unet import UNet
        return UNet(cfg)
    if isinstance(cfg, PixArtConfig):
        from trdq_jax.models.pixart import PixArt
        return PixArt(cfg)
    if isinstance(cfg, ClassifierConfig):
        from trdq_jax.eval.classifier import DigitsClassifier
        return DigitsClassifier(cfg)
    if isinstance(cfg, ExternalModelConfig):
        raise ValueError(f"cfg: {cfg.name!r} is an external model: build the Flax module "
                         "yourself and pass it (its config only describes its samples)")
    raise TypeError(f"cfg: expected a model config, got {type(cfg).__name__}")


def input_shape(cfg: ModelConfig, batch: int = 1) -> tuple[int, ...]:
    """Channels-last input shape of one batch for this config."""
    if isinstance(cfg, ExternalModelConfig):
        return (batch, *cfg.sample_shape)
    spatial = (cfg.input_size, cfg.input_size)
    if isinstance(cfg, VideoDiTConfig):
        spatial = (cfg.num_frames, *spatial)
    return (batch, *spatial, cfg.in_channels)


def dummy_inputs(cfg: ModelConfig, batch: int = 1):
    """Zero ``(x, t, y)`` of the right shapes and dtypes, for ``init`` and ``eval_shape``;
    for a PixArt ``y`` is its conditioning pytree (``pixart.dummy_cond``: captions and mask)."""
    x, t = jnp.zeros(input_shape(cfg, batch), jnp.float32), jnp.zeros((batch,), jnp.float32)
    if isinstance(cfg, PixArtConfig):
        from trdq_jax.models.pixart import dummy_cond
        return x, t, dummy_cond(cfg, batch)
    return x, t, jnp.zeros((batch,), jnp.int32)


def init_params(cfg: ModelConfig, rng: jax.Array):
    """Freshly initialised parameter pytree (the ``'params'`` collection)."""
    inputs = dummy_inputs(cfg)
    if isinstance(cfg, ClassifierConfig):
        inputs = inputs[:1]  # classifiers take images only
    # jit: eager init dispatches (and compiles) every op separately, seconds even for tiny models
    return jax.jit(build_model(cfg).init)(rng, *inputs)["params"]


def abstract_params(cfg: ModelConfig):
    """``jax.ShapeDtypeStruct`` tree of the params: nothing is allocated.

    Traced once per config (cached); each call returns a fresh tree of the cached leaves.
    """
    return jax.tree.map(lambda leaf: leaf, _abstract_params_cached(cfg))


def _hashable(cfg) -> bool:
    try:
        hash(cfg)
    except TypeError:  # e.g. a list where a tuple field was expected
        return False
    return True


def _abstract_params_cached(cfg: ModelConfig):
    return _abstract_params_lru(cfg) if _hashable(cfg) else _trace_abstract_params(cfg)


def _trace_abstract_params(cfg: ModelConfig):
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


_abstract_params_lru = functools.lru_cache(maxsize=64)(_trace_abstract_params)


def _expected_leaves(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``{"blocks_0/attn/qkv/kernel": shape}`` of the params of ``cfg`` (cached per config)."""
    return _expected_leaves_lru(cfg) if _hashable(cfg) else _leaf_shapes(cfg)


def _leaf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {path: tuple(leaf.shape) for path, leaf in _flat_with_paths(
        _abstract_params_cached(cfg)).items()}


_expected_leaves_lru = functools.lru_cache(maxsize=64)(_leaf_shapes)


def _path_str(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _flat_with_paths(tree) -> dict:
    return {_path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"  {title} ({len(items)}): {shown}{more}"


def check_params(cfg: ModelConfig, params, name: str = "params") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``params`` is the param tree of ``cfg``'s model.

    Compares with ``abstract_params(cfg)`` (traced once per config and cached): every missing
    and unexpected path and every mis-shaped leaf is listed, and each leaf must have a floating
    dtype (float32, bfloat16, ... : not necessarily ``cfg.param_dtype``). Reads only shapes and
    dtypes, so concrete arrays, tracers and ``jax.ShapeDtypeStruct`` leaves all work, inside or
    outside ``jit``, at no device cost.
    """
    expected = _expected_leaves(cfg)
    got = _flat_with_paths(params)
    if set(got) == {f"params/{p}" for p in expected}:
        raise ValueError(f"{name}: got a variables dict {{'params': ...}}; pass its "
                         f"['params'] entry (the parameter tree itself)")
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshaped, not_float = [], []
    for path in sorted(set(got) & set(expected)):
        leaf = got[path]
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            not_float.append(f"{path}: not an array ({type(leaf).__name__})")
            continue
        if tuple(shape) != expected[path]:
            misshaped.append(f"{path}: expected {expected[path]}, got {tuple(shape)}")
        if not jnp.issubdtype(dtype, jnp.floating):
            not_float.append(f"{path}: {dtype}")
    if missing or unexpected or misshaped or not_float:
        lines = [f"{name}: expected the parameters of {cfg}, got a tree that differs:"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("mis-shaped", misshaped), ("not floating point", not_float)):
            if items:
                lines.append(_listing(title, items))
        raise ValueError("\n".join(lines))


def param_count(params) -> int:
    """Number of scalars in a (possibly abstract) parameter tree."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))
