"""Conditioning as data: what a denoiser is conditioned on, whatever it is.

A *conditioning* is ``None`` (an unconditional model) or a pytree of arrays that all share a
leading batch axis ``[N, ...]``: class labels int ``[N]`` (the simple case), caption embeddings
with their mask (``{"emb": float [N, L, D], "mask": bool [N, L]}``), anything a model takes. The
*null conditioning* of classifier-free guidance has the same tree structure, each leaf either one
element (the leaf's shape without the batch axis, e.g. the null label as an int) broadcast over
the batch, or a full ``[N, ...]`` leaf.

The sampler, calibration, CFG plans and offline generation see only these pytrees: slicing a
batch (``take``), doubling it for the batched ``[cond; uncond]`` forward (``with_null``) and
sharding it go leaf by leaf, so no code path is written per conditioning kind.

A model is called as ``model.apply(variables, x, t, cond)`` (``model.apply(variables, x, t)``
when ``cond`` is None), with ``share_cfg=`` only when its ``__call__`` takes it
(``apply_model``): the bundled models and any Flax denoiser of that shape work as they are.

A model may also define ``precompute_cond(self, cond) -> cond``: the part of its work that
depends on the conditioning alone (PixArt: the caption projection and every block's
cross-attention keys and values), returned as a conditioning its ``__call__`` accepts in place
of the original with the same output. The sampler calls it once per batch, before the step
loop (``precompute``), instead of at every step.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def leaves(cond) -> list:
    return [] if cond is None else jax.tree.leaves(cond)


def batch_size(cond) -> int | None:
    """The shared leading axis of ``cond``'s leaves (None when ``cond`` is None)."""
    if cond is None:
        return None
    found = leaves(cond)
    return int(np.shape(found[0])[0]) if found and np.ndim(found[0]) else None


def check_cond(cond, arg: str = "cond", n: int | None = None):
    """``cond`` checked: None, or a pytree of arrays with one leading batch axis (``n`` when
    given), floats finite where concrete. Returns it with numpy/jax arrays as leaves (tracers,
    inside a user's ``jit``, pass through after their shapes are checked)."""
    if cond is None:
        return None
    try:
        converted = jax.tree.map(lambda a: a if isinstance(a, (jax.Array, jax.core.Tracer))
                                 else np.asarray(a), cond)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{arg}: expected None or a pytree of arrays, got "
                         f"{type(cond).__name__} ({e})") from None
    found = jax.tree_util.tree_flatten_with_path(converted)[0]
    if not found:
        raise ValueError(f"{arg}: expected at least one array (None means unconditional)")
    sizes = {}
    for path, leaf in found:
        name = f"{arg}{jax.tree_util.keystr(path)}"
        if np.ndim(leaf) == 0:
            raise ValueError(f"{name}: expected a leading batch axis [N, ...], got a scalar")
        if not (jnp.issubdtype(leaf.dtype, jnp.number) or jnp.issubdtype(leaf.dtype, jnp.bool_)):
            raise ValueError(f"{name}: expected a numeric or bool array, got {leaf.dtype}")
        if jnp.issubdtype(leaf.dtype, jnp.floating) and not isinstance(leaf, jax.core.Tracer) \
                and not bool(np.isfinite(np.asarray(leaf)).all()):
            raise ValueError(f"{name}: expected finite values")
        sizes[name] = int(np.shape(leaf)[0])
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{arg}: the leaves disagree on the batch size: {sizes}")
    got = next(iter(sizes.values()))
    if n is not None and got != n:
        raise ValueError(f"{arg}: expected a batch of {n}, got {got} (leading axis)")
    if got == 0:
        raise ValueError(f"{arg}: expected a non-empty batch, got N = 0")
    return converted


