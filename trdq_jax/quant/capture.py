"""Calibration data: sampler trajectories and per-layer, per-step input statistics.

Layers are found and instrumented by module path with ``flax.linen.intercept_methods`` (never by
call order): for every selected ``nn.Dense`` (or ``nn.Conv``) the interceptor reduces the layer's
input inside ``jit`` and ``sow``s the result into the ``'trdq_calibration'`` collection, so only
small tensors leave the device. One compiled program serves every step: the step index and the
time are data.

Statistics are taken over all tokens of the CFG batch ``[x; x]`` with the conditioning
``[cond; null]`` (``trdq_jax.sampling.conditioning``; an unconditional model runs ``x`` alone).
The input of a layer is flattened to rows ``[M, K]`` (all leading axes, C order); under CFG the
first ``M / 2`` rows are the conditional half, which holds whenever the batch axis stays outermost
in the model's reshapes (true for the DiT, video DiT and UNet of ``trdq_jax.models``).
"""
from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm import tqdm  # not tqdm.auto: it warns "IProgress not found" without ipywidgets

from trdq_jax.quant.qconv import conv_patches, module_geometry, output_size
from trdq_jax.sampling import Sampler, conditioning, denoise_fn_for, sample
from trdq_jax.sampling.conditioning import apply_model

