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
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax.quant.fit import check_groups, quantize_layer
from trdq_jax.quant.qconv import module_geometry, qconv_apply
from trdq_jax.quant.qlinear import QLinear, output_columns, qlinear_apply, segment_invariant
from trdq_jax.quant.recipe import DEFAULT_KEEP_FLOAT, DEFAULT_WEIGHT_ONLY, Recipe
from trdq_jax.quant.roles import REASONS
from trdq_jax.sampling.conditioning import apply_model, precompute

# The keep-float defaults before weight-only layers and convolutions were quantized: recipes
# stored with them (calibrations, checkpoints) are not asked to match every one.
_PREVIOUS_KEEP_FLOAT = (r"(^|/)(x|t|y)_embedder(/|$)", r"adaLN_modulation",
                        r"(^|/)final_layer(/|$)", r"(^|/)emb_proj$", r"(^|/)conv_(in|out)$")

__all__ = ["QuantizedDenoiser", "Selection", "calibrated_selection", "float_bytes_of",
           "quantize", "quantize_layer", "quantized_layer_paths", "select_layers", "weight_bytes"]


# ----------------------------------------------------------------------------- layer selection


class Selection(NamedTuple):
    """Which calibrated layers a recipe quantizes.

    quantized: module paths of the layers that become ``QLinear`` (weight-only ones included),
      in model order. weight_only: those of them quantized weight-only. keep_float: report
      ``{regex, or the structural reason: [paths]}`` of the layers left in float.
    """

    quantized: list[str]
    weight_only: list[str]
    keep_float: dict[str, list[str]]


def select_layers(paths: list[str], recipe: Recipe, roles: dict | None = None) -> Selection:
    """Split calibrated Dense / Conv ``paths`` by ``recipe``: its regexes where it gives them,
    else the structural ``roles`` (``trdq_jax.quant.roles.layer_roles``: input and output
    layers stay float, conditioning layers are weight-only). Every regex the recipe adds to
    the bundled models' defaults must match a layer (``ValueError`` naming it)."""
    def needs_roles(field):
        if roles is None:
            raise ValueError(f"roles: recipe.{field} is None (layers chosen by the data flow), "
                             "so the structural roles are needed (trdq_jax.quant.roles."
                             "layer_roles; a calibration made before they existed has none: "
                             "calibrate again, or give the recipe regexes)")
        return roles

    if recipe.keep_float is None:
        found = needs_roles("keep_float")
        kept = {REASONS[r]: [p for p in paths if p in found[r]] for r in ("input", "output")}
    else:
        user = [p for p in recipe.keep_float if p not in DEFAULT_KEEP_FLOAT + _PREVIOUS_KEEP_FLOAT]
        kept = {pat: [p for p in paths if re.search(pat, p)] for pat in recipe.keep_float}
        dead = [pat for pat in user if not kept[pat]]
        if dead:
            raise ValueError(f"recipe.keep_float: regex(es) {dead} match no layer; layers: "
                             f"{paths}")
    kept = {k: v for k, v in kept.items() if v}
    left = {p for ps in kept.values() for p in ps}
    quantized = [p for p in paths if p not in left]
    if not quantized:
        raise ValueError("recipe.keep_float: every layer is kept in float; nothing to quantize")
    if recipe.weight_only is None:
        conditioning = needs_roles("weight_only")["conditioning"]
        weight_only = [p for p in quantized if p in conditioning]
    else:
        dead = [pat for pat in recipe.weight_only if pat not in DEFAULT_WEIGHT_ONLY
                and not any(re.search(pat, p) for p in paths)]
        if dead:
            raise ValueError(f"recipe.weight_only: regex(es) {dead} match no layer; layers: "
                             f"{paths}")
        weight_only = [p for p in quantized if recipe.is_weight_only(p)]
    return Selection(quantized, weight_only, kept)


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


def calibrated_selection(calib, recipe: Recipe) -> Selection:
    """``select_layers`` over every layer ``calib`` saw (with statistics or kept in float) and
    its structural roles, so a recipe's own choice, already applied by ``calibrate``, is made
    again; the layers ``recipe`` quantizes must all have statistics (ValueError naming the
    missing ones)."""
    paths = list(calib.stats) + [p for ps in calib.keep_float.values() for p in ps
                                 if p not in calib.stats]
    selection = select_layers(paths, recipe, calib.roles)
    missing = [p for p in selection.quantized if p not in calib.stats]
    if missing:
        raise ValueError(f"calib: layers {missing} have no statistics; calibrate with a recipe "
                         f"that quantizes them")
    return selection


# ----------------------------------------------------------------------------- whole model


