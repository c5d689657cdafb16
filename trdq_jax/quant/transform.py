"""``quantize(params, calib, recipe) -> qparams`` and running a model on quantized params.

``qparams`` is a plain pytree::

    {"float":  the model's params minus the kernels/biases of quantized layers,
     "layers": {"blocks_0": {"attn": {"qkv": QLinear, ...}}, ...}}   # nested by module path

``QuantizedDenoiser(model, backend)`` is an ``apply_fn`` for the sampler: it runs the unchanged
Flax model under ``flax.linen.intercept_methods`` and replaces every ``Dense`` whose module path
is in ``qparams["layers"]`` by ``qlinear_apply`` with the step's time segment.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax.quant import duquant, hadamard, quantizers
from trdq_jax.quant.qlinear import QLinear, qlinear_apply, transform_activation
from trdq_jax.quant.recipe import DEFAULT_KEEP_FLOAT, Recipe

_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


# ----------------------------------------------------------------------------- layer selection


def select_layers(paths: list[str], recipe: Recipe) -> tuple[list[str], dict[str, list[str]]]:
    """Split calibrated Dense paths into (quantized, {keep-float regex: matched paths}).

    The built-in defaults (embedders, adaLN, final layer) apply where they match; every regex
    the recipe adds must match at least one layer, else ``ValueError`` naming it.
    """
    user = [p for p in recipe.keep_float if p not in DEFAULT_KEEP_FLOAT]
    matched = {pat: [p for p in paths if re.search(pat, p)] for pat in DEFAULT_KEEP_FLOAT + tuple(user)}
    dead = [pat for pat in user if not matched[pat]]
    if dead:
        raise ValueError(f"recipe.keep_float: regex(es) {dead} match no layer; layers: {paths}")
    kept = {p for ps in matched.values() for p in ps}
    quantized = [p for p in paths if p not in kept]
    if not quantized:
        raise ValueError("recipe.keep_float: every layer is kept in float; nothing to quantize")
    return quantized, {k: v for k, v in matched.items() if v}


def _get(tree, path: str):
    for name in path.split("/"):
        tree = tree[name]
    return tree


def _set(tree: dict, path: str, value) -> None:
    names = path.split("/")
    for name in names[:-1]:
        tree = tree.setdefault(name, {})
    tree[names[-1]] = value


def _without(params, paths: list[str]):
    """A copy of ``params`` with the Dense params of ``paths`` removed."""
    out = _to_dict(params)  # copies every dict level; arrays are shared
    for path in paths:
        names = path.split("/")
        node = out
        for name in names[:-1]:
            node = node[name]
        del node[names[-1]]
    return out


def _to_dict(tree):
    return {k: _to_dict(v) for k, v in tree.items()} if isinstance(tree, dict) or hasattr(
        tree, "items") else tree


# ----------------------------------------------------------------------------- per-layer quantize


def _rotation_block(recipe: Recipe, k: int) -> int:
    """Largest divisor of K not above the recipe's block that the rotation supports."""
    for block in range(min(recipe.rotation_block, k), 0, -1):
        if k % block:
            continue
        if recipe.rotation == "duquant":
            return block
        try:
            hadamard.supported_factorization(block)
            return block
        except ValueError:
            continue
    raise ValueError(f"rotation_block: no supported block divides width {k}")


def _rotation_fields(recipe: Recipe, x: np.ndarray, k: int, block: int) -> dict:
    """Rotation parameters calibrated on (smoothed) rows ``x [R, K]``."""
    if recipe.rotation == "hadamard":
        hadamard.supported_factorization(k)  # clear error for unsupported widths
        return {"signs": jnp.asarray(hadamard.random_signs(k, recipe.seed))}
    if recipe.rotation == "block_hadamard":
        return {"signs": jnp.asarray(hadamard.random_signs(block, recipe.seed))}
    if recipe.rotation == "duquant":
        r1, perm, r2 = duquant.calibrate_duquant(x, block, seed=recipe.seed)
        return {"r1": np.asarray(r1, np.float32), "perm": np.asarray(perm, np.int32),
                "r2": np.asarray(r2, np.float32)}
    return {}


