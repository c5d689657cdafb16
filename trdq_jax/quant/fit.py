"""Quantizing one layer (Dense or Conv) from its calibration statistics.

For a layer with kernel ``W`` (Dense ``[K, N]``; Conv HWIO ``[kh, kw, C, N]``, seen as its im2col
matrix ``[kh * kw * C, N]``) the recipe's pieces are fitted in this order, each judged by the
layer's output error on the calibration rows with the weights that will really be used:

1. for every smoothing alpha of the grid, and "no smoothing" (one alpha when there is no
   search): the smoothing divisors and the rotation, calibrated on the (pooled or per-segment)
   rows;
2. the folded weight ``W̃`` quantized: GPTQ on the transformed rows' Gram matrix when the
   recipe says so, else round-to-nearest; the per-output-channel clipping ratio (``w_clip_grid``,
   which holds 1.0) picked per column by ``||X̃ (W̃ - deq)||²`` of those very codes;
3. the activation parameters of every segment on that segment's rows (static scales or dynamic
   clipping ratios; the grid holds "no clipping");
4. the alpha whose finished layer has the least output error over the trajectory (per segment
   when every segment has its own weight copy).

A search can therefore never make a layer worse, on its calibration rows, than the same recipe
without that search.

Which rows (``LayerStats``): a shared weight's Gram is ``stats.gram``, summed over every row
sampled at every step, and the transformed Gram ``Mᵀ G M`` is exact for the linear transforms
(smoothing is diagonal, rotations orthogonal): the same GPTQ and weight clipping as from those
rows. With per-segment weights a segment's Gram is that of its kept rows (``stats.rows``), an
estimate from the few rows per step kept after capture, since the segments are chosen after it.
Every other step (the reference outputs, the alpha and activation searches, static ranges and
DuQuant's rotation) runs on the kept rows: they judge quantized activations, which a Gram
cannot. Statistics without a ``gram`` (built by hand) use their rows for everything.
Layers matching ``recipe.weight_only`` keep float activations: only step 2.
Conv activations are transformed over the C channels of each pixel (each tap of a patch row).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax.quant import duquant, hadamard, lowrank, quantizers, timing
from trdq_jax.quant.capture import packed_size, unpack_gram
from trdq_jax.quant.gptq import fit_weights
from trdq_jax.quant.qlinear import (QLinear, dequantize_activation, dequantized_weight,
                                    low_rank_output, quantize_activation, transform_activation)
from trdq_jax.quant.recipe import Recipe

ACT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def weight_only_recipe(recipe: Recipe) -> Recipe:
    """The recipe a weight-only layer is quantized with: float activations, no smoothing or
    rotation, one weight copy, no low-rank branch, per-channel int codes (also under ``fp8``:
    integer codes let the weight-only dot read them without a float copy, ``sliced_dot``)."""
    return dataclasses.replace(recipe, a_bits=16, smoothing=False, alpha_grid=(),
                               rotation="none", per_segment_weights=False, low_rank=0,
                               low_rank_per_segment=False, w_group_size=0, a_group_size=0,
                               fp8=False)


# ----------------------------------------------------------------------------- transforms


def rotation_block(recipe: Recipe, k: int) -> int:
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


def _rotation_fields(recipe: Recipe, tokens: np.ndarray, k: int, block: int) -> dict:
    """Rotation parameters calibrated on (smoothed) token rows ``[R, K]``."""
    if recipe.rotation == "hadamard":
        hadamard.supported_factorization(k)  # clear error for unsupported widths
        return {"signs": jnp.asarray(hadamard.random_signs(k, recipe.seed))}
    if recipe.rotation == "block_hadamard":
        return {"signs": jnp.asarray(hadamard.random_signs(block, recipe.seed))}
    if recipe.rotation == "duquant":
        r1, perm, r2 = duquant.calibrate_duquant(tokens, block, seed=recipe.seed)
        return {"r1": np.asarray(r1, np.float32), "perm": np.asarray(perm, np.int32),
                "r2": np.asarray(r2, np.float32)}
    return {}


def smoothing_divisors(act_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant ``s = a^alpha / w^(1-alpha)`` float32 ``[K]`` (floored at 1e-5)."""
    s = np.maximum(act_absmax, 1e-5) ** alpha / np.maximum(w_absmax, 1e-5) ** (1 - alpha)
    return np.clip(s, 1e-5, None).astype(np.float32)


