"""Saving and restoring quantized models (no float weights needed to restore).

The arrays go through ``trdq_jax.checkpoint`` (orbax, int8 exact, kind ``"quantized"``); the
static fields of every ``QLinear`` (bits, modes, rotation kind), the recipe and the step ->
segment table go into the JSON metadata, digested by the checkpoint's manifest. Restoring
rebuilds the exact pytree and checks it (``trdq_jax.quant.verify``): metadata against arrays,
segment table against the sampler, layers against the model config.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax import checkpoint
from trdq_jax.config import ConfigError, ExperimentConfig, apply_overrides, override_label
from trdq_jax.quant.qlinear import BACKENDS, QLinear
from trdq_jax.quant.recipe import Recipe
from trdq_jax.quant.transform import QuantizedDenoiser, quantized_layer_paths
from trdq_jax.quant.verify import QuantizedModelError, check_quantized

_STATIC = ("in_features", "w_bits", "a_bits", "a_mode", "a_symmetric", "rotation", "rotation_block",
           "kernel_size", "fp8", "w_group_size", "a_group_size")
_ARRAYS = tuple(f.name for f in dataclasses.fields(QLinear) if f.name not in _STATIC)
_FREE_SAMPLER_FIELDS = ("sampler.cfg_scale",)


def _layer(qparams, path):
    node = qparams["layers"]
    for name in path.split("/"):
        node = node[name]
    return node


def recipe_from_dict(d: dict) -> Recipe:
    """Inverse of ``dataclasses.asdict(recipe)`` (lists back to tuples); ConfigError if bad."""
    if not isinstance(d, dict):
        raise ConfigError(f"recipe: expected a dict of Recipe fields, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"recipe: unknown field(s) {unknown}")
    try:
        return Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    except TypeError as e:
        raise ConfigError(f"recipe: {e}") from None


def save_quantized(path: str | os.PathLike, qparams, cfg, recipe: Recipe, segment_of_step,
                   *, weight_only=None, cfg_plan=None, vae=None, conditioning=None,
                   overwrite: bool = False, arg: str = "path") -> pathlib.Path:
    """Write a quantized model: arrays via orbax, static layer fields/recipe/segments as JSON.
    The model is checked first (``check_quantized``), so an inconsistent one is never written.
    ``weight_only``: the paths quantized weight-only (``Calibration.weight_only``; None: the
    layers whose fields say so, see ``weight_only_layers``). ``cfg_plan``: an optional
    ``CFGPlan`` stored with it (``stored_cfg_plan`` restores it), checked against the model and
    the sampler's step count. ``vae``: ``(VAEConfig, params)`` of a latent model, stored float
    beside the quantized denoiser (``trdq_jax.checkpoint.restore_vae``). ``conditioning``:
    JSON describing what it was calibrated on (a text model: ``{"null_branch": ...,
    "prompts": [...]}``), stored as ``extra["calibration_conditioning"]``
    (``stored_conditioning``)."""
    weight_only = sorted(weight_only_layers(qparams, recipe) if weight_only is None
                         else weight_only)
    check_quantized(qparams, recipe, segment_of_step, cfg, "qparams", weight_only)
    if cfg_plan is not None:
        _check_plan(cfg_plan, cfg, len(np.asarray(segment_of_step)), "cfg_plan")
    layers = {p: {f: getattr(_layer(qparams, p), f) for f in _STATIC}
              for p in quantized_layer_paths(qparams)}
    tree = {"float": qparams["float"], "layers": {}}
    for p in layers:
        q = _layer(qparams, p)
        node = tree["layers"]
        for name in p.split("/")[:-1]:
            node = node.setdefault(name, {})
        node[p.split("/")[-1]] = {f: getattr(q, f) for f in _ARRAYS if getattr(q, f) is not None}
    extra = {"recipe": dataclasses.asdict(recipe), "layers": layers, "weight_only": weight_only,
             "segment_of_step": [int(v) for v in np.asarray(segment_of_step)]}
    if cfg_plan is not None:
        extra["cfg_plan"] = cfg_plan.to_json()
    if conditioning is not None:
        extra["calibration_conditioning"] = json.loads(json.dumps(conditioning))
    return checkpoint.save(path, tree, cfg, kind="quantized", extra=extra, vae=vae,
                           overwrite=overwrite, arg=arg)


def weight_only_layers(qparams, recipe: Recipe) -> list[str]:
    """The layers of ``qparams`` quantized weight-only: float activations and no rotation where
    ``recipe`` itself would quantize or rotate the activations."""
    from trdq_jax.quant.fit import weight_only_recipe
    alone = weight_only_recipe(recipe)
    fields = ("a_bits", "rotation")
    found = []
    for path in quantized_layer_paths(qparams):
        q = _layer(qparams, path)
        if all(getattr(q, f) == getattr(alone, f) for f in fields) and any(
                getattr(recipe, f) != getattr(alone, f) for f in fields):
            found.append(path)
    return found


def load_quantized(path: str | os.PathLike, cfg=None):
    """``(qparams, stored_cfg, recipe, segment_of_step)`` from a ``save_quantized`` directory.

    Raises ``CheckpointError`` for a missing, corrupt, edited or inconsistent directory (the
    message names the field) and for a float checkpoint.
    """
    meta = checkpoint.read_metadata(path, kind="quantized")
    tree, stored = checkpoint.restore(path, cfg)
    try:
        extra = meta["extra"]
        layers: dict = {}
        for p, static in extra["layers"].items():
            node = tree["layers"]
            for name in p.split("/"):
                node = node[name]
            arrays = {f: jnp.asarray(v) for f, v in node.items()}
            target = layers
            for name in p.split("/")[:-1]:
                target = target.setdefault(name, {})
            static = dict(static)
            if "kernel_size" in static:  # JSON list -> the hashable tuple of a static field
                if not isinstance(static["kernel_size"], list) or not all(
                        isinstance(v, int) and not isinstance(v, bool) and v > 0
                        for v in static["kernel_size"]):
                    raise ConfigError(f"layer {p}.kernel_size: expected a list of positive "
                                      f"ints, got {static['kernel_size']!r}")
                static["kernel_size"] = tuple(static["kernel_size"])
            target[p.split("/")[-1]] = QLinear(**arrays, **static)
        recipe = recipe_from_dict(extra["recipe"])
        qparams = {"float": jax.tree.map(jnp.asarray, tree.get("float", {})), "layers": layers}
        weight_only = extra.get("weight_only")  # absent: saved before, the regexes name them
        if weight_only is not None and (not isinstance(weight_only, list) or not all(
                isinstance(p, str) for p in weight_only)):
            raise ConfigError(f"weight_only: expected a list of layer paths, got {weight_only!r}")
        table = check_quantized(qparams, recipe, extra["segment_of_step"], stored,
                                str(path), weight_only)
    except (KeyError, TypeError, ConfigError, QuantizedModelError) as e:
        message = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise checkpoint.CheckpointError(f"{str(path)!r}: inconsistent quantized checkpoint: "
                                         f"{message}") from None
    return qparams, stored, recipe, table


def _check_plan(plan, cfg, num_steps: int, where: str) -> None:
    from trdq_jax.sampling.cfg_plan import CFGPlan, attention_layers, model_fingerprint
    if not isinstance(plan, CFGPlan):
        raise ValueError(f"{where}: expected a CFGPlan, got {type(plan).__name__}")
    model_cfg = cfg.model if isinstance(cfg, ExperimentConfig) else cfg
    plan.check(model=model_fingerprint(model_cfg), layers=attention_layers(model_cfg),
               num_steps=num_steps)


def stored_cfg_plan(path: str | os.PathLike):
    """The ``CFGPlan`` saved with a quantized checkpoint (``save_quantized(cfg_plan=...)``),
    or None; ``CheckpointError`` naming the field when it is malformed or does not fit."""
    meta = checkpoint.read_metadata(path, kind="quantized")
    data = meta.get("extra", {}).get("cfg_plan")
    if data is None:
        return None
    from trdq_jax.sampling.cfg_plan import CFGPlan
    try:
        plan = CFGPlan.from_json(data)
        _check_plan(plan, checkpoint.stored_config(meta), len(meta["extra"]["segment_of_step"]),
                    "cfg_plan")
    except ValueError as e:
        raise checkpoint.CheckpointError(f"{str(path)!r}: stored {e}") from None
    return plan


def load_quantized_model(qdir: str | os.PathLike, backend: str = "xla", overrides=(),
                         arg: str = "overrides"):
    """``(model, qparams, cfg, source, sampler, apply_fn)`` of a ``save_quantized`` directory.

    Restored without the float weights; the sampler uses the stored step -> segment table.
    ``overrides`` (``section.field=value``) may change ``sampler.cfg_scale`` and
    ``generation.*`` only: everything else of the sampler shaped the calibrated trajectory.
    Errors about them name ``arg`` (the command line passes ``--set``).
    """
    from trdq_jax.models.factory import build_model
    from trdq_jax.sampling.solvers import Sampler
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    qparams, cfg, recipe, table = load_quantized(qdir)
    if not isinstance(cfg, ExperimentConfig):
        cfg = ExperimentConfig(name=pathlib.Path(qdir).name, model=cfg)
    overrides = list(overrides)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not (key in _FREE_SAMPLER_FIELDS or key.startswith("generation.")):
            raise ValueError(f"{override_label(arg, key)}: fixed by the quantized checkpoint "
                             "(its scales and segment table were calibrated on that sampling "
                             "trajectory); only "
                             f"{', '.join(_FREE_SAMPLER_FIELDS)} and generation.* may change")
    cfg = apply_overrides(cfg, overrides, arg)
    sampler = Sampler.from_config(cfg.sampler).with_segments(table, recipe.num_segments)
    model = build_model(cfg.model)
    source = f"{qdir} ({recipe.name} W{recipe.w_bits}A{recipe.a_bits}, {backend})"
    return model, qparams, cfg, source, sampler, QuantizedDenoiser(model, backend)


def stored_conditioning(path) -> dict | None:
    """What a quantized checkpoint was calibrated on (``save_quantized(conditioning=...)``):
    for a text model ``{"null_branch": "empty_prompt" | "learned", "prompts": [...]}``; None
    when it recorded nothing (class-label models)."""
    meta = checkpoint.read_metadata(path, kind="quantized")
    return meta.get("extra", {}).get("calibration_conditioning")