def _smoothing(act_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    s = np.maximum(act_absmax, 1e-5) ** alpha / np.maximum(w_absmax, 1e-5) ** (1 - alpha)
    return np.clip(s, 1e-5, None).astype(np.float32)


def _stack(dicts: list[dict]) -> dict:
    return {k: np.stack([np.asarray(d[k]) for d in dicts]) for k in dicts[0]} if dicts else {}


def _build(recipe: Recipe, kernel, bias, transforms: list[dict], act: dict, block: int,
           rows: list | None = None) -> QLinear:
    """Assemble a QLinear: fold each transform into the weight, quantize it, pack int4.

    ``rows``: per transform, the float activation rows ``[R, K]`` it was calibrated on; given
    (and ``recipe.gptq``), weights are quantized with GPTQ on those rows, else round-to-nearest.
    """
    k = kernel.shape[0]
    smooth = [t.pop("smooth") for t in transforms] if "smooth" in transforms[0] else None
    rot = _stack(transforms) if recipe.rotation == "duquant" else (transforms[0] if transforms else {})
    template = QLinear(w_q=jnp.zeros((1, k, 1), jnp.int8), w_scale=jnp.zeros((1, 1)),
                       w_colsum=jnp.zeros((1, 1), jnp.int32), in_features=k,
                       rotation=recipe.rotation, rotation_block=block,
                       **{f: jnp.asarray(v) for f, v in rot.items()})
    codes, scales = [], []
    for j in range(len(transforms) if transforms else 1):
        w = np.asarray(kernel, np.float32)
        if smooth is not None:
            w = w * smooth[j][:, None]
        # W̃ = Rᵀ (s W): rotate the rows of (s W)ᵀ, i.e. apply the activation rotation to Wᵀ.
        wt = np.asarray(_rotate(template, jnp.asarray(w.T), j)).T
        if recipe.float_weights:  # quantization disabled: the folded float weight itself
            codes.append(wt.astype(np.float32))
            scales.append(np.ones(wt.shape[1], np.float32))
            continue
        q, scale = _quantize_folded(jnp.asarray(wt), recipe.w_bits, recipe.w_clip_search)
        if recipe.gptq and rows is not None:
            z = rows[j] if smooth is None else rows[j] / smooth[j]
            xt = _rotate(template, jnp.asarray(z, jnp.float32), j)
            q = _gptq(jnp.asarray(wt), xt.T @ xt, scale, recipe.w_bits)
        codes.append(np.asarray(q))
        scales.append(np.asarray(scale, np.float32))
    codes = np.stack(codes)
    colsum = np.zeros(codes.shape[::2], np.int32) if recipe.float_weights else \
        codes.astype(np.int32).sum(axis=1)
    w_q = _pack_int4(jnp.asarray(codes)) if recipe.w_bits <= 4 else jnp.asarray(codes)
    return dataclasses.replace(
        template, w_q=w_q, w_scale=jnp.asarray(np.stack(scales)), w_colsum=jnp.asarray(colsum),
        bias=None if bias is None else jnp.asarray(bias, jnp.float32),
        smooth=None if smooth is None else jnp.asarray(np.stack(smooth)),
        w_bits=recipe.w_bits, a_bits=recipe.a_bits, a_mode=recipe.a_mode,
        a_symmetric=recipe.a_symmetric, **{f: jnp.asarray(v) for f, v in act.items()})


# The searches below evaluate many candidates per layer; every piece is jitted so that a layer
# costs a few compiled calls (programs are cached by shape and reused across layers and recipes).


@functools.partial(jax.jit, static_argnames=("bits", "clip_search"))
def _quantize_folded(wt: jax.Array, bits: int, clip_search: bool):
    """Folded float weight ``[K, N]`` -> (int8 codes ``[K, N]``, float32 scales ``[N]``)."""
    clip = quantizers.mse_clip_search(wt, bits) if clip_search else 1.0
    q, scale, _ = quantizers.quantize_weight(wt, bits, clip_ratio=clip)
    return q, scale


_pack_int4 = jax.jit(quantizers.pack_int4)


@functools.partial(jax.jit, static_argnames="bits")
def _gptq(wt: jax.Array, hessian: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
    """GPTQ codes int8 ``[K, N]`` of the folded weight ``wt [K, N]`` with fixed per-output scales
    ``[N]`` (symmetric): input channel i is rounded, and its error, divided by ``U[i, i]``, is
    spread onto channels ``> i`` through row i of ``U``, the upper Cholesky factor of
    ``(H + damp I)^-1`` with ``H = X̃ᵀX̃`` the calibration rows' Gram matrix and damp 1% of its
    mean diagonal (Frantar et al. 2023). Minimises ``||X̃ (W̃ - deq(Q))||`` greedily."""
    k = wt.shape[0]
    qmax = 2 ** (bits - 1) - 1
    h = hessian + 0.01 * jnp.mean(jnp.diag(hessian)) * jnp.eye(k) + 1e-8 * jnp.eye(k)
    u = jnp.linalg.cholesky(jnp.linalg.inv(h)).T
    idx = jnp.arange(k)

    def step(i, carry):
        w, codes = carry
        code = jnp.clip(jnp.round(w[i] / scale), -qmax, qmax)
        err = (w[i] - code * scale) / u[i, i]
        w = w - jnp.where((idx > i)[:, None], jnp.outer(u[i], err), 0.0)
        return w, codes.at[i].set(code.astype(jnp.int8))

    return jax.lax.fori_loop(0, k, step, (wt, jnp.zeros(wt.shape, jnp.int8)))[1]


@jax.jit
def _transform_rows(q: QLinear, z: jax.Array, j) -> jax.Array:
    return transform_activation(q, z, j)


def _rotate(template: QLinear, z: jax.Array, j: int) -> jax.Array:
    """Apply transform j's rotation (no smoothing) to rows of ``z [..., K]``."""
    return _transform_rows(dataclasses.replace(template, smooth=None), z, jnp.int32(j))


@jax.jit
def _output_error_jit(q: QLinear, x: jax.Array, y_ref: jax.Array, segment) -> jax.Array:
    y = qlinear_apply(q, x, segment, backend="fake")
    return jnp.mean((y - y_ref) ** 2)


def _output_error(q: QLinear, x: np.ndarray, y_ref: np.ndarray, segment: int) -> float:
    """Mean squared error of the simulated layer against the float output on rows ``x``."""
    return float(_output_error_jit(q, jnp.asarray(x), jnp.asarray(y_ref), jnp.int32(segment)))


@jax.jit
def _errors_over(q: QLinear, x: jax.Array, y_ref: jax.Array, segment, grid: dict) -> jax.Array:
    """Output errors ``[V]``: ``q`` with each ``[S]`` field of ``grid`` (``{field: [V]}``) set to
    its v-th value in every segment, for v in 0..V-1 (one vectorised evaluation of a grid)."""
    def one(values):
        fields = {f: jnp.broadcast_to(v, getattr(q, f).shape) for f, v in values.items()}
        return _output_error_jit(dataclasses.replace(q, **fields), x, y_ref, segment)
    return jax.vmap(one)(grid)


def quantize_layer(kernel, bias, stats, segment_of_step: np.ndarray, num_segments: int,
                   recipe: Recipe, path: str = "?") -> QLinear:
    """Quantize one ``Dense`` (kernel ``[K, N]``) from its calibration statistics.

    ``stats``: ``LayerStats`` with ``absmax [steps, K]``, ``tensor_min/max [steps]``,
    ``rows [steps, R, K]``. Per-segment transforms (``recipe.per_segment_weights``) each get
    their own smoothing alpha (searched), rotation and weight copy; otherwise one transform is
    calibrated on the pooled trajectory and only activation parameters vary per segment.
    Smoothing alphas are compared with round-to-nearest weights; with ``recipe.gptq`` the final
    weights are then GPTQ-fitted once, and activation parameters are searched against them.
    """
    kernel = np.asarray(kernel, np.float32)
    k = kernel.shape[0]
    rows = np.asarray(stats.rows, np.float32)
    if not np.all(np.isfinite(rows)) or not np.all(np.isfinite(stats.absmax)):
        raise ValueError(f"calib: non-finite activation statistics for layer {path}")
    seg_rows = [rows[segment_of_step == s].reshape(-1, k) for s in range(num_segments)]
    seg_absmax = [np.asarray(stats.absmax)[segment_of_step == s].max(0) for s in range(num_segments)]
    groups = (list(range(num_segments)) if recipe.per_segment_weights else [None])
    block = _rotation_block(recipe, k) if recipe.rotation in ("duquant", "block_hadamard") else 0
    w_absmax = np.abs(kernel).max(axis=1)
    bias_f = None if bias is None else np.asarray(bias, np.float32)

    def transform_for(x, absmax, alpha):
        t = {}
        if recipe.smoothing:
            t["smooth"] = _smoothing(absmax, w_absmax, alpha)
            x = x / t["smooth"]
        t.update(_rotation_fields(recipe, x, k, block))
        return t

    gptq_weights = None  # set once the transforms are final (GPTQ runs once per layer)

    def candidate(transforms, act):
        if gptq_weights is not None:
            return dataclasses.replace(gptq_weights, **{f: jnp.asarray(v) for f, v in act.items()})
        return _build(recipe, kernel, bias, [dict(t) for t in transforms], act, block)

    transforms = []
    for g in groups:
        x = rows.reshape(-1, k) if g is None else seg_rows[g]
        absmax = np.asarray(stats.absmax).max(0) if g is None else seg_absmax[g]
        alphas = recipe.alpha_grid if (recipe.smoothing and recipe.alpha_grid) else (recipe.alpha,)
        if len(alphas) == 1:
            transforms.append(transform_for(x, absmax, alphas[0]))
            continue
        y_ref = x @ kernel + (0 if bias_f is None else bias_f)
        # Alphas are compared under dynamic per-token activation quantization (a proxy that
        # needs no activation calibration); static scales are calibrated afterwards.
        options = [transform_for(x, absmax, a) for a in alphas]
        errors = [_output_error(dataclasses.replace(candidate([t], {}), a_mode="dynamic"),
                                x, y_ref, 0) for t in options]
        transforms.append(options[int(np.argmin(errors))])  # first minimum: earliest alpha

    if recipe.gptq and not recipe.float_weights:  # fitted on the rows each transform serves
        fitted = [rows.reshape(-1, k)] if groups == [None] else seg_rows
        gptq_weights = _build(recipe, kernel, bias, [dict(t) for t in transforms], {}, block,
                              fitted)
    act = _calibrate_activations(recipe, candidate, transforms, seg_rows, stats, segment_of_step,
                                 num_segments, kernel, bias_f)
    return candidate(transforms, act)


def _dynamic_act(recipe: Recipe, num_segments: int) -> dict:
    if recipe.a_mode == "dynamic" or recipe.float_activations:
        return {}
    return {"a_scale": np.ones(num_segments, np.float32), "a_zero": np.zeros(num_segments, np.int32)}


def _calibrate_activations(recipe, candidate, transforms, seg_rows, stats, table, num_segments,
                           kernel, bias) -> dict:
    """Per-segment static scales or dynamic clipping ratios, searched on output error."""
    if recipe.float_activations:
        return {}
    probe = candidate(transforms, _dynamic_act(recipe, num_segments))
    ratios = _CLIP_GRID if recipe.a_clip_search else (1.0,)
    fields: dict[str, list] = {"a_clip": []} if recipe.a_mode == "dynamic" else {
        "a_scale": [], "a_zero": []}
    for s in range(num_segments):
        x = seg_rows[s]
        y_ref = x @ kernel + (0 if bias is None else bias)
        j = s if recipe.per_segment_weights else 0
        if recipe.a_mode == "dynamic":
            fields["a_clip"].append(_search(
                dataclasses.replace(probe, a_clip=jnp.ones((num_segments,), jnp.float32)),
                x, y_ref, s, ratios, {"a_clip": np.asarray(ratios, np.float32)}))
            continue
        xt = np.asarray(_transformed(probe, x, j))
        lo, hi = float(xt.min()), float(xt.max())
        if recipe.rotation == "none" and not recipe.smoothing:  # exact range is known
            lo = min(lo, float(np.asarray(stats.tensor_min)[table == s].min()))
            hi = max(hi, float(np.asarray(stats.tensor_max)[table == s].max()))
        # lo * r in float64, then float32: the range each grid ratio r gives
        scale, zero = quantizers.scale_zero_from_range(
            np.asarray([lo * r for r in ratios], np.float32),
            np.asarray([hi * r for r in ratios], np.float32), recipe.a_bits, recipe.a_symmetric)
        scale = np.asarray(scale, np.float32)
        zero = np.zeros(len(ratios), np.int32) if zero is None else np.asarray(zero, np.int32)
        best = _search(probe, x, y_ref, s, range(len(ratios)), {"a_scale": scale, "a_zero": zero})
        fields["a_scale"].append(float(scale[best]))
        fields["a_zero"].append(int(zero[best]))
    return {k: np.asarray(v, np.int32 if k == "a_zero" else np.float32) for k, v in fields.items()}


def _search(q: QLinear, x, y_ref, segment: int, options, grid: dict):
    """The option whose grid entry (``{field: [V]}``) gives the least output error on segment
    ``segment`` (first minimum); a one-entry grid is returned without evaluation."""
    options = list(options)
    if len(options) == 1:
        return options[0]
    errors = _errors_over(q, jnp.asarray(x), jnp.asarray(y_ref), jnp.int32(segment),
                          {f: jnp.asarray(v) for f, v in grid.items()})
    return options[int(np.argmin(np.asarray(errors)))]


def _transformed(q: QLinear, x, j: int):
    return _transform_rows(q, jnp.asarray(x), jnp.int32(j))


def calibrated_selection(calib, recipe: Recipe) -> tuple[list[str], dict[str, list[str]]]:
    """``select_layers`` over every layer ``calib`` saw (with statistics or kept in float), so a
    recipe's own keep_float regexes, already applied by ``calibrate``, match again; the layers
    ``recipe`` quantizes must all have statistics (ValueError naming the missing ones)."""
    paths = list(calib.stats) + [p for ps in calib.keep_float.values() for p in ps
                                 if p not in calib.stats]
    quantized, kept = select_layers(paths, recipe)
    missing = [p for p in quantized if p not in calib.stats]
    if missing:
        raise ValueError(f"calib: layers {missing} have no statistics; calibrate with a recipe "
                         f"that quantizes them")
    return quantized, kept


# ----------------------------------------------------------------------------- whole model


def quantize(params, calib, recipe: Recipe, *, progress: bool = False) -> dict:
    """Pure transform: float params + calibration -> ``{"float": ..., "layers": ...}``.

    ``calib``: a ``Calibration`` (``trdq_jax.quant.calibrate``) whose ``num_segments`` and
    ``segment_of_step`` were made for this recipe.
    """
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe: expected a Recipe, got {type(recipe).__name__}")
    if calib.num_segments != recipe.num_segments:
        raise ValueError(f"calib: calibrated for {calib.num_segments} segments, recipe wants "
                         f"{recipe.num_segments}; re-run calibrate with this recipe")
    quantized, _ = calibrated_selection(calib, recipe)
    layers: dict = {}
    items = quantized
    if progress:
        from tqdm import tqdm
        items = tqdm(quantized, desc=f"quantize {recipe.name}", unit="layer")
    for path in items:
        dense = _get(params, path)
        q = quantize_layer(dense["kernel"], dense.get("bias"), calib.stats[path],
                           np.asarray(calib.segment_of_step), calib.num_segments, recipe, path)
        _set(layers, path, q)
    return {"float": _without(params, quantized), "layers": layers}


def quantized_layer_paths(qparams) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(
        qparams["layers"], is_leaf=lambda x: isinstance(x, QLinear))[0]
    return ["/".join(k.key for k in path) for path, _ in flat]


def weight_bytes(qparams) -> dict:
    """Bytes actually held: ``{"quantized_layers", "float_params", "total"}``.

    Counts every array of each ``QLinear`` (codes, scales, column sums, rotations, per-segment
    copies) and every float parameter left unquantized.
    """
    qbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(qparams["layers"]))
    fbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(qparams["float"]))
    return {"quantized_layers": int(qbytes), "float_params": int(fbytes),
            "total": int(qbytes + fbytes)}


def float_bytes_of(params, paths: list[str], dtype=jnp.bfloat16) -> int:
    """Bytes the given Dense layers take as ``dtype`` floats (the reference for ratios)."""
    itemsize = jnp.dtype(dtype).itemsize
    return int(sum(leaf.size * itemsize for p in paths for leaf in jax.tree.leaves(_get(params, p))))


@dataclasses.dataclass(frozen=True, eq=True)
class QuantizedDenoiser:
    """Sampler ``apply_fn`` running ``model`` with quantized layers (hashable: jit cache key)."""

    model: Any
    backend: str = "xla"

    def __call__(self, qparams, x, t, y, segment, share_cfg):
        layers = qparams["layers"]
        backend = self.backend

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if isinstance(module, nn.Dense) and context.method_name == "__call__":
                node = layers
                for name in module.path:
                    node = node.get(name) if isinstance(node, dict) else None
                    if node is None:
                        break
                if isinstance(node, QLinear):
                    out = qlinear_apply(node, args[0], segment, backend)
                    return out.astype(module.dtype or jnp.float32)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            return self.model.apply({"params": qparams["float"]}, x, t, y, share_cfg=share_cfg)