@functools.partial(jax.jit, static_argnames="taps")
def _transform_rows(q: QLinear, rows: jax.Array, j, taps: int) -> jax.Array:
    """Rows ``[R, taps * K]`` -> transformed rows: every tap's K channels as one token."""
    tokens = rows.reshape(rows.shape[0], taps, -1)
    return transform_activation(q, tokens, j).reshape(rows.shape)


def transform_rows(q: QLinear, rows, j: int) -> jax.Array:
    """``rows [R, taps * K]`` through transform ``j`` (smoothing, rotation) of ``q``."""
    return _transform_rows(q, jnp.asarray(rows, jnp.float32), jnp.int32(j), taps=q.taps)


def _fold(q: QLinear, kernel: np.ndarray, j: int) -> jax.Array:
    """Folded weight ``W̃ = M⁻¹ W`` ``[taps * K, N]``: ``x̃ W̃ = x W`` for transform j (the
    transform is orthogonal after smoothing: rotate the rows of ``(s W_tap)ᵀ`` per tap)."""
    taps, k = q.taps, q.in_features
    w = kernel.reshape(taps, k, -1)
    if q.smooth is not None:
        w = w * np.asarray(q.smooth[j])[None, :, None]
    wt = np.transpose(w, (0, 2, 1)).reshape(-1, k)                     # [taps * N, K]
    rotated = transform_rows(dataclasses.replace(q, smooth=None, kernel_size=()), wt, j)
    return jnp.transpose(rotated.reshape(taps, -1, k), (0, 2, 1)).reshape(taps * k, -1)


def _transformed_gram(q: QLinear, gram: jax.Array, j: int) -> jax.Array:
    """``Mᵀ H M`` for ``H = XᵀX``: the Gram matrix of the transformed rows, from ``H``."""
    once = transform_rows(q, gram, j)
    return transform_rows(q, once.T, j)


# ----------------------------------------------------------------------------- evaluation


@jax.jit
def _rows_output(q: QLinear, rows: jax.Array, segment) -> jax.Array:
    """The layer's simulated output on im2col rows ``[R, taps * K]`` (``fake`` backend): every
    tap's channels are one activation token, as the convolution quantizes them."""
    taps = q.taps
    xt = _transform_rows(q, rows, segment, taps=taps)
    xq = xt
    if q.a_bits != 16:
        tokens = xt.reshape(rows.shape[0], taps, -1)
        codes, scale, zero = quantize_activation(q, tokens, segment)
        xq = dequantize_activation(q, codes, scale, zero).reshape(rows.shape)
    y = jnp.dot(xq, dequantized_weight(q, segment), precision=jax.lax.Precision.HIGHEST)
    y = y + low_rank_output(q, xt, segment)  # the branch reads the float activation
    return y + q.bias if q.bias is not None else y


@jax.jit
def _output_error(q: QLinear, rows: jax.Array, y_ref: jax.Array, segment) -> jax.Array:
    return jnp.mean((_rows_output(q, rows, segment) - y_ref) ** 2)


@jax.jit
def _errors_over(q: QLinear, rows, y_ref, segment, grid: dict) -> jax.Array:
    """Output errors ``[V]``: ``q`` with each ``[S]`` field of ``grid`` (``{field: [V]}``) set to
    its v-th value in every segment (one vectorised evaluation of a grid)."""
    def one(values):
        fields = {f: jnp.broadcast_to(v, getattr(q, f).shape) for f, v in values.items()}
        return _output_error(dataclasses.replace(q, **fields), rows, y_ref, segment)
    return jax.vmap(one)(grid)


def layer_error(q: QLinear, rows, y_ref, segment: int) -> float:
    """Mean squared error of the simulated layer against the float output on ``rows``."""
    return float(_output_error(q, jnp.asarray(rows), jnp.asarray(y_ref), jnp.int32(segment)))


def _search(q: QLinear, rows, y_ref, segment: int, options, grid: dict):
    """The option whose grid entry gives the least output error (first minimum); a one-entry
    grid is returned without evaluation."""
    options = list(options)
    if len(options) == 1:
        return options[0]
    errors = _errors_over(q, jnp.asarray(rows), jnp.asarray(y_ref), jnp.int32(segment),
                          {f: jnp.asarray(v) for f, v in grid.items()})
    return options[int(np.argmin(np.asarray(errors)))]


# ----------------------------------------------------------------------------- one layer