_COLLECTION = "trdq_calibration"
_KINDS = {"Dense": nn.Dense, "Conv": nn.Conv}
_STAT_NAMES = ("absmax", "tensor_min", "tensor_max", "rows")
# Of the rows sampled per step (``rows_per_step``: all of them enter the Gram matrix), this many
# are kept for the searches that judge quantized activations (half from each CFG half).
KEPT_ROWS_PER_STEP = 8
_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Input statistics of one layer over the calibration steps (numpy).

    absmax: float32 ``[S_steps, K]`` per-input-channel abs-max over all tokens of the step.
    tensor_min, tensor_max: float32 ``[S_steps]`` min / max over the whole input of the step.
    rows: ``[S_steps, R, K]`` input rows (tokens) kept per step for the searches that judge
      quantized activations: the first ``ceil(R/2)`` from the conditional half, the rest from
      the unconditional half, each in token order. For a convolution, im2col patches
      ``[S_steps, R, kh * kw * K]`` at sampled output positions (taps row-major, channels
      minor: ``patch @ kernel.reshape(-1, N)`` is the output there). float32, or float16 when
      ``collect_stats`` stored them (every value of the layer within float16's range; a
      search casts them back to float32).
    weight_absmax: float32 ``[K]`` abs-max of the kernel per input channel (max over outputs;
      for a conv also over the spatial taps).
    gram: float32 ``[K' (K' + 1) / 2]`` (``K'`` = ``rows.shape[2]``), the upper triangle
      (row-major, ``pack_gram``) of ``Xᵀ X`` summed over every row sampled at every step:
      the ``rows_per_step`` rows of which ``rows`` keeps a subset. None: the Gram of ``rows``
      itself (statistics built by hand; ``gram_of`` computes it).
    gram_rows: how many rows ``gram`` sums (0 when ``gram`` is None).
    """

    absmax: np.ndarray
    tensor_min: np.ndarray
    tensor_max: np.ndarray
    rows: np.ndarray
    weight_absmax: np.ndarray
    gram: np.ndarray | None = None
    gram_rows: int = 0

    @property
    def num_steps(self) -> int:
        return int(self.absmax.shape[0])

    @property
    def channels(self) -> int:
        return int(self.absmax.shape[1])


def pack_gram(gram) -> np.ndarray:
    """float32 ``[K (K + 1) / 2]``: the upper triangle of a symmetric ``[K, K]``, row by row
    (``unpack_gram`` inverts it). Half the bytes; symmetric by construction."""
    gram = np.asarray(gram)
    k = gram.shape[0]
    out = np.empty(k * (k + 1) // 2, np.float32)
    start = 0
    for i in range(k):  # row slices: no [K (K + 1) / 2] index arrays
        out[start:start + k - i] = gram[i, i:]
        start += k - i
    return out


def packed_size(k: int) -> int:
    """Length of a packed ``[k, k]`` Gram matrix."""
    return k * (k + 1) // 2


def gram_width(packed_length: int) -> int:
    """``K`` of a packed Gram of ``packed_length`` values (-1 when no ``K`` fits)."""
    k = int(round((np.sqrt(8 * packed_length + 1) - 1) / 2))
    return k if packed_size(k) == packed_length else -1


def unpack_gram(packed, dtype=np.float32) -> np.ndarray:
    """The symmetric ``[K, K]`` of a ``pack_gram`` triangle."""
    packed = np.asarray(packed)
    k = gram_width(packed.shape[0]) if packed.ndim == 1 else -1
    if k < 1:
        raise ValueError(f"gram: expected a packed upper triangle [K (K + 1) / 2], got shape "
                         f"{packed.shape}")
    out = np.zeros((k, k), dtype)
    start = 0
    for i in range(k):
        out[i, i:] = packed[start:start + k - i]
        start += k - i
    out += np.triu(out, 1).T
    return out


def gram_of(stats: LayerStats) -> tuple[np.ndarray, int]:
    """``(packed Gram, rows summed)`` of ``stats``: the stored one, else ``Xᵀ X`` of its rows
    (float32, computed in float64)."""
    if stats.gram is not None:
        return np.asarray(stats.gram, np.float32), int(stats.gram_rows)
    rows = np.asarray(stats.rows, np.float64)
    x = rows.reshape(-1, rows.shape[-1])
    return pack_gram(x.T @ x), x.shape[0]


class CalibrationTrajectory(NamedTuple):
    """What ``calibration_trajectory`` returns (numpy).

    xs: float32 ``[num_steps, N, ...spatial, C]`` model inputs in sampling order.
    timesteps: float32 ``[num_steps]`` model time of each step (training units).
    cond: the conditioning of the N samples (class labels int32 ``[N]``, a pytree, or None).
    x_final: float32 ``[N, ...spatial, C]`` the finished samples.
    """

    xs: np.ndarray
    timesteps: np.ndarray
    cond: Any
    x_final: np.ndarray


def _layer_classes(kinds) -> tuple[type, ...]:
    if isinstance(kinds, str) or not kinds or any(k not in _KINDS for k in kinds):
        raise ValueError(f"kinds: expected a non-empty sequence of {sorted(_KINDS)}, "
                         f"got {kinds!r}")
    return tuple(_KINDS[k] for k in kinds)


def layer_paths(model: nn.Module, params: Any, example_inputs: Sequence[Any], *,
                kinds: Sequence[str] = ("Dense",)) -> list[str]:
    """Module paths (``'blocks_0/attn/qkv'``) of the layers of ``kinds`` called in one forward
    ``model.apply({'params': params}, *example_inputs)``, in first-call order, each once.

    Traced abstractly (``jax.eval_shape``): nothing is computed.
    """
    classes = _layer_classes(kinds)
    if not isinstance(example_inputs, (tuple, list)):
        raise ValueError("example_inputs: expected a tuple of positional model inputs, "
                         f"got {type(example_inputs).__name__}")
    found: list[str] = []

    def record(next_fn, args, kwargs, context):
        if isinstance(context.module, classes) and context.method_name == "__call__":
            path = "/".join(context.module.path)
            if path not in found:
                found.append(path)
        return next_fn(*args, **kwargs)

    def forward(p, inputs):
        with nn.intercept_methods(record):
            return model.apply({"params": p}, *inputs)

    jax.eval_shape(forward, params, tuple(example_inputs))
    return found


def select_paths(available: Sequence[str], patterns: Sequence[str] | None) -> list[str]:
    """The available paths full-matching any of ``patterns`` (regexes; a plain path matches
    itself), in model order. ``None`` selects all. ValueError lists patterns that match nothing."""
    if patterns is None:
        return list(available)
    if isinstance(patterns, str) or not patterns:
        raise ValueError(f"paths: expected a non-empty sequence of path regexes, got {patterns!r}")
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError):
            raise ValueError(f"paths: {pattern!r} is not a valid regex") from None
    unmatched = [p.pattern for p in compiled if not any(p.fullmatch(a) for a in available)]
    if unmatched:
        raise ValueError(f"paths: {unmatched} match no layer; available layers: {list(available)}")
    return [a for a in available if any(p.fullmatch(a) for p in compiled)]


def _layer_key(path: str) -> int:
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


def _input_statistics(x: jax.Array, path: str, num_rows: int, step_key: jax.Array,
                      conv=None, halves: int = 2) -> dict:
    """Reductions of one layer input ``[..., K]`` (see ``LayerStats``), all float32.

    ``conv``: ``(kernel_size, strides, pads)`` of a convolution: its rows are im2col patches
    ``[taps * K]`` at sampled output positions instead of input tokens. ``halves``: 2 for the
    CFG batch ``[cond; uncond]`` (rows sampled from each half), 1 without guidance."""
    k = x.shape[-1]
    flat = x.astype(jnp.float32).reshape(-1, k)
    positions = flat.shape[0]
    if conv is not None:
        (kh, kw), strides, pads = conv
        positions = x.shape[0] * output_size(x.shape[1], kh, strides[0], pads[0]) * \
            output_size(x.shape[2], kw, strides[1], pads[1])
    if positions % halves:
        raise ValueError(f"layer {path!r}: expected an even number of input rows "
                         f"([cond; uncond]), got {positions}")
    take = min(num_rows, positions)
    key = jax.random.fold_in(step_key, _layer_key(path))
    if halves == 1:
        index = jnp.sort(jax.random.permutation(key, positions)[:take])
    else:
        half = positions // 2
        key_cond, key_uncond = jax.random.split(key)
        cond = jnp.sort(jax.random.permutation(key_cond, half)[:(take + 1) // 2])
        uncond = half + jnp.sort(jax.random.permutation(key_uncond, half)[:take // 2])
        index = jnp.concatenate([cond, uncond])
    rows = flat[index] if conv is None else conv_patches(x.astype(jnp.float32), *conv, index)
    return {"absmax": jnp.max(jnp.abs(flat), axis=0), "tensor_min": jnp.min(flat),
            "tensor_max": jnp.max(flat), "rows": rows}


@functools.partial(jax.jit, static_argnames=("model", "paths", "classes", "num_rows"))
def _step_statistics(model, params, x, t, y, step, seed, *, paths, classes, num_rows):
    """One CFG forward of ``[x; x]`` (x ``[N, ...]``) at model time ``t`` (scalar) with the
    conditioning ``y`` ``[cond; null]`` (leading axis 2N), or of ``x`` alone when ``y`` is None;
    returns ``{path: {stat: array}}`` for the selected layers."""
    step_key = jax.random.fold_in(jax.random.key(seed), step)
    halves = 1 if y is None else 2
    x = jnp.concatenate([x] * halves)
    t = jnp.full((x.shape[0],), t, jnp.float32)

    def record(next_fn, args, kwargs, context):
        if isinstance(context.module, classes) and context.method_name == "__call__":
            path = "/".join(context.module.path)
            if path in paths:
                conv = None
                if isinstance(context.module, nn.Conv):
                    conv = (tuple(context.module.kernel_size),
                            *module_geometry(context.module, args[0].shape))
                for name, value in _input_statistics(args[0], path, num_rows, step_key,
                                                     conv, halves).items():
                    context.module.sow(_COLLECTION, name, value)
        return next_fn(*args, **kwargs)

    with nn.intercept_methods(record):
        _, state = apply_model(model, {"params": params}, x, t, y, mutable=[_COLLECTION])
    grouped: dict[str, dict] = {}
    for key, calls in traverse_util.flatten_dict(state[_COLLECTION]).items():
        grouped.setdefault("/".join(key[:-1]), {})[key[-1]] = calls
    return {path: _merge_calls(stats) for path, stats in grouped.items()}


def _merge_calls(stats: dict) -> dict:
    """A module called several times per forward: reduce over calls; rows of the first call."""
    return {"absmax": jnp.max(jnp.stack(stats["absmax"]), axis=0),
            "tensor_min": jnp.min(jnp.stack(stats["tensor_min"])),
            "tensor_max": jnp.max(jnp.stack(stats["tensor_max"])),
            "rows": stats["rows"][0]}


def _weight_absmax(params: Any, path: str, channels: int) -> np.ndarray:
    node = params
    for part in [*path.split("/"), "kernel"]:
        if not hasattr(node, "keys") or part not in node:
            raise ValueError(f"params: expected a kernel at '{path}/kernel'")
        node = node[part]
    kernel = np.abs(np.asarray(node, np.float32))
    if kernel.shape[-2] != channels:
        raise ValueError(f"params: kernel at {path!r} has {kernel.shape[-2]} input channels, "
                         f"its input has {channels}")
    reduce_axes = tuple(i for i in range(kernel.ndim) if i != kernel.ndim - 2)
    out = kernel.max(axis=reduce_axes)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"params: non-finite kernel values in layer {path!r}")
    return out


def _check_trajectory(xs, timesteps, cond, null_cond):
    xs = jnp.asarray(xs)
    if xs.ndim < 3 or not jnp.issubdtype(xs.dtype, jnp.floating):
        raise ValueError("xs: expected a float trajectory [steps, N, ...spatial, C], "
                         f"got {xs.dtype} {xs.shape}")
    if xs.shape[0] == 0 or xs.shape[1] == 0:
        raise ValueError(f"xs: expected a non-empty trajectory [steps, N, ...], got {xs.shape}")
    timesteps = np.asarray(timesteps)
    if timesteps.shape != (xs.shape[0],) or not np.all(np.isfinite(timesteps)):
        raise ValueError(f"timesteps: expected {xs.shape[0]} finite model times [steps], "
                         f"got shape {timesteps.shape}")
    if _is_labels(cond, null_cond):  # class labels and their null label: ranges checked
        if isinstance(null_cond, bool) or null_cond < 0:
            raise ValueError(f"null_label: expected a non-negative int, got {null_cond!r}")
        labels = np.asarray(cond)
        if labels.shape != (xs.shape[1],) or labels.min() < 0 or labels.max() > null_cond:
            raise ValueError(f"labels: expected {xs.shape[1]} ints in [0, {null_cond}], "
                             f"got {labels.dtype} {labels.shape}")
        return xs, timesteps.astype(np.float32), labels.astype(np.int32), np.int32(null_cond)
    cond = conditioning.check_cond(cond, n=xs.shape[1])
    return xs, timesteps.astype(np.float32), cond, conditioning.check_null(null_cond, cond)


def _is_labels(cond, null_cond) -> bool:
    return (isinstance(null_cond, (int, np.integer)) and not isinstance(cond, dict)
            and np.issubdtype(np.asarray(cond).dtype, np.integer) and np.ndim(cond) == 1)


def example_inputs(traj: CalibrationTrajectory, null_cond, n: int | None = None) -> tuple:
    """The model inputs ``(x, t[, cond])`` of the trajectory's first step (its first ``n``
    samples), as the statistics forward sees them: the CFG batch ``[x; x]`` with
    ``[cond; null]``, or ``x`` alone (at least two samples: repeated if there is one)."""
    x = jnp.asarray(traj.xs[0][:n])
    if traj.cond is None:
        x = jnp.concatenate([x, x]) if len(x) == 1 else x
        return x, jnp.full((len(x),), traj.timesteps[0], jnp.float32)
    cond = conditioning.take(traj.cond, slice(0, n))
    null = np.int32(null_cond) if _is_labels(traj.cond, null_cond) else conditioning.take_null(
        null_cond, traj.cond, slice(0, n))
    return (jnp.concatenate([x, x]), jnp.full((2 * len(x),), traj.timesteps[0], jnp.float32),
            conditioning.with_null(cond, null))


def collect_stats(model: nn.Module, params: Any, xs, timesteps, cond, null_cond, *,
                  paths: Sequence[str] | None = None, kinds: Sequence[str] = ("Dense",),
                  rows_per_step: int = 64, seed: int = 0,
                  progress: bool = True) -> dict[str, LayerStats]:
    """Per-step input statistics of the selected layers along a trajectory.

    xs: float ``[steps, N, ...spatial, C]`` model inputs (``calibration_trajectory``).
    timesteps: ``[steps]`` model time per step (training units). cond, null_cond: the
    conditioning of the N samples and of the uncond branch (class labels ints ``[N]`` and the
    null label; a pytree; None and None for an unconditional model).
    paths: regexes over module paths (``layer_paths``); ``None`` takes every layer of ``kinds``.
    rows_per_step: rows sampled per step and layer (fewer when the input has fewer rows);
      the sample derives from ``(seed, step, path)``. Every sampled row enters the layer's
      Gram matrix ``LayerStats.gram`` (exactly what GPTQ and the weight clipping search need);
      ``KEPT_ROWS_PER_STEP`` of them, spread evenly over each CFG half, are kept as
      ``LayerStats.rows`` for the searches on quantized activations. Stored bytes per layer:
      ``K'(K'+1)/2`` floats plus ``steps x 8`` rows, whatever the number of samples.
    Returns ``{path: LayerStats}`` in model order.
    """
    classes = _layer_classes(kinds)
    if isinstance(rows_per_step, bool) or not isinstance(rows_per_step, (int, np.integer)) \
            or rows_per_step < 1:
        raise ValueError(f"rows_per_step: expected a positive int, got {rows_per_step!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
            or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed: expected an int in [0, 2**32), got {seed!r}")
    xs, timesteps, cond, null_cond = _check_trajectory(xs, timesteps, cond, null_cond)
    num_steps, n = xs.shape[0], xs.shape[1]
    y_both = conditioning.with_null(cond, null_cond)
    rows = n * (1 if cond is None else 2)
    example = (jnp.zeros((rows, *xs.shape[2:]), xs.dtype), jnp.zeros((rows,), jnp.float32))
    available = layer_paths(model, params, example + (() if cond is None else (y_both,)),
                            kinds=kinds)
    selected = select_paths(available, paths)
    halves = 1 if cond is None else 2
    buffers: dict[str, dict[str, np.ndarray]] = {}
    grams: dict[str, jax.Array] = {}
    for step in tqdm(range(num_steps), desc="calibration statistics", disable=not progress):
        out = jax.device_get(_step_statistics(
            model, params, xs[step], jnp.asarray(timesteps[step], jnp.float32), y_both,
            jnp.asarray(step, jnp.int32), jnp.asarray(seed, jnp.uint32),
            paths=tuple(selected), classes=classes, num_rows=int(rows_per_step)))
        for path in selected:
            store = buffers.setdefault(path, {})
            for name in _STAT_NAMES:
                value = np.asarray(out[path][name], np.float32)
                if not np.all(np.isfinite(value)):
                    raise ValueError(f"non-finite activation statistic {name!r} in layer "
                                     f"{path!r} at step {step}")
                if name == "rows":
                    grams[path] = _add_gram(grams.get(path), value)
                    value = value[kept_rows(len(value), halves)]
                if name not in store:
                    store[name] = np.empty((num_steps, *value.shape), np.float32)
                store[name][step] = value
    stats = {}
    for path in selected:
        store = buffers[path]
        sampled = num_steps * int(np.asarray(out[path]["rows"]).shape[0])
        if float(store["absmax"].max()) <= _FLOAT16_MAX:  # every value fits: half the bytes
            store["rows"] = store["rows"].astype(np.float16)
        stats[path] = LayerStats(**store, weight_absmax=_weight_absmax(
            params, path, store["absmax"].shape[1]), gram=pack_gram(grams.pop(path)),
            gram_rows=sampled)
    return stats


def kept_rows(num_rows: int, halves: int) -> np.ndarray:
    """Indices of the ``KEPT_ROWS_PER_STEP`` rows kept of ``num_rows`` sampled ones (all when
    there are no more): evenly spaced ranks within each CFG half (the sampled rows of a half
    are a random subset in token order, so the kept ones are too, spread over the samples)."""
    keep = min(KEPT_ROWS_PER_STEP, num_rows)
    if halves == 1:
        return np.round(np.linspace(0, num_rows - 1, keep)).astype(np.int64)
    first = (num_rows + 1) // 2  # _input_statistics: ceil(R/2) conditional rows, then the rest
    cond = np.round(np.linspace(0, first - 1, (keep + 1) // 2))
    uncond = first + np.round(np.linspace(0, num_rows - first - 1, keep // 2))
    return np.concatenate([cond, uncond]).astype(np.int64)


@functools.partial(jax.jit, donate_argnums=0)
def _accumulate_gram(gram: jax.Array, rows: jax.Array) -> jax.Array:
    return gram + jnp.dot(rows.T, rows, precision=jax.lax.Precision.HIGHEST)


def _add_gram(gram: jax.Array | None, rows: np.ndarray) -> jax.Array:
    """``gram + rowsᵀ rows`` float32 (on the device, the accumulator donated)."""
    if gram is None:
        gram = jnp.zeros((rows.shape[1], rows.shape[1]), jnp.float32)
    return _accumulate_gram(gram, jnp.asarray(rows))


def calibration_trajectory(model: nn.Module, params: Any, sampler: Sampler, cond, null_cond,
                           shape: tuple[int, ...], seed: int,
                           cfg_scale: float | None) -> CalibrationTrajectory:
    """Run the real sampler (``sample(denoise_fn_for(model), ..., return_trajectory=True)``)
    and return its per-step model inputs for ``collect_stats``. ``cond``, ``null_cond``: class
    labels and the null label, a conditioning pytree and its null, or None and None."""
    null = ({"null_label": null_cond} if _is_labels(cond, null_cond)
            else {"null_cond": null_cond})
    x_final, xs = sample(denoise_fn_for(model), params, sampler, cond, seed=seed,
                         cfg_scale=cfg_scale, shape=shape, return_trajectory=True, **null)
    return CalibrationTrajectory(xs=np.asarray(xs), timesteps=np.asarray(sampler.model_time),
                                 cond=conditioning.to_numpy(cond), x_final=np.asarray(x_final))
