"""Where CFG Attention-Sharing is safe: cond vs uncond attention, per layer and sampling step.

``analyze_cfg`` samples a few labels without sharing, then replays every step of that trajectory
and measures, for every attention layer ``j`` and step ``s`` (cond half c, uncond half u of the
``[cond; uncond]`` batch; ``P`` the softmax probabilities ``[B, H, Lq, Lk]``, ``V`` the values):

* ``prob_similarity``: ``1 - mean_{b,h,q} TV(P_c, P_u)``, total variation
  ``TV = 0.5 sum_k |P_c - P_u|``: 1 = identical attention;
* ``share_error``: ``||(P_c - P_u) V_u|| / ||P_u V_u||`` (Frobenius, over the layer's batch):
  the relative change of the uncond attention output that sharing makes at this layer alone;
* ``output_cosine``: mean over tokens of the cosine between the cond and uncond outputs of the
  attention module (after ``proj``): how alike the two branches are at that point.

Each is a float64 table ``[num_steps, num_layers]`` in sampling order (step 0 = noisiest);
``plan_from_analysis`` in ``trdq_jax.sampling.cfg_plan`` turns a table into a plan.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

METRICS = ("prob_similarity", "share_error", "output_cosine")
_COLLECTION = "cfg_analysis"


def _qkv_metrics(qkv: jax.Array, num_heads: int) -> dict:
    """Metrics of one attention from its fused ``qkv`` output ``[2B, L, 3D]`` (float32)."""
    n, length, three_d = qkv.shape
    dim = three_d // 3
    qkv = qkv.astype(jnp.float32).reshape(n, length, 3, num_heads, dim // num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scale = 1.0 / np.sqrt(dim // num_heads)
    probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, axis=-1)
    half = n // 2
    p_c, p_u, v_u = probs[:half], probs[half:], v[half:]
    tv = 0.5 * jnp.sum(jnp.abs(p_c - p_u), axis=-1)
    change = jnp.einsum("bhqk,bkhd->bqhd", p_c - p_u, v_u)
    exact = jnp.einsum("bhqk,bkhd->bqhd", p_u, v_u)
    return {"prob_similarity": 1.0 - jnp.mean(tv),
            "share_error": jnp.linalg.norm(change) / jnp.maximum(jnp.linalg.norm(exact), 1e-30)}


def _output_cosine(out: jax.Array) -> jax.Array:
    half = out.shape[0] // 2
    c, u = out[:half].astype(jnp.float32), out[half:].astype(jnp.float32)
    dot = jnp.sum(c * u, axis=-1)
    norms = jnp.linalg.norm(c, axis=-1) * jnp.linalg.norm(u, axis=-1)
    return jnp.mean(dot / jnp.maximum(norms, 1e-30))


@functools.partial(jax.jit, static_argnames=("model",))
def _step_metrics(model, params, x, t, y):
    """One unshared CFG forward of ``[x; x]`` at model time ``t`` (scalar) with labels ``y``
    ``[2N]``: ``{attention path: {metric: scalar}}``."""
    from trdq_jax.models.layers import Attention, FusedQKV
    x = jnp.concatenate([x, x])
    t = jnp.full((x.shape[0],), t, jnp.float32)

    def record(next_fn, args, kwargs, context):
        out = next_fn(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__":
            return out
        if isinstance(module, FusedQKV) and isinstance(module.parent, Attention):
            for name, value in _qkv_metrics(out, module.parent.num_heads).items():
                module.parent.sow(_COLLECTION, name, value)
        elif isinstance(module, Attention):
            module.sow(_COLLECTION, "output_cosine", _output_cosine(out))
        return out

    with nn.intercept_methods(record):
        _, state = model.apply({"params": params}, x, t, y, mutable=[_COLLECTION])
    grouped: dict[str, dict] = {}
    for key, values in traverse_util.flatten_dict(state[_COLLECTION]).items():
        # a module called more than once per forward: the mean over its calls
        grouped.setdefault("/".join(key[:-1]), {})[key[-1]] = jnp.mean(jnp.stack(values))
    return grouped


def analyze_cfg(model, params, model_cfg, sampler, labels=None, *, seed: int, cfg_scale: float,
                null_label: int | None = None, cond=None, null_cond=None,
                progress: bool = False) -> dict:
    """Cond vs uncond attention of every layer at every step of an unshared sampling run.

    labels: ints ``[N]`` (the calibration samples) with their ``null_label``; or ``cond`` and
    ``null_cond``, any conditioning pytree (e.g. caption embeddings: a text model's
    self-attentions are analysed; its cross-attentions attend each branch's own caption and
    are never shared). The run is ``sample(denoise_fn_for(model), ...,
    return_trajectory=True)`` with ``seed`` and ``cfg_scale``. Returns a JSON-able dict:
    ``layers`` (attention paths, model order), ``num_steps``, ``model_time`` ``[steps]``,
    ``labels`` (or ``conditioning``: a description), ``seed``, ``cfg_scale``, and one
    ``[steps][layers]`` list per ``METRICS`` entry.
    """
    from trdq_jax.models import input_shape
    from trdq_jax.sampling import conditioning, denoise_fn_for, sample
    from trdq_jax.sampling.cfg_plan import attention_layers, model_fingerprint

    if cond is None:
        labels = np.asarray(labels, np.int32)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"labels: expected a non-empty 1-D int array, got shape "
                             f"{labels.shape}")
        cond, nulls = labels, {"null_label": null_label}
        y = jnp.concatenate([jnp.asarray(labels), jnp.full(labels.shape, null_label,
                                                           jnp.int32)])
        what = {"labels": labels.tolist()}
    else:
        if labels is not None:
            raise ValueError("labels: give labels and null_label, or cond and null_cond")
        cond = conditioning.check_cond(cond)
        null_cond = conditioning.check_null(null_cond, cond)
        nulls, y = {"null_cond": null_cond}, conditioning.with_null(cond, null_cond)
        what = {"conditioning": conditioning.describe(cond)}
    layers = attention_layers(model_cfg)
    _, xs = sample(denoise_fn_for(model), params, sampler, cond, seed=seed,
                   cfg_scale=cfg_scale, **nulls,
                   shape=input_shape(model_cfg, conditioning.batch_size(cond)),
                   return_trajectory=True)
    tables = {m: np.zeros((sampler.num_steps, len(layers))) for m in METRICS}
    steps = range(sampler.num_steps)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="cfg analysis", unit="step")
    model_time = np.asarray(sampler.model_time, np.float64)
    for s in steps:
        got = _step_metrics(model, params, xs[s], jnp.float32(model_time[s]), y)
        for j, path in enumerate(layers):
            for m in METRICS:
                tables[m][s, j] = float(got[path][m])
    return {"kind": "trdq-cfg-analysis", "model": model_fingerprint(model_cfg),
            "layers": list(layers), "num_steps": int(sampler.num_steps),
            "model_time": model_time.tolist(), **what, "seed": int(seed),
            "cfg_scale": float(cfg_scale), **{m: tables[m].tolist() for m in METRICS}}


def layer_groups(layers) -> dict[str, list[int]]:
    """Heat-map panels: ``{"spatial": [...], "temporal": [...]}`` column indices for a video
    DiT, ``{"attention": all}`` otherwise."""
    temporal = [j for j, p in enumerate(layers) if p.startswith("temporal_")]
    if not temporal:
        return {"attention": list(range(len(layers)))}
    return {"spatial": [j for j in range(len(layers)) if j not in temporal],
            "temporal": temporal}


def cfg_heatmap_figure(analysis: dict, *, title: str):
    """The ``matplotlib.figure.Figure`` that ``save_cfg_heatmap`` writes (see there)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers = analysis["layers"]
    groups = layer_groups(layers)
    sim = np.asarray(analysis["prob_similarity"])
    err = np.log10(np.maximum(np.asarray(analysis["share_error"]), 1e-6))
    height = max(2.4, 0.22 * max(len(v) for v in groups.values()) + 1.4)
    fig = Figure(figsize=(12, height * len(groups) + 0.6), layout="constrained")
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for row, (group, cols) in enumerate(groups.items()):
        for col, (table, label, cmap) in enumerate((
                (sim, "similarity 1 - TV(P_cond, P_uncond)", "viridis"),
                (err, "log10 sharing error ||(P_c - P_u) V_u|| / ||P_u V_u||", "magma"))):
            ax = axes[row][col]
            image = ax.imshow(table[:, cols].T, aspect="auto", cmap=cmap, interpolation="nearest")
            fig.colorbar(image, ax=ax, shrink=0.9)
            ax.set_yticks(range(len(cols)))
            ax.set_yticklabels([layers[j].removesuffix("/attn") for j in cols], fontsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
            ax.set_xlabel("sampling step (0 = pure noise)", fontsize=9)
            # "attention: similarity ...", "spatial attention: ..." (no word said twice)
            where = group if group == "attention" else f"{group} attention"
            ax.set_title(f"{where}: {label}", fontsize=9)
    fig.suptitle(title, fontsize=11)
    return fig


def save_cfg_heatmap(path, analysis: dict, *, title: str, overwrite: bool = False) -> tuple:
    """Heat maps (layers x sampling steps) of ``prob_similarity`` and ``share_error``
    (log10), one row of panels per layer group (spatial / temporal for a video DiT). Written
    atomically as a marked PNG (``files.write_file``). Returns the PNG's (width, height)."""
    import pathlib

    from PIL import Image

    from trdq_jax import files

    if pathlib.Path(path).suffix.lower() != ".png":
        raise ValueError(f"path: expected a .png file, got {str(path)!r}")
    fig = cfg_heatmap_figure(analysis, title=title)
    target = files.write_file(
        path, lambda tmp: fig.savefig(tmp, format="png", dpi=100,
                                      metadata=files.png_marker("figure")),
        kind="figure", overwrite=overwrite, arg="path")
    with Image.open(target) as image:
        return image.size


ANALYSIS_FORMAT = "trdq_jax.cfg_analysis/1"
ANALYSIS_FILE, HEATMAP_FILE, PLANS_DIR = "analysis.json", "heatmap.png", "plans"


def save_cfg_analysis(path, analysis: dict, plans: dict, *, title: str, info: dict | None = None,
                      overwrite: bool = False, arg: str = "path"):
    """Write an analysis directory as one unit (``files.write_dir``, kind ``cfg_analysis``)::

        DIR/analysis.json    the tables of ``analyze_cfg``
        DIR/heatmap.png      ``save_cfg_heatmap``
        DIR/plans/NAME.json  every plan of ``plans`` ({name: CFGPlan}), for --cfg-plan
        DIR/metadata.json    format, kind, info, and per plan: shared cells, phases
    """
    import pathlib

    from trdq_jax import files

    for name in plans:
        if not name or not all(c.isalnum() or c in "._+-" for c in name):
            raise ValueError(f"plans: plan names become file names, got {name!r}")
    summary = {name: {"shared_cells": plan.shared_cells(),
                      "cells": plan.num_steps * len(plan.layers),
                      "uncond_full_steps": sum(m == "full" for m in plan.uncond),
                      "phases": len(plan.phases())} for name, plan in plans.items()}
    meta = {"format": ANALYSIS_FORMAT, "kind": "cfg_analysis", "model": analysis["model"],
            "num_steps": analysis["num_steps"], "plans": summary, **(info or {})}

    def write(tmp: pathlib.Path) -> None:
        files.write_json(tmp / ANALYSIS_FILE, analysis)
        save_cfg_heatmap(tmp / HEATMAP_FILE, analysis, title=title)
        (tmp / PLANS_DIR).mkdir()
        for name, plan in plans.items():
            (tmp / PLANS_DIR / f"{name}.json").write_text(plan.dumps())
        files.write_json(tmp / files.METADATA_FILE, meta)

    return files.write_dir(path, write, kind="cfg_analysis", overwrite=overwrite, arg=arg)