def check_layer_shapes(params, selection, recipe: Recipe) -> None:
    """ValueError naming the first layer of ``selection`` (``calibrated_selection``) whose
    kernel cannot take ``recipe``'s weight / activation groups or low-rank branch."""
    from trdq_jax.quant.lowrank import check_rank
    for path in selection.quantized:
        if path not in selection.weight_only:
            kernel = np.shape(_get(params, path)["kernel"])
            check_groups(recipe, kernel, path)
            if recipe.low_rank:
                check_rank(recipe.low_rank, int(np.prod(kernel[:-1])), kernel[-1], path)


def quantize(params, calib, recipe: Recipe, *, progress: bool = False) -> dict:
    """Pure transform: float params + calibration -> ``{"float": ..., "layers": ...}``.

    ``calib``: a ``Calibration`` (``trdq_jax.quant.calibrate``) whose ``num_segments`` and
    ``segment_of_step`` were made for this recipe.
    """
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe: expected a Recipe, got {type(recipe).__name__}")
    if calib.num_segments != recipe.num_segments:
        raise ValueError(f"calib: calibrated for {calib.num_segments} segments, recipe wants "
                         f"{recipe.num_segments}; derive its calibration from these statistics "
                         "(trdq_jax.quant.calibrate.derive_calibration(calib, recipe, sampler)) "
                         "or calibrate with this recipe")
    selection = calibrated_selection(calib, recipe)
    check_layer_shapes(params, selection, recipe)  # before any layer is fitted
    layers: dict = {}
    items = selection.quantized
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc=f"quantize {recipe.name}", unit="layer")
    for path in items:
        dense = _get(params, path)
        q = quantize_layer(dense["kernel"], dense.get("bias"), calib.stats[path],
                           np.asarray(calib.segment_of_step), calib.num_segments, recipe, path,
                           weight_only=path in selection.weight_only)
        _set(layers, path, q)
    return {"float": _without(params, selection.quantized), "layers": layers}


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
    """Bytes the given layers' params take as ``dtype`` floats (the reference for ratios)."""
    itemsize = jnp.dtype(dtype).itemsize
    return int(sum(leaf.size * itemsize for p in paths for leaf in jax.tree.leaves(_get(params, p))))


@dataclasses.dataclass(frozen=True, eq=True)
class QuantizedDenoiser:
    """Sampler ``apply_fn`` running ``model`` with quantized layers (hashable: jit cache key).
    Every ``Dense`` and ``Conv`` whose module path holds a ``QLinear`` runs quantized (a conv
    takes its strides and padding from the module).

    precompute_cond: run the model's ``precompute_cond`` (PixArt: caption projection and
      cross-attention K/V) once per batch before the step loop, when every quantized layer it
      uses is the same in every time segment (``segment_invariant``: the default weight-only
      quantization of conditioning-only layers); otherwise, or with False, at every step."""

    model: Any
    backend: str = "xla"
    precompute_cond: bool = True

    def _interceptor(self, layers, segment, touched: list | None = None):
        """Flax method interceptor running the ``QLinear`` of each quantized layer; appends
        every ``QLinear`` it runs to ``touched`` when given."""
        backend = self.backend

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            method = context.method_name
            if isinstance(module, (nn.Dense, nn.Conv)) and method in ("__call__", "value"):
                node = layers
                for name in module.path:
                    node = node.get(name) if isinstance(node, dict) else None
                    if node is None:
                        break
                if isinstance(node, QLinear):
                    if touched is not None:
                        touched.append(node)
                    x = args[0]
                    if isinstance(module, nn.Conv):
                        strides, pads = module_geometry(module, x.shape)
                        out = qconv_apply(node, x, segment, backend, strides=strides,
                                          padding=pads)
                    else:
                        if method == "value":  # FusedQKV's value columns (CFG sharing)
                            dim = module.features // 3
                            node = output_columns(node, 2 * dim, 3 * dim)
                        out = qlinear_apply(node, x, segment, backend)
                    return out.astype(module.dtype or jnp.float32)
            return next_fun(*args, **kwargs)
        return interceptor

    def __call__(self, qparams, x, t, y, segment, share_cfg):
        with nn.intercept_methods(self._interceptor(qparams["layers"], segment)):
            return apply_model(self.model, {"params": qparams["float"]}, x, t, y, share_cfg)

    def prepare_cond(self, qparams, cond):
        """``conditioning.precompute`` with the quantized layers, when allowed (see the class
        docstring); else ``cond`` unchanged."""
        if not self.precompute_cond:
            return cond
        touched: list = []

        def run(layers):
            with nn.intercept_methods(self._interceptor(layers, 0, touched)):
                return precompute(self.model, {"params": qparams["float"]}, cond)
        jax.eval_shape(run, qparams["layers"])  # which quantized layers it runs (trace only)
        if not all(segment_invariant(q) for q in touched):
            return cond
        return run(qparams["layers"])
