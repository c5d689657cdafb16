"""Consistency checks of a quantized model: static layer fields against the arrays, the segment
table against the sampler and the recipe, the layers against the model config.

These run when a quantized checkpoint is restored (``trdq_jax.quant.io.load_quantized``), so a
directory whose metadata and arrays disagree, or whose values cannot be right (a NaN or
negative scale, a clipping ratio above 1, a sign of 0, a perm that is no permutation, a rotation
that is not orthogonal), is refused naming the layer and field instead of sampling garbage.
Each check raises ``QuantizedModelError`` (a ``ValueError``).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from trdq_jax.config import ExperimentConfig
from trdq_jax.quant import quantizers, segments
from trdq_jax.quant.qlinear import QLinear

ROTATIONS = ("none", "hadamard", "block_hadamard", "duquant")
ORTHOGONAL_TOL = 1e-4  # max |R R^T - I| of a stored rotation block (float32 rounding: ~1e-6)
_ROTATION_ARRAYS = {"none": (), "hadamard": ("signs",), "block_hadamard": ("signs",),
                    "duquant": ("r1", "perm", "r2")}


class QuantizedModelError(ValueError):
    """A quantized layer or model whose fields contradict its arrays."""


def _fail(where: str, field: str, message: str) -> None:
    raise QuantizedModelError(f"{where}.{field}: {message}")


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _require(label: str, value: np.ndarray, ok: np.ndarray, expected: str) -> None:
    """Fail naming how many entries of ``value`` are not ``expected`` (``ok``: a boolean mask of
    ``value``'s shape) and the first of them."""
    if not ok.all():
        first = np.unravel_index(np.argmin(ok), ok.shape)
        raise QuantizedModelError(f"{label}: {ok.size - np.count_nonzero(ok)} of {ok.size} "
                                  f"values are not {expected} (first: {value[first]:.6g} at "
                                  f"{[int(i) for i in first]})")


def _check_values(q: QLinear, where: str) -> None:
    """The values of a layer's arrays (shapes already checked), vectorised: scales and
    smoothing divisors finite and > 0, clipping ratios in (0, 1], signs +-1, each segment's
    perm a permutation and r1 / r2 orthogonal, bias and float weights finite."""
    positive = (lambda v: (v > 0) & (v < np.inf), "finite and > 0")
    rules = {"w_scale": positive, "a_scale": positive, "smooth": positive,
             "a_clip": (lambda v: (v > 0) & (v <= 1), "in (0, 1]"),
             "signs": (lambda v: (v == 1) | (v == -1), "exactly +1 or -1"),
             "bias": (np.isfinite, "finite"),
             "lr_down": (np.isfinite, "finite"), "lr_up": (np.isfinite, "finite")}
    if q.w_bits == 16:
        rules["w_q"] = (np.isfinite, "finite (float weights)")
    for name, (test, expected) in rules.items():
        if getattr(q, name) is not None:
            value = np.asarray(getattr(q, name))
            if value.dtype == jnp.bfloat16:  # the low-rank branch: checked (and shown) as float32
                value = value.astype(np.float32)
            _require(f"{where}.{name}", value, test(value), expected)
    if q.perm is not None:
        perm = np.asarray(q.perm)  # [S, K]
        if not np.issubdtype(perm.dtype, np.integer):
            _fail(where, "perm", f"expected integer indices, got {perm.dtype}")
        bad = np.flatnonzero((np.sort(perm, axis=1) != np.arange(perm.shape[1])).any(axis=1))
        if bad.size:
            _fail(where, "perm", f"segment(s) {bad.tolist()} not a permutation of "
                  f"0..{perm.shape[1] - 1}")
    for name in ("r1", "r2"):
        if getattr(q, name) is not None:
            r = np.asarray(getattr(q, name), np.float64)  # [S, B, B]
            error = np.abs(r @ r.transpose(0, 2, 1) - np.eye(r.shape[-1])).max(axis=(1, 2))
            bad = np.flatnonzero(~(error <= ORTHOGONAL_TOL))
            if bad.size:
                _fail(where, name, f"segment(s) {bad.tolist()} not orthogonal: max |R R^T - I| "
                      f"= {error[bad[0]]:.3g}, tolerance {ORTHOGONAL_TOL}")


def weight_codes(q: QLinear) -> np.ndarray:
    """The integer weight codes ``[Sw, K, N]`` of a layer (int4 unpacked), as int8 numpy."""
    w = np.asarray(q.w_q)
    return np.asarray(quantizers.unpack_int4(w, q.code_rows)) if w.dtype == np.uint8 else w


def check_qlinear(q: QLinear, where: str, num_segments: int | None = None) -> None:
    """Check one layer's static fields (bits, modes, rotation) against its arrays, and the
    arrays' values (``_check_values``)."""
    w = np.asarray(q.w_q)
    if w.ndim != 3:
        _fail(where, "w_q", f"expected [copies, K, N] codes, got shape {w.shape}")
    copies, n = w.shape[0], w.shape[2]
    if not isinstance(q.in_features, int) or q.in_features < 1:
        _fail(where, "in_features", f"expected a positive int, got {q.in_features!r}")
    if not isinstance(q.kernel_size, tuple) or len(q.kernel_size) not in (0, 2) or not all(
            isinstance(v, int) and v > 0 for v in q.kernel_size):
        _fail(where, "kernel_size", f"expected () for a Dense or (kh, kw) for a conv, got "
              f"{q.kernel_size!r}")
    k = q.code_rows
    group = q.w_group_size
    if isinstance(group, bool) or not isinstance(group, int) or group < 0 or (group and (
            q.kernel_size or k % group or q.w_bits == 16 or q.fp8)):
        _fail(where, "w_group_size", f"expected 0, or a divisor of K = {k} for a Dense with "
              f"integer codes, got {group!r}")
    a_group = q.a_group_size
    if isinstance(a_group, bool) or not isinstance(a_group, int) or a_group < 0 or (a_group and (
            q.kernel_size or k % a_group or q.a_bits == 16 or q.a_mode != "dynamic" or q.fp8
            or (group and group != a_group))):
        _fail(where, "a_group_size", f"expected 0, or a divisor of K = {k} for a Dense with "
              f"dynamic integer activations (equal to w_group_size when both are set), got "
              f"{a_group!r}")
    for field in ("w_bits", "a_bits"):
        bits = getattr(q, field)
        if isinstance(bits, bool) or not isinstance(bits, int) or not (2 <= bits <= 8 or bits == 16):
            _fail(where, field, f"expected bits in 2..8 or 16, got {bits!r}")
    if q.w_bits == 16:
        if w.dtype != np.float32 or w.shape[1] != k:
            _fail(where, "w_bits", f"16 (float weights) needs float32 [copies, {k}, N] weights, "
                  f"the arrays hold {w.dtype}{list(w.shape)}")
    elif q.fp8:
        if q.w_bits != 8 or q.a_bits not in (8, 16) or not q.a_symmetric:
            _fail(where, "fp8", f"float8 e4m3 layers have w_bits 8, a_bits 8 or 16 and symmetric "
                  f"activations, this one has W{q.w_bits}A{q.a_bits}, a_symmetric="
                  f"{q.a_symmetric}")
        if w.dtype != quantizers.FP8_DTYPE or w.shape[1] != k:
            _fail(where, "fp8", f"float8 codes are stored as float8_e4m3fn [copies, {k}, N], the "
                  f"arrays hold {w.dtype}{list(w.shape)}")
        codes = w.astype(np.float32)
        _require(f"{where}.w_q", codes, np.abs(codes) <= quantizers.FP8_MAX,
                 f"finite float8 e4m3 codes in [-{quantizers.FP8_MAX:g}, {quantizers.FP8_MAX:g}]")
        if _shape(q.w_colsum) != (copies, n) or np.any(np.asarray(q.w_colsum)):
            _fail(where, "w_colsum", "float8 layers store zero column sums (no zero points)")
    else:
        packed = q.w_bits <= 4
        want = (np.uint8, (k + 1) // 2) if packed else (np.int8, k)
        if w.dtype != want[0] or w.shape[1] != want[1]:
            _fail(where, "w_bits", f"{q.w_bits}-bit codes are stored as {np.dtype(want[0])} "
                  f"[copies, {want[1]}, N] (in_features={k}), the arrays hold "
                  f"{w.dtype}{list(w.shape)}")
        codes = weight_codes(q)
        qmax = 2 ** (q.w_bits - 1) - 1
        lo, hi = int(codes.min()), int(codes.max())
        if lo < -qmax or hi > qmax:
            _fail(where, "w_bits", f"{q.w_bits}-bit symmetric codes lie in [{-qmax}, {qmax}], "
                  f"the stored codes span [{lo}, {hi}]")
        g = q.w_group_size or k
        colsum = codes.astype(np.int64).reshape(copies, k // g, g, n).sum(axis=2)
        if not q.w_group_size:
            colsum = colsum[:, 0]
        if _shape(q.w_colsum) != colsum.shape or not np.array_equal(np.asarray(q.w_colsum),
                                                                    colsum):
            _fail(where, "w_colsum", "does not equal the column sums of the stored codes"
                  + (f" (per group of {g} rows)" if q.w_group_size else ""))
    scales = (copies, k // q.w_group_size, n) if q.w_group_size else (copies, n)
    if _shape(q.w_scale) != scales:
        _fail(where, "w_scale", f"expected shape {scales}, got {_shape(q.w_scale)}")
    if q.bias is not None and _shape(q.bias) != (n,):
        _fail(where, "bias", f"expected shape ({n},), got {_shape(q.bias)}")
    if q.rotation not in ROTATIONS:
        _fail(where, "rotation", f"expected one of {ROTATIONS}, got {q.rotation!r}")
    for name in ("signs", "r1", "perm", "r2"):
        present = getattr(q, name) is not None
        if present != (name in _ROTATION_ARRAYS[q.rotation]):
            _fail(where, "rotation", f"{q.rotation!r} {'needs' if not present else 'has no'} "
                  f"{name!r} array, but the layer {'lacks' if not present else 'stores'} one")
    block, k = q.rotation_block, q.in_features  # rotations act on the channels of a token
    if q.rotation == "hadamard" and _shape(q.signs) != (k,):
        _fail(where, "rotation", f"a full Hadamard needs signs of shape ({k},), got "
              f"{_shape(q.signs)}")
    if q.rotation == "block_hadamard" and (_shape(q.signs) != (block,) or not block or k % block):
        _fail(where, "rotation_block", f"block {block} must divide in_features={k} and match "
              f"the signs' shape {_shape(q.signs)}")
    if q.rotation == "duquant":
        s = _shape(q.perm)[0] if q.perm is not None else 0
        if (_shape(q.r1) != (s, block, block) or _shape(q.r2) != (s, block, block)
                or _shape(q.perm) != (s, k)):
            _fail(where, "rotation_block", f"DuQuant block {block}: expected r1/r2 [S, {block}, "
                  f"{block}] and perm [S, {k}], got {_shape(q.r1)}, {_shape(q.r2)}, "
                  f"{_shape(q.perm)}")
    if q.a_mode not in ("static", "dynamic"):
        _fail(where, "a_mode", f"expected 'static' or 'dynamic', got {q.a_mode!r}")
    static = q.a_mode == "static" and q.a_bits != 16
    if static != (q.a_scale is not None):
        _fail(where, "a_mode", f"{q.a_mode!r} activations {'need' if static else 'have no'} "
              "stored scales a_scale, but the layer " + ("lacks them" if static else "has them"))
    if static and (q.a_zero is None) != bool(q.a_symmetric):
        _fail(where, "a_symmetric", f"{q.a_symmetric} contradicts the stored zero points "
              f"({'none' if q.a_zero is None else 'present'})")
    if static and q.a_zero is not None:
        qmax = 2 ** (q.a_bits - 1) - 1
        zero = np.asarray(q.a_zero)
        if zero.min() < -qmax - 1 or zero.max() > qmax:
            _fail(where, "a_bits", f"{q.a_bits}-bit zero points lie in [{-qmax - 1}, {qmax}], "
                  f"stored ones span [{zero.min()}, {zero.max()}]")
    _check_branch(q, where, k, n)
    if q.smooth is not None and _shape(q.smooth)[1:] != (q.in_features,):
        _fail(where, "smooth", f"expected [S, {q.in_features}], got {_shape(q.smooth)}")
    if num_segments is not None:
        if copies not in (1, num_segments):
            _fail(where, "w_q", f"{copies} weight copies for {num_segments} segments")
        for name in ("smooth", "r1", "perm", "r2", "a_scale", "a_zero", "a_clip", "lr_down"):
            value = getattr(q, name)
            if value is not None and _shape(value)[0] not in (1, num_segments):
                _fail(where, name, f"leading axis {_shape(value)[0]} is not 1 or the "
                      f"{num_segments} segments")
    _check_values(q, where)


def _check_branch(q: QLinear, where: str, k: int, n: int) -> None:
    """The low-rank branch: both factors or neither, ``lr_down [L, K, r]`` and ``lr_up [L, r,
    N]`` floats with ``1 <= r <= min(K, N)``."""
    if (q.lr_down is None) != (q.lr_up is None):
        _fail(where, "lr_down" if q.lr_down is None else "lr_up", "a low-rank branch needs "
              "both lr_down and lr_up, the layer stores one")
    if q.lr_down is None:
        return
    down, up = _shape(q.lr_down), _shape(q.lr_up)
    if len(down) != 3 or len(up) != 3 or down[0] != up[0] or down[1] != k or up[2] != n \
            or down[2] != up[1]:
        _fail(where, "lr_down", f"expected lr_down [L, {k}, r] and lr_up [L, r, {n}], got "
              f"{list(down)} and {list(up)}")
    if not 1 <= down[2] <= min(k, n):
        _fail(where, "lr_down", f"rank {down[2]} is not in 1..min(K, N) = {min(k, n)}")
    for name in ("lr_down", "lr_up"):
        if not jnp.issubdtype(np.asarray(getattr(q, name)).dtype, jnp.floating):
            _fail(where, name, f"expected floats, got {np.asarray(getattr(q, name)).dtype}")


def check_segment_table(table, num_segments: int, num_steps: int, where: str) -> np.ndarray:
    """The step -> segment table as int32 ``[num_steps]``: integers in ``[0, num_segments)``
    with every segment visited (``segments.check_segments``)."""
    arr = np.asarray(table)
    if arr.shape != (num_steps,):
        raise QuantizedModelError(f"{where}.segment_of_step: expected {num_steps} entries (one "
                                  f"per sampling step), got shape {arr.shape}")
    try:
        return segments.check_segments(arr, num_segments)
    except ValueError as e:
        raise QuantizedModelError(f"{where}.segment_of_step: "
                                  f"{str(e).removeprefix('table: ')}") from None


def check_against_model(qparams, model_cfg, where: str) -> None:
    """Every quantized layer is a Dense or conv of ``model_cfg`` with the same kernel shape; the float part
    holds exactly the model's other params (shapes compared)."""
    from trdq_jax.manifest import flat_arrays
    from trdq_jax.models.factory import abstract_params
    from trdq_jax.quant.transform import quantized_layer_paths
    want = {k: v.shape for k, v in flat_arrays(abstract_params(model_cfg)).items()}
    layers = {}
    for path in quantized_layer_paths(qparams):
        node = qparams["layers"]
        for name in path.split("/"):
            node = node[name]
        layers[path] = node
    keys = {p: "".join(f"['{n}']" for n in p.split("/")) for p in layers}
    for path, q in layers.items():
        kernel = want.get(keys[path] + "['kernel']")
        n = _shape(q.w_scale)[-1]
        if kernel is None or len(kernel) != 2 + len(q.kernel_size):
            kind = "Dense" if not q.kernel_size else f"{len(q.kernel_size)}-D conv"
            raise QuantizedModelError(f"{where}: quantized layer {path!r} is not a {kind} of "
                                      f"the model {model_cfg}")
        if tuple(kernel) != (*q.kernel_size, q.in_features, n):
            raise QuantizedModelError(f"{where}: layer {path!r} has kernel "
                                      f"{[*q.kernel_size, q.in_features, n]}, the model config "
                                      f"wants {list(kernel)}")
    quantized_leaves = {keys[p] + f"['{leaf}']" for p in layers for leaf in ("kernel", "bias")}
    expected_float = {k: v for k, v in want.items() if k not in quantized_leaves}
    got_float = {k: _shape(v) for k, v in flat_arrays(qparams["float"]).items()}
    problems = [f"missing {k}" for k in sorted(set(expected_float) - set(got_float))]
    problems += [f"unexpected {k}" for k in sorted(set(got_float) - set(expected_float))]
    problems += [f"{k}: {got_float[k]} vs {tuple(expected_float[k])}"
                 for k in sorted(set(got_float) & set(expected_float))
                 if got_float[k] != tuple(expected_float[k])]
    if problems:
        raise QuantizedModelError(f"{where}: float params do not match the model config: "
                                  + "; ".join(problems[:10]))


def check_quantized(qparams, recipe, segment_of_step, cfg, where: str,
                    weight_only=None) -> np.ndarray:
    """All checks of a restored quantized model; returns the validated segment table.
    ``weight_only``: the paths quantized weight-only (None: the recipe's regexes name them)."""
    from trdq_jax.manifest import flat_arrays
    from trdq_jax.quant.fit import weight_only_recipe
    from trdq_jax.quant.transform import quantized_layer_paths
    num_steps = cfg.sampler.num_steps if isinstance(cfg, ExperimentConfig) else len(
        np.asarray(segment_of_step))
    table = check_segment_table(segment_of_step, recipe.num_segments, num_steps, where)
    for path in quantized_layer_paths(qparams):
        node = qparams["layers"]
        for name in path.split("/"):
            node = node[name]
        check_qlinear(node, f"{where}: layer {path}", recipe.num_segments)
        alone = recipe.is_weight_only(path) if weight_only is None else path in weight_only
        layer_recipe = weight_only_recipe(recipe) if alone else recipe
        if node.rank != layer_recipe.low_rank:
            raise QuantizedModelError(f"{where}: layer {path} has a low-rank branch of rank "
                                      f"{node.rank}, the recipe says low_rank="
                                      f"{layer_recipe.low_rank}")
        if not node.kernel_size and node.w_bits != 16 and (
                node.w_group_size != layer_recipe.w_group_size):
            raise QuantizedModelError(f"{where}: layer {path}.w_group_size is "
                                      f"{node.w_group_size}, the recipe says "
                                      f"{layer_recipe.w_group_size}")
        if not node.kernel_size and node.a_bits != 16 and (
                node.a_group_size != layer_recipe.a_group_size):
            raise QuantizedModelError(f"{where}: layer {path}.a_group_size is "
                                      f"{node.a_group_size}, the recipe says "
                                      f"{layer_recipe.a_group_size}")
        for field in ("w_bits", "a_bits", "a_mode", "rotation", "fp8"):
            if field in ("w_bits", "a_bits") and getattr(node, field) == 16:
                continue
            if getattr(node, field) != getattr(layer_recipe, field):
                raise QuantizedModelError(f"{where}: layer {path}.{field} is "
                                          f"{getattr(node, field)!r}, the recipe says "
                                          f"{getattr(layer_recipe, field)!r}")
    for name, value in flat_arrays(qparams["float"]).items():
        value = np.asarray(value)
        _require(f"{where}: float param {name}", value, np.isfinite(value), "finite")
    model_cfg = cfg.model if isinstance(cfg, ExperimentConfig) else cfg
    check_against_model(qparams, model_cfg, where)
    return table