@dataclasses.dataclass
class _Layer:
    """What every candidate of one layer shares (numpy float32)."""

    recipe: Recipe
    kernel: np.ndarray            # [taps * K, N]
    bias: np.ndarray | None
    kernel_size: tuple
    k: int                        # channels per token
    block: int
    seg_rows: list                # per segment [R_s, taps * K]
    seg_ref: list                 # per segment float outputs [R_s, N]
    seg_absmax: list              # per segment [K]
    w_absmax: np.ndarray          # [K]
    tensor_range: list            # per segment (min, max) of the raw input
    grams: dict                   # weight group -> X^T X [taps*K, taps*K]

    @property
    def taps(self) -> int:
        return self.kernel.shape[0] // self.k

    def template(self, **fields) -> QLinear:
        r = self.recipe
        return QLinear(w_q=jnp.zeros((1, self.kernel.shape[0], 1), jnp.int8),
                       w_scale=jnp.zeros((1, 1)), w_colsum=jnp.zeros((1, 1), jnp.int32),
                       in_features=self.k, rotation=r.rotation, rotation_block=self.block,
                       kernel_size=self.kernel_size, w_bits=r.w_bits, a_bits=r.a_bits,
                       a_mode=r.a_mode, a_symmetric=r.a_symmetric or r.fp8, fp8=r.fp8,
                       w_group_size=r.w_group_size, a_group_size=r.a_group_size,
                       bias=None if self.bias is None else jnp.asarray(self.bias),
                       **{f: jnp.asarray(v) for f, v in fields.items()})


def _group_rows(layer: _Layer, g):
    return np.concatenate(layer.seg_rows) if g is None else layer.seg_rows[g]


def _group_absmax(layer: _Layer, g):
    return np.max(np.stack(layer.seg_absmax), axis=0) if g is None else layer.seg_absmax[g]


def _transform(layer: _Layer, g, alpha: float) -> dict:
    """Smoothing and rotation of weight group g (None = pooled) for one alpha."""
    r = layer.recipe
    tokens = _group_rows(layer, g).reshape(-1, layer.k)
    t = {}
    with timing.stage("rotation"):
        if r.smoothing and alpha is None:  # the search's "no smoothing" candidate
            t["smooth"] = np.ones(layer.k, np.float32)
        elif r.smoothing:
            t["smooth"] = smoothing_divisors(_group_absmax(layer, g), layer.w_absmax, alpha)
            tokens = tokens / t["smooth"]
        t.update(_rotation_fields(r, tokens, layer.k, layer.block))
    return t


def _weights(layer: _Layer, g, transforms: list[dict]) -> list[tuple]:
    """Per transform of weight group g: (codes int8 or folded float32 ``[taps*K, N]``,
    scales ``[N]``, low-rank branch ``(down [L, taps*K, r], up [L, r, N])`` bf16 or None);
    every candidate of the group is fitted in one compiled call."""
    r = layer.recipe
    qs = [layer.template(**{f: (v[None] if f in ("smooth", "r1", "perm", "r2") else v)
                            for f, v in t.items()}) for t in transforms]
    folded = jnp.stack([_fold(q, layer.kernel, 0) for q in qs])
    firsts = [None] * len(qs)
    if r.low_rank:  # the residual is what gets quantized
        with timing.stage("low_rank"):
            firsts = [lowrank.top_singular(np.asarray(w), r.low_rank) for w in folded]
            folded = folded - jnp.stack([jnp.asarray(d) @ jnp.asarray(u) for d, u in firsts])
    if r.float_weights:
        ones = np.ones(folded.shape[-1], np.float32)
        return [(np.asarray(w, np.float32), ones, _stored(first))
                for w, first in zip(folded, firsts)]
    grid = tuple(r.w_clip_grid) if r.w_clip_search else (1.0,)
    hessians = None
    if r.gptq or len(grid) > 1 or r.low_rank:
        hessians = jnp.stack([_transformed_gram(q, layer.grams[g], 0) for q in qs])
    out = []
    with timing.stage("gptq" if r.gptq else "weight_clip_search"):
        for i in range(len(qs)):  # one candidate at a time: memory of one alpha's clip grid
            codes, scales = fit_weights(folded[i:i + 1], None if hessians is None
                                        else hessians[i:i + 1], r.w_bits, grid, bool(r.gptq),
                                        r.fp8, r.w_group_size)
            out.append((np.asarray(codes[0]), np.asarray(scales[0], np.float32), None))
    if not r.low_rank:
        return out
    with timing.stage("low_rank"):
        for i, (codes, scales, _) in enumerate(out):
            w = np.asarray(folded[i]) + firsts[i][0] @ firsts[i][1]
            deq = codes.astype(np.float32) * (np.repeat(scales, r.w_group_size, axis=0)
                                              if r.w_group_size else scales)
            grams = [hessians[i]]
            if r.low_rank_per_segment:
                grams = [_gram(transform_rows(qs[i], rows, 0)) for rows in layer.seg_rows]
            out[i] = (codes, scales, lowrank.refit(w, deq, firsts[i], grams, r.low_rank))
    return out


