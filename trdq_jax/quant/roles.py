"""Layers found by the model's data flow, not by their names.

Three roles decide how a layer is quantized by default (``Recipe.keep_float`` /
``Recipe.weight_only`` left at None):

- ``input``: the layer's input depends on the model input ``x`` through no other Dense / Conv
  (a patch embedding, a UNet's first conv): kept in float;
- ``output``: the model output depends on the layer's output through no other Dense / Conv (the
  final projection, a UNet's last conv): kept in float;
- ``conditioning``: the layer's input is one vector per sample (``[B, K]``, or that vector
  repeated over a sample's rows, e.g. per video frame): the timestep MLP, adaLN modulation, a
  conditioning projection; or it depends on neither ``x`` nor the time step ``t``, only on the
  conditioning: a caption projection and the cross-attention keys and values of its tokens
  (computed once per prompt, not per step). Quantized weight-only.

Found in two forward-mode passes and one reverse-mode pass over a single example batch, in
which every Dense / Conv output is cut off from the derivatives (``stop_gradient``): the tangent
of ``x`` then reaches exactly the inputs of the input layers, a tangent of ``x`` and ``t``
together (without the cut-off) reaches every layer but the conditioning-only ones, and the cotangent of the model output
reaches back exactly to the outputs of the output layers (a random direction each, so nothing
cancels by symmetry; a missing dependency gives an exact zero).
"""
from __future__ import annotations

import zlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax.sampling.conditioning import apply_model

ROLES = ("input", "output", "conditioning")
REASONS = {"input": "reads the model input", "output": "writes the model output",
           "conditioning": "takes only the conditioning (or one vector per sample)"}


def layer_roles(model: nn.Module, params: Any, example_inputs: Sequence[Any],
                classes: tuple[type, ...] = (nn.Dense, nn.Conv)) -> dict[str, list[str]]:
    """``{"input": [...], "output": [...], "conditioning": [...]}`` module paths (model order)
    of the layers of ``classes`` called in ``apply_model(model, {'params': params},
    *example_inputs)``; ``example_inputs`` = ``(x [B, ...], t [B][, cond])``, B > 1."""
    x, rest = jnp.asarray(example_inputs[0], jnp.float32), tuple(example_inputs[1:])
    batch = x.shape[0]
    if batch < 2:
        raise ValueError("example_inputs: expected a batch of at least 2 (one vector per "
                         f"sample is told apart by the batch size), got {batch}")
    key = jax.random.key(0)
    paths: list[str] = []

    def forward(params, x, eps, t=None, cut_off=True):
        inputs: dict[str, list] = {}
        inputs_after_x = rest if t is None else (t, *rest[1:])

        def cut(next_fn, args, kwargs, context):
            if not (isinstance(context.module, classes) and context.method_name == "__call__"):
                return next_fn(*args, **kwargs)
            path = "/".join(context.module.path)
            if path not in paths:
                paths.append(path)
            inputs.setdefault(path, []).append(args[0])
            out = next_fn(*args, **kwargs)
            out = jax.lax.stop_gradient(out) if cut_off else out
            if eps is None:
                return out
            direction = jax.random.normal(jax.random.fold_in(key, _key(path)), out.shape)
            return out + eps.get(path, 0.0) * direction.astype(out.dtype)

        with nn.intercept_methods(cut):
            out = apply_model(model, {"params": params}, x, *inputs_after_x,
                              *(None,) * (2 - len(inputs_after_x)))
        return out, inputs

    shape = jax.eval_shape(forward, params, x, None)[0]  # finds the layers (trace only)
    zeros = {p: jnp.zeros((), jnp.float32) for p in paths}

    # eager, op by op: for these one-off derivatives that is faster than compiling a program
    # of the forward, its tangent and its transpose (about 2x on the bundled models)
    def derivatives(params, x, x_dir, out_dir):
        inputs, moved = jax.jvp(lambda v: forward(params, v, None)[1], (x,), (x_dir,))
        _, pull = jax.vjp(lambda e: forward(params, x, e)[0], zeros)
        every = lambda test, ts: jnp.all(jnp.stack([test(t) for t in ts]))  # noqa: E731
        return ({p: ~every(lambda t: jnp.all(t == 0), ts) for p, ts in moved.items()},
                {p: g != 0 for p, g in pull(out_dir)[0].items()},
                {p: every(lambda v: _one_vector_per_sample(v, batch), vs)
                 for p, vs in inputs.items()})

    x_dir = jax.random.normal(jax.random.fold_in(key, 1), x.shape)
    moved, reached, per_sample = derivatives(
        params, x, x_dir, jax.random.normal(jax.random.fold_in(key, 2), shape.shape, shape.dtype))
    static = _conditioning_only(forward, params, x, x_dir, rest[0] if rest else None, key)
    roles = {"input": [p for p in paths if bool(moved[p])],
             "output": [p for p in paths if bool(reached[p])],
             "conditioning": [p for p in paths if bool(per_sample[p]) or p in static]}
    return roles


def _conditioning_only(forward, params, x, x_dir, t, key) -> set[str]:
    """The layers whose inputs move with neither ``x`` nor a float time step ``t`` (a random
    tangent of both at once, through every layer): computed from the conditioning alone. None when ``t`` is not a
    float array (nothing to differentiate: then only ``_one_vector_per_sample`` decides)."""
    if t is None or not jnp.issubdtype(jnp.result_type(t), jnp.floating):
        return set()
    t = jnp.asarray(t)
    t_dir = jax.random.normal(jax.random.fold_in(key, 3), t.shape, t.dtype)
    _, moved = jax.jvp(lambda v, s: forward(params, v, None, s, cut_off=False)[1], (x, t),
                       (x_dir, t_dir))
    return {p for p, ts in moved.items() if all(bool(jnp.all(d == 0)) for d in ts)}


def _one_vector_per_sample(inputs: jax.Array, batch: int) -> jax.Array:
    """Whether ``inputs`` ``[..., K]`` (batch outermost) holds one row per sample, or one row
    repeated over each sample's rows."""
    rows = int(np.prod(inputs.shape[:-1]))
    if rows % batch:
        return jnp.asarray(False)
    per = inputs.reshape(batch, rows // batch, inputs.shape[-1])
    return jnp.all(per == per[:, :1])


def _key(path: str) -> int:
    return zlib.crc32(path.encode()) & 0x7FFFFFFF