def check_null(null_cond, cond, arg: str = "null_cond"):
    """The null conditioning of ``cond``: the same tree structure, each leaf of ``cond``'s
    dtype kind and of its shape with or without the batch axis."""
    if cond is None:
        if null_cond is not None:
            raise ValueError(f"{arg}: an unconditional sampler (cond None) takes no null "
                             "conditioning")
        return None
    if null_cond is None:
        raise ValueError(f"{arg}: classifier-free guidance needs the null conditioning of the "
                         "uncond branch (e.g. null_label=num_classes for class labels)")
    try:
        null_cond = jax.tree.map(lambda c, u: u if isinstance(u, (jax.Array, jax.core.Tracer))
                                 else np.asarray(u), cond, null_cond)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{arg}: expected the tree structure of cond, "
                         f"{jax.tree.structure(cond)} ({' '.join(str(e).split())[:120]})") from None
    for (path, c), u in zip(jax.tree_util.tree_flatten_with_path(cond)[0],
                            jax.tree.leaves(null_cond)):
        name = f"{arg}{jax.tree_util.keystr(path)}"
        if tuple(np.shape(u)) not in (tuple(np.shape(c))[1:], tuple(np.shape(c))):
            raise ValueError(f"{name}: expected shape {tuple(np.shape(c))[1:]} (one null element) "
                             f"or {tuple(np.shape(c))}, got {tuple(np.shape(u))}")
        if _kind(u.dtype) != _kind(c.dtype):
            raise ValueError(f"{name}: expected a {_kind(c.dtype)} like cond's {c.dtype}, got "
                             f"{u.dtype}")
    return null_cond


def _kind(dtype) -> str:
    if jnp.issubdtype(dtype, jnp.bool_):
        return "bool"
    return "integer" if jnp.issubdtype(dtype, jnp.integer) else "float"


def with_null(cond, null_cond):
    """``[cond; null]`` along the batch axis: the batched CFG conditioning ``[2N, ...]``."""
    def both(c, u):
        c = jnp.asarray(c)  # (int64 / float64 leaves become JAX's 32-bit defaults)
        return jnp.concatenate([c, jnp.broadcast_to(jnp.asarray(u).astype(c.dtype), c.shape)])
    return None if cond is None else jax.tree.map(both, cond, null_cond)


def take(cond, indices):
    """The conditioning of the samples at ``indices`` (ints ``[n]``) of a batch."""
    return None if cond is None else jax.tree.map(lambda a: a[indices], cond)


def take_null(null_cond, cond, indices):
    """The null conditioning of the samples at ``indices`` of ``cond``'s batch: per-sample
    (full ``[N, ...]``) null leaves are taken like ``cond``'s, one-element ones kept."""
    if cond is None:
        return None
    return jax.tree.map(lambda c, u: u[indices] if np.shape(u) == np.shape(c) else u,
                        cond, null_cond)


def to_numpy(cond):
    return None if cond is None else jax.tree.map(np.asarray, cond)


def describe(cond) -> str:
    """A short account of a conditioning for messages: ``"labels int32 [8]"``, ``"None"``."""
    if cond is None:
        return "None (unconditional)"
    parts = [f"{jax.tree_util.keystr(p) or 'labels'} {np.asarray(leaf).dtype} "
             f"{list(np.shape(leaf))}" for p, leaf in jax.tree_util.tree_flatten_with_path(cond)[0]]
    return ", ".join(parts)


def precompute(model, variables, cond):
    """``model.precompute_cond(cond)`` applied with ``variables`` when the model defines it
    (and ``cond`` is not None), else ``cond`` unchanged."""
    if cond is None or not callable(getattr(type(model), "precompute_cond", None)):
        return cond
    return model.apply(variables, cond, method=type(model).precompute_cond)


@functools.lru_cache(maxsize=None)
def takes_share_cfg(model_type: type) -> bool:
    """Whether a Flax module class's ``__call__`` has a ``share_cfg`` parameter."""
    try:
        return "share_cfg" in inspect.signature(model_type.__call__).parameters
    except (TypeError, ValueError):
        return False


def apply_model(model, variables, x, t, cond, share_cfg: Any = False, **kwargs):
    """``model.apply(variables, x, t, cond, share_cfg=share_cfg, **kwargs)``, leaving out
    ``cond`` when it is None and ``share_cfg`` when the model has no such parameter (then
    sharing must be off: a ``ValueError`` says so)."""
    args = (x, t) if cond is None else (x, t, cond)
    if takes_share_cfg(type(model)):
        return model.apply(variables, *args, share_cfg=share_cfg, **kwargs)
    if share_cfg is not False and share_cfg != frozenset():
        raise ValueError(f"share_cfg: {type(model).__name__}.__call__ takes no share_cfg, so "
                         "CFG attention sharing cannot run on it; use share_cfg=False")
    return model.apply(variables, *args, **kwargs)