@jax.jit
def _gram(x: jax.Array) -> jax.Array:
    return jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST)


def _stored(first) -> tuple | None:
    """A first split ``(down, up)`` as a stored branch: bf16, one entry."""
    if first is None:
        return None
    return tuple(f[None].astype(lowrank.BRANCH_DTYPE) for f in first)


def _assemble(layer: _Layer, transforms: list[dict], weights: list) -> QLinear:
    """A QLinear from per-group transforms and weights (activation fields not set yet)."""
    r = layer.recipe
    fields = {}
    if r.smoothing:
        fields["smooth"] = np.stack([t["smooth"] for t in transforms])
    if r.rotation in ("hadamard", "block_hadamard"):
        fields["signs"] = transforms[0]["signs"]
    elif r.rotation == "duquant":
        for f in ("r1", "perm", "r2"):
            fields[f] = np.stack([t[f] for t in transforms])
    codes = np.stack([c for c, _, _ in weights])
    scales = np.stack([s for _, s, _ in weights])
    if r.low_rank:  # one branch per weight group, or per segment around a shared weight
        fields["lr_down"] = np.concatenate([b[0] for _, _, b in weights])
        fields["lr_up"] = np.concatenate([b[1] for _, _, b in weights])
    with timing.stage("packing"):
        if r.float_weights or r.fp8:
            colsum = np.zeros(scales.shape, np.int32)
        elif r.w_group_size:  # [Sw, G, N]: per group of rows
            colsum = codes.astype(np.int32).reshape(
                codes.shape[0], -1, r.w_group_size, codes.shape[-1]).sum(axis=2)
        else:
            colsum = codes.astype(np.int32).sum(axis=1)
        w_q = quantizers.pack_int4(jnp.asarray(codes)) if r.w_bits <= 4 else jnp.asarray(codes)
    return dataclasses.replace(layer.template(**fields), w_q=w_q, w_scale=jnp.asarray(scales),
                               w_colsum=jnp.asarray(colsum))


def _activation_fields(layer: _Layer, q: QLinear) -> dict:
    """Per-segment static scales or dynamic clipping ratios, searched on output error with the
    layer's final weights."""
    r = layer.recipe
    num_segments = len(layer.seg_rows)
    if r.float_activations:
        return {}
    ratios = ACT_CLIP_GRID if r.a_clip_search else (1.0,)
    if r.a_mode == "dynamic":
        probe = dataclasses.replace(q, a_clip=jnp.ones((num_segments,), jnp.float32))
        clips = [_search(probe, layer.seg_rows[s], layer.seg_ref[s], s, ratios,
                         {"a_clip": np.asarray(ratios, np.float32)}) for s in range(num_segments)]
        return {"a_clip": np.asarray(clips, np.float32)}
    probe = dataclasses.replace(q, a_scale=jnp.ones((num_segments,), jnp.float32),
                                a_zero=jnp.zeros((num_segments,), jnp.int32))
    scales, zeros = [], []
    for s in range(num_segments):
        j = s if r.per_segment_weights else 0
        xt = np.asarray(transform_rows(probe, layer.seg_rows[s], j))
        lo, hi = float(xt.min()), float(xt.max())
        if r.rotation == "none" and not r.smoothing:  # the exact range is known
            lo, hi = min(lo, layer.tensor_range[s][0]), max(hi, layer.tensor_range[s][1])
        scale, zero = _static_scales(np.asarray([lo * c for c in ratios], np.float32),
                                     np.asarray([hi * c for c in ratios], np.float32), r)
        scale = np.asarray(scale, np.float32)
        zero = np.zeros(len(ratios), np.int32) if zero is None else np.asarray(zero, np.int32)
        best = _search(probe, layer.seg_rows[s], layer.seg_ref[s], s, range(len(ratios)),
                       {"a_scale": scale, "a_zero": zero})
        scales.append(float(scale[best]))
        zeros.append(int(zero[best]))
    if q.a_symmetric:  # symmetric codes (fp8 included) store no zero points
        return {"a_scale": np.asarray(scales, np.float32)}
    return {"a_scale": np.asarray(scales, np.float32), "a_zero": np.asarray(zeros, np.int32)}


def _static_scales(lo, hi, r: Recipe):
    """Static activation ``(scale, zero or None)`` for the range ``[lo, hi]`` (arrays)."""
    if r.fp8:
        return quantizers.fp8_scale(jnp.maximum(-jnp.asarray(lo), jnp.asarray(hi))), None
    return quantizers.scale_zero_from_range(lo, hi, r.a_bits, r.a_symmetric)


def _finish(layer: _Layer, transforms, weights) -> QLinear:
    q = _assemble(layer, transforms, weights)
    with timing.stage("activation_search"):
        act = _activation_fields(layer, q)
    return dataclasses.replace(q, **{f: jnp.asarray(v) for f, v in act.items()})


def segment_errors(q: QLinear, layer: _Layer) -> np.ndarray:
    """Output MSE per segment, float64 ``[S]``."""
    return np.asarray([layer_error(q, layer.seg_rows[s], layer.seg_ref[s], s)
                       for s in range(len(layer.seg_rows))], np.float64)


def _prepare(kernel, bias, stats, table, num_segments, recipe, path) -> _Layer:
    kernel = np.asarray(kernel, np.float32)
    if kernel.ndim not in (2, 4):
        raise ValueError(f"kernel of {path}: expected a Dense [K, N] or HWIO conv kernel, "
                         f"got shape {kernel.shape}")
    kernel_size = () if kernel.ndim == 2 else tuple(int(v) for v in kernel.shape[:2])
    k = kernel.shape[-2]
    matrix = kernel.reshape(-1, kernel.shape[-1])
    rows = np.asarray(stats.rows, np.float32)
    if rows.ndim != 3 or rows.shape[-1] != matrix.shape[0]:
        raise ValueError(f"calib: rows of layer {path} have shape {rows.shape}, expected "
                         f"[steps, R, {matrix.shape[0]}] for its kernel {kernel.shape}")
    absmax = np.asarray(stats.absmax, np.float32)
    if not np.all(np.isfinite(rows)) or not np.all(np.isfinite(absmax)):
        raise ValueError(f"calib: non-finite activation statistics for layer {path}")
    table = np.asarray(table)
    seg_rows = [rows[table == s].reshape(-1, matrix.shape[0]) for s in range(num_segments)]
    bias_f = None if bias is None else np.asarray(bias, np.float32)
    ref = [x @ matrix + (0 if bias_f is None else bias_f) for x in seg_rows]
    t_min, t_max = np.asarray(stats.tensor_min), np.asarray(stats.tensor_max)
    block = rotation_block(recipe, k) if recipe.rotation in ("duquant", "block_hadamard") else 0
    groups = list(range(num_segments)) if recipe.per_segment_weights else [None]
    needs_gram = not recipe.float_weights and (recipe.gptq or recipe.w_clip_search
                                               or recipe.low_rank > 0)
    grams = {}
    if needs_gram:
        for g in groups:
            if g is None and stats.gram is not None:  # every sampled row of the trajectory
                grams[g] = jnp.asarray(unpack_gram(_checked_gram(stats, matrix.shape[0], path)))
                continue
            x = jnp.asarray(np.concatenate(seg_rows) if g is None else seg_rows[g])
            grams[g] = jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST)
    return _Layer(recipe=recipe, kernel=matrix, bias=bias_f, kernel_size=kernel_size, k=k,
                  block=block, seg_rows=seg_rows, seg_ref=ref,
                  seg_absmax=[absmax[table == s].max(0) for s in range(num_segments)],
                  w_absmax=np.abs(kernel.reshape(-1, k, kernel.shape[-1])).max(axis=(0, 2)),
                  tensor_range=[(float(t_min[table == s].min()), float(t_max[table == s].max()))
                                for s in range(num_segments)], grams=grams)


def _checked_gram(stats, width: int, path: str) -> np.ndarray:
    gram = np.asarray(stats.gram, np.float32)
    if gram.shape != (packed_size(width),) or not np.all(np.isfinite(gram)):
        raise ValueError(f"calib: gram of layer {path} has shape {gram.shape}, expected a finite "
                         f"packed [{width}, {width}] triangle ({packed_size(width)} values)")
    return gram


def check_groups(recipe: Recipe, kernel_shape: tuple, path: str = "?") -> None:
    """ValueError when a group size of ``recipe`` does not divide K of the Dense layer at
    ``path`` (kernel ``[K, N]``) that would use it (convolutions use none)."""
    if len(kernel_shape) != 2:
        return
    for field, used in (("w_group_size", not recipe.float_weights),
                        ("a_group_size", not recipe.float_activations)):
        group = getattr(recipe, field)
        if used and group and kernel_shape[0] % group:
            raise ValueError(f"Recipe.{field}: {group} does not divide K = {kernel_shape[0]} "
                             f"of layer {path} (kernel {list(kernel_shape)}); choose a "
                             f"divisor or 0")


def quantize_layer(kernel, bias, stats, segment_of_step: np.ndarray, num_segments: int,
                   recipe: Recipe, path: str = "?", weight_only: bool | None = None) -> QLinear:
    """Quantize one Dense (kernel ``[K, N]``) or Conv (HWIO ``[kh, kw, K, N]``).

    ``stats``: ``LayerStats`` with ``absmax [steps, K]``, ``tensor_min/max [steps]``, ``rows
    [steps, R, taps * K]`` (im2col rows for a conv). ``segment_of_step`` int ``[steps]``. With
    ``recipe.per_segment_weights`` each segment has its own alpha, rotation and weight copy;
    otherwise one transform and one weight serve every segment and only the activation
    parameters vary per segment. ``weight_only``: quantize the weights alone (float
    activations, no smoothing or rotation); None asks the recipe's regexes
    (``Recipe.is_weight_only``). See the module doc for the order of the searches.
    """
    if recipe.is_weight_only(path) if weight_only is None else weight_only:
        recipe = weight_only_recipe(recipe)
    if recipe.w_group_size and (np.ndim(kernel) != 2 or recipe.float_weights):
        recipe = dataclasses.replace(recipe, w_group_size=0)  # convs: per-channel scales
    if recipe.a_group_size and (np.ndim(kernel) != 2 or recipe.float_activations):
        recipe = dataclasses.replace(recipe, a_group_size=0)  # convs: per-token scales
    check_groups(recipe, np.shape(kernel), path)
    layer = _prepare(kernel, bias, stats, segment_of_step, num_segments, recipe, path)
    if recipe.low_rank:
        lowrank.check_rank(recipe.low_rank, *layer.kernel.shape, path)
    groups = list(range(num_segments)) if recipe.per_segment_weights else [None]
    # a searched grid also offers "no smoothing" (None): searching can only help
    alphas = (tuple(recipe.alpha_grid) + (None,) if (recipe.smoothing and recipe.alpha_grid)
              else (recipe.alpha,))
    if len(alphas) == 1:
        return _builder(layer, groups, alphas)[1]([alphas[0]] * len(groups))
    cheap = recipe.gptq and recipe.search_weights == "rtn"
    judge = dataclasses.replace(layer, recipe=dataclasses.replace(recipe, gptq=False)) \
        if cheap else layer
    parts, build = _builder(judge, groups, alphas)
    with timing.stage("alpha_search"):
        built = [build([a] * len(groups)) for a in alphas]
        errors = np.stack([segment_errors(q, judge) for q in built])      # [alphas, S]
        if groups == [None]:
            sizes = np.asarray([len(x) for x in layer.seg_rows], np.float64)
            best = [int(np.argmin(errors @ sizes))]
        else:
            best = [int(np.argmin(errors[:, s])) for s in range(num_segments)]
    choice = [alphas[b] for b in best]  # one alpha per weight group
    if not cheap:
        return built[best[0]] if len(set(best)) == 1 else build(choice)
    # "rtn": alphas were compared with round-to-nearest weights; GPTQ once, at the choice
    transforms = [parts(g, a)[0] for g, a in zip(groups, choice)]
    weights = [_weights(layer, g, [t])[0] for g, t in zip(groups, transforms)]
    return _finish(layer, transforms, weights)


def _builder(layer: _Layer, groups: list, alphas: tuple):
    """``(parts, build)``: ``parts(g, alpha)`` -> (transform, weights) of weight group g, all
    alphas of a group fitted on first use; ``build(choice)`` -> the finished layer for one
    alpha per group."""
    cache: dict = {}

    def parts(g, alpha):
        if (g, alpha) not in cache:
            transforms = [_transform(layer, g, a) for a in alphas]
            for a, t, w in zip(alphas, transforms, _weights(layer, g, transforms)):
                cache[g, a] = (t, w)
        return cache[g, alpha]

    def build(choice):
        got = [parts(g, a) for g, a in zip(groups, choice)]
        return _finish(layer, [t for t, _ in got], [w for _, w in got])

    return parts, build
