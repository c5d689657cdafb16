"""CFG sharing plans: which attention layers share at which sampling steps, and what the
unconditional branch does at each step.

A plan is data (``CFGPlan``), saved as JSON beside a quantized checkpoint or anywhere else:

* ``share[s][j]``: at sampling step ``s`` (0 = the first, noisiest step) attention layer
  ``layers[j]`` of the uncond half reuses the cond half's attention probabilities
  (``P_cond V_uncond``; the uncond half computes only its values, no queries or keys);
* ``uncond[s]``: ``"full"`` (the uncond branch runs, batched with the cond one), ``"cached"``
  (it does not run: its output is the cond output minus the guidance difference
  ``cond_eps - uncond_eps`` of the last ``"full"`` step, a CFG cache), or ``"none"`` (it does
  not run and guidance is off at that step: ``guided = cond_eps``, adaptive guidance).

The sampler runs a plan as ``phases()``: maximal runs of steps with the same shared layers and
uncond mode, one ``lax.scan`` each inside the same jitted program. A plan with P phases
compiles P scan bodies, once; nothing recompiles per step, and a step that shares really skips
the work (the layer is a different computation in that phase's body).

Plans come from presets (``preset_plan``: ``none``, ``all``, ``trdq_release`` = the released
TR-DQ code's choice, spatial self-attention of the first 8 and last 6 of 28 blocks at every
step), explicit rules (``rules_plan``), or measurements (``plan_from_analysis``: a threshold
or a compute budget over ``trdq_jax.eval.cfg_analysis`` tables).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, NamedTuple, Sequence

import numpy as np

UNCOND_MODES = ("full", "cached", "none")
PRESETS = ("none", "all", "trdq_release")
PLAN_FORMAT = "trdq_jax.cfg_plan/1"
PLAN_KIND = "cfg_plan"


class Step(NamedTuple):
    """What one sampling step runs: ``share`` the denoiser's ``share_cfg`` (a bool, or the
    frozenset of attention paths that share), ``uncond`` the uncond mode."""

    share: frozenset
    uncond: str


class Phase(NamedTuple):
    """Steps ``[start, stop)`` that run one scan body: the steps repeat ``pattern`` (a tuple of
    ``Step``; ``(stop - start)`` is a multiple of its length), one pattern per scan iteration
    (e.g. ``(full, cached)`` for a CFG cache refreshed every other step)."""

    start: int
    stop: int
    pattern: tuple


MAX_PERIOD = 4  # longest repeating pattern that ``phases`` folds into one scan body


def _fail(field: str, expected: str, got) -> None:
    raise ValueError(f"cfg plan {field}: expected {expected}, got {got!r}")


@dataclasses.dataclass(frozen=True)
class CFGPlan:
    """A sharing plan for one model and one step count (see the module docstring).

    layers: every attention module path of the model (``"blocks_3/attn"``), model order;
      empty for a model without attention (a plan of uncond modes only).
    share: ``num_steps`` tuples of ``len(layers)`` bools.
    uncond: ``num_steps`` modes of ``UNCOND_MODES``; the first step must be ``"full"`` when any
      step is ``"cached"`` (there is nothing to reuse before it).
    model: ``model_fingerprint(config)`` of the model it was made for ("" = not checked).
    name: a label for tables and file names; ``meta``: how it was made (JSON-able dict).
    """

    layers: tuple
    share: tuple
    uncond: tuple
    model: str = ""
    name: str = "custom"
    meta: Any = None

    def __post_init__(self):
        if not isinstance(self.layers, tuple) or not all(
                isinstance(p, str) and p for p in self.layers):
            _fail("layers", "a tuple of attention module paths", self.layers)
        if len(set(self.layers)) != len(self.layers):
            _fail("layers", "distinct paths", self.layers)
        if not isinstance(self.share, tuple) or not self.share:
            _fail("share", "a non-empty tuple of per-step tuples of bools", self.share)
        for s, row in enumerate(self.share):
            if not isinstance(row, tuple) or len(row) != len(self.layers) or not all(
                    isinstance(v, bool) for v in row):
                _fail(f"share[{s}]", f"a tuple of {len(self.layers)} bools (one per layer)", row)
        if not isinstance(self.uncond, tuple) or len(self.uncond) != len(self.share):
            _fail("uncond", f"a tuple of {len(self.share)} modes (one per step)", self.uncond)
        for s, mode in enumerate(self.uncond):
            if mode not in UNCOND_MODES:
                _fail(f"uncond[{s}]", f"one of {UNCOND_MODES}", mode)
        if "cached" in self.uncond and self.uncond[0] != "full":
            _fail("uncond[0]", "'full' (a 'cached' step reuses the last full step)",
                  self.uncond[0])
        for s, mode in enumerate(self.uncond):
            if mode != "full" and any(self.share[s]):
                _fail(f"share[{s}]", f"no sharing at a step whose uncond branch is {mode!r} "
                      "(there is no uncond half to share with)", self.share[s])
        if not isinstance(self.model, str) or not isinstance(self.name, str):
            _fail("model/name", "strings", (self.model, self.name))

    @property
    def num_steps(self) -> int:
        return len(self.share)

    def steps(self) -> tuple[Step, ...]:
        """Per step: the ``share_cfg`` the denoiser gets (False: no layer shares, True: every
        layer, else the frozenset of sharing paths) and the uncond mode."""
        def share(row):
            if not any(row) or all(row):
                return any(row)  # an empty row (no attention) shares nothing
            return frozenset(p for p, v in zip(self.layers, row) if v)
        return tuple(Step(share(row), mode) for row, mode in zip(self.share, self.uncond))

    def phases(self) -> tuple[Phase, ...]:
        """The plan as scan bodies: from each step on, the repeating pattern (period 1 to
        ``MAX_PERIOD``, at least two repeats when longer than 1) that covers the most steps,
        greedily. A constant plan is one phase; "full, cached" alternating is one phase too."""
        steps = self.steps()
        out: list[Phase] = []
        s = 0
        while s < len(steps):
            best = (1, 1)  # (period, repeats)
            for period in range(1, MAX_PERIOD + 1):
                pattern = steps[s:s + period]
                if len(pattern) < period:
                    break
                repeats = 1
                while steps[s + repeats * period:s + (repeats + 1) * period] == pattern:
                    repeats += 1
                if (period == 1 or repeats >= 2) and period * repeats > best[0] * best[1]:
                    best = (period, repeats)
            period, repeats = best
            out.append(Phase(s, s + period * repeats, steps[s:s + period]))
            s += period * repeats
        return tuple(out)

    def shared_cells(self) -> int:
        """(layer, step) pairs that share."""
        return int(sum(sum(row) for row in self.share))

    def check(self, *, layers: Sequence[str] | None = None, num_steps: int | None = None,
              model: str | None = None) -> None:
        """ValueError naming the field when the plan was made for another model (its
        fingerprint or attention layers differ) or another step count."""
        if model and self.model and model != self.model:
            raise ValueError(f"cfg plan model: made for model {self.model}, used with {model} "
                             "(make a plan for this model: trdq cfg-analysis / preset_plan)")
        if layers is not None and tuple(layers) != self.layers:
            unknown = sorted(set(self.layers) - set(layers))
            missing = sorted(set(layers) - set(self.layers))
            raise ValueError(f"cfg plan layers: expected this model's attention layers; unknown "
                             f"{unknown[:6]}, missing {missing[:6]} (of {len(layers)})")
        if num_steps is not None and num_steps != self.num_steps:
            raise ValueError(f"cfg plan num_steps: made for {self.num_steps} sampling steps, the "
                             f"sampler has {num_steps}")

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict:
        """A JSON-able dict; ``from_json`` restores it exactly. ``share`` is stored as one
        0/1 string per step (``"0110"``: layer j is character j)."""
        return {"kind": PLAN_KIND, "format": PLAN_FORMAT, "name": self.name, "model": self.model,
                "layers": list(self.layers), "num_steps": self.num_steps,
                "share": ["".join("1" if v else "0" for v in row) for row in self.share],
                "uncond": list(self.uncond), "meta": self.meta}

    @classmethod
    def from_json(cls, data: Any) -> "CFGPlan":
        """Inverse of ``to_json``; ValueError naming the field on anything malformed."""
        if not isinstance(data, dict):
            _fail("file", "a JSON object", type(data).__name__)
        if data.get("kind") != PLAN_KIND:
            _fail("kind", repr(PLAN_KIND), data.get("kind"))
        if data.get("format") != PLAN_FORMAT:
            _fail("format", repr(PLAN_FORMAT), data.get("format"))
        layers, num_steps = data.get("layers"), data.get("num_steps")
        if not isinstance(layers, list):
            _fail("layers", "a list of attention module paths", layers)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            _fail("num_steps", "a positive int", num_steps)
        rows = data.get("share")
        if not isinstance(rows, list) or len(rows) != num_steps:
            _fail("share", f"a list of {num_steps} strings of 0/1 (one per step)", rows)
        share = []
        for s, row in enumerate(rows):
            if not isinstance(row, str) or len(row) != len(layers) or set(row) - {"0", "1"}:
                _fail(f"share[{s}]", f"a string of {len(layers)} characters 0/1", row)
            share.append(tuple(c == "1" for c in row))
        uncond = data.get("uncond")
        if not isinstance(uncond, list):
            _fail("uncond", f"a list of {num_steps} modes", uncond)
        return cls(tuple(layers), tuple(share), tuple(uncond), model=data.get("model", ""),
                   name=data.get("name", "custom"), meta=data.get("meta"))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1) + "\n"


def loads(text: str) -> CFGPlan:
    """A plan from JSON text; ValueError on malformed JSON or fields."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"cfg plan file: not valid JSON ({e})") from None
    return CFGPlan.from_json(data)


def save_plan(path, plan: CFGPlan, *, overwrite: bool = False, arg: str = "path"):
    """Write ``plan`` as JSON atomically (``files.write_file``, kind ``cfg_plan``; ``overwrite``
    replaces only a plan file this project wrote). Returns the resolved path."""
    import pathlib

    from trdq_jax import files
    if pathlib.Path(path).suffix.lower() != ".json":
        raise ValueError(f"{arg}: expected a .json file, got {str(path)!r}")
    return files.write_file(path, lambda tmp: pathlib.Path(tmp).write_text(plan.dumps()),
                            kind=PLAN_KIND, overwrite=overwrite, arg=arg)


def load_plan(path) -> CFGPlan:
    """A plan from a JSON file; ValueError naming the path and the field."""
    import pathlib
    try:
        text = pathlib.Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cfg plan file: cannot read {str(path)!r} ({e})") from None
    try:
        return loads(text)
    except ValueError as e:
        raise ValueError(f"{str(path)!r}: {e}") from None


# ----------------------------------------------------------------------------- model side


def model_fingerprint(model_cfg) -> str:
    """``"DiTConfig:1a2b3c4d5e6f"``: the config class and a digest of its architecture fields
    (everything but dtypes), so that a plan is not used on another architecture."""
    from trdq_jax.config import to_dict
    fields = {k: v for k, v in to_dict(model_cfg).items() if k not in ("dtype", "param_dtype")}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    return f"{type(model_cfg).__name__}:{digest.hexdigest()[:12]}"


def attention_layers(model_cfg) -> tuple[str, ...]:
    """Module paths of every ``Attention`` of the model, in call order (traced abstractly)."""
    return _attention_layers_cached(model_cfg)


def _attention_layers_cached(model_cfg):
    key = model_fingerprint(model_cfg)
    if key not in _LAYER_CACHE:
        import flax.linen as nn
        import jax

        from trdq_jax.models.factory import abstract_params, build_model, dummy_inputs
        from trdq_jax.models.layers import Attention
        found: list[str] = []

        def record(next_fn, args, kwargs, context):
            if isinstance(context.module, Attention) and context.method_name == "__call__":
                path = "/".join(context.module.path)
                if path not in found:
                    found.append(path)
            return next_fn(*args, **kwargs)

        model = build_model(model_cfg)

        def forward(p, inputs):
            with nn.intercept_methods(record):
                return model.apply({"params": p}, *inputs)

        jax.eval_shape(forward, abstract_params(model_cfg), dummy_inputs(model_cfg, 2))
        if not found:
            raise ValueError(f"model: {type(model_cfg).__name__} has no attention layer to share")
        _LAYER_CACHE[key] = tuple(found)
    return _LAYER_CACHE[key]


_LAYER_CACHE: dict[str, tuple[str, ...]] = {}


def resolve_plan(spec, model_cfg, num_steps: int, arg: str = "spec") -> CFGPlan | bool:
    """``False`` for ``"none"``; a preset (``all``, ``trdq_release``) for ``model_cfg`` at
    ``num_steps`` steps; else a plan file (``*.json``), checked against the model and the
    step count. Errors name ``arg`` (the command line passes its flag, ``--cfg-plan``)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{arg}: expected a preset {PRESETS} or a plan .json file, got {spec!r}")
    if spec == "none":
        return False
    if spec in PRESETS:
        return preset_plan(spec, model_cfg, num_steps)
    if not spec.lower().endswith(".json"):
        raise ValueError(f"{arg}: expected a preset {PRESETS} or a plan .json file, got {spec!r}")
    try:
        plan = load_plan(spec)
        plan.check(model=model_fingerprint(model_cfg), layers=attention_layers(model_cfg),
                   num_steps=num_steps)
    except ValueError as e:
        raise ValueError(f"{arg}: {e}") from None
    return plan


# ----------------------------------------------------------------------------- constructors


def _plan(layers, share: np.ndarray, uncond, model_cfg, name, meta) -> CFGPlan:
    return CFGPlan(tuple(layers), tuple(tuple(bool(v) for v in row) for row in share),
                   tuple(uncond), model=model_fingerprint(model_cfg) if model_cfg else "",
                   name=name, meta=meta)


def _release_layers(layers: Sequence[str]) -> list[str]:
    """The released TR-DQ choice: spatial self-attention of the first 8 and last 6 of 28
    blocks, scaled to the model's count of (spatial) attention layers."""
    spatial = [p for p in layers if not p.startswith("temporal_")]
    n = len(spatial)
    first, last = round(8 * n / 28), round(6 * n / 28)
    chosen = spatial[:first] + (spatial[n - last:] if last else [])
    return [p for p in layers if p in set(chosen)]


def preset_plan(name: str, model_cfg, num_steps: int) -> CFGPlan:
    """``none`` (nothing shares), ``all`` (every attention at every step) or ``trdq_release``
    (see ``_release_layers``) for ``model_cfg`` at ``num_steps`` sampling steps."""
    if name not in PRESETS:
        raise ValueError(f"cfg plan preset: expected one of {PRESETS}, got {name!r}")
    layers = attention_layers(model_cfg)
    _check_steps(num_steps)
    chosen = {"none": [], "all": list(layers), "trdq_release": _release_layers(layers)}[name]
    share = np.zeros((num_steps, len(layers)), bool)
    share[:, [layers.index(p) for p in chosen]] = True
    return _plan(layers, share, ["full"] * num_steps, model_cfg, name, {"preset": name})


def _check_steps(num_steps):
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps: expected a positive int, got {num_steps!r}")


def _step_range(rule: dict, num_steps: int, where: str) -> range:
    steps = rule.get("steps", [0, num_steps])
    if (not isinstance(steps, (list, tuple)) or len(steps) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
            or not 0 <= steps[0] < steps[1] <= num_steps):
        raise ValueError(f"cfg plan {where}.steps: expected [start, stop) with 0 <= start < "
                         f"stop <= num_steps={num_steps}, got {steps!r}")
    return range(steps[0], steps[1])


def rules_plan(model_cfg, num_steps: int, share: Sequence[dict] = (),
               uncond: Sequence[dict] = (), name: str = "rules") -> CFGPlan:
    """An explicit plan from rules, later rules overriding earlier ones:

    * ``share``: ``{"layers": [regex, ...], "steps": [start, stop)}``, every layer whose path
      full-matches a regex shares at those steps (default: every step);
    * ``uncond``: ``{"mode": "cached" | "none" | "full", "steps": [start, stop)}``.

    A regex that matches no attention layer is an error naming it."""
    layers = attention_layers(model_cfg)
    _check_steps(num_steps)
    table = np.zeros((num_steps, len(layers)), bool)
    modes = ["full"] * num_steps
    for i, rule in enumerate(share):
        where = f"share[{i}]"
        if not isinstance(rule, dict) or not isinstance(rule.get("layers"), (list, tuple)):
            raise ValueError(f"cfg plan {where}: expected {{'layers': [regex, ...], 'steps': "
                             f"[start, stop]}}, got {rule!r}")
        cols = []
        for pattern in rule["layers"]:
            try:
                hits = [j for j, p in enumerate(layers) if re.fullmatch(pattern, p)]
            except (re.error, TypeError):
                raise ValueError(f"cfg plan {where}.layers: {pattern!r} is not a regex") from None
            if not hits:
                raise ValueError(f"cfg plan {where}.layers: {pattern!r} matches no attention "
                                 f"layer; the model has {list(layers)}")
            cols += hits
        for s in _step_range(rule, num_steps, where):
            table[s, cols] = True
    for i, rule in enumerate(uncond):
        where = f"uncond[{i}]"
        if not isinstance(rule, dict) or rule.get("mode") not in UNCOND_MODES:
            raise ValueError(f"cfg plan {where}.mode: expected one of {UNCOND_MODES}, got "
                             f"{rule!r}")
        for s in _step_range(rule, num_steps, where):
            modes[s] = rule["mode"]
            if rule["mode"] != "full":
                table[s] = False
    return _plan(layers, table, modes, model_cfg, name,
                 {"rules": {"share": list(share), "uncond": list(uncond)}})


def plan_from_analysis(analysis: dict, model_cfg, *, threshold: float | None = None,
                       budget: float | None = None, max_phases: int = 4,
                       uncond: Sequence[dict] = (), name: str | None = None) -> CFGPlan:
    """A plan from ``trdq_jax.eval.cfg_analysis.analyze_cfg``'s ``share_error`` table.

    The steps are cut into ``max_phases`` contiguous windows of (nearly) equal length; a
    window's error for a layer is the largest ``share_error`` of the layer over the window's
    steps. Then exactly one of:

    * ``threshold``: a layer shares in a window when that error is at most ``threshold``;
    * ``budget`` in (0, 1]: the fraction of (layer, window) cells to share, lowest error first.

    ``uncond`` rules are applied afterwards as in ``rules_plan``. At most ``max_phases`` windows
    means at most ``max_phases`` scan bodies (plus one per uncond rule boundary).
    """
    if (threshold is None) == (budget is None):
        raise ValueError("plan_from_analysis: expected exactly one of threshold= or budget=")
    if not isinstance(analysis, dict) or analysis.get("kind") != "trdq-cfg-analysis":
        raise ValueError("analysis: expected the dict of trdq_jax.eval.cfg_analysis.analyze_cfg")
    layers = attention_layers(model_cfg)
    if analysis.get("model") != model_fingerprint(model_cfg) or tuple(analysis["layers"]) != layers:
        raise ValueError(f"analysis model: measured on {analysis.get('model')}, the plan is for "
                         f"{model_fingerprint(model_cfg)}")
    err = np.asarray(analysis["share_error"], np.float64)
    num_steps = err.shape[0]
    if isinstance(max_phases, bool) or not isinstance(max_phases, int) or max_phases < 1:
        raise ValueError(f"max_phases: expected a positive int, got {max_phases!r}")
    windows = np.array_split(np.arange(num_steps), min(max_phases, num_steps))
    window_err = np.stack([err[w].max(axis=0) for w in windows])   # [W, layers]
    if threshold is not None:
        if not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise ValueError(f"threshold: expected a share_error >= 0, got {threshold!r}")
        chosen = window_err <= threshold
        meta = {"threshold": float(threshold)}
    else:
        if not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise ValueError(f"budget: expected a fraction in (0, 1], got {budget!r}")
        count = int(round(budget * window_err.size))
        order = np.argsort(window_err, axis=None, kind="stable")[:count]
        chosen = np.zeros(window_err.size, bool)
        chosen[order] = True
        chosen = chosen.reshape(window_err.shape)
        meta = {"budget": float(budget)}
    share = np.zeros((num_steps, len(layers)), bool)
    for w, steps in enumerate(windows):
        share[steps] = chosen[w]
    label = name or ("threshold_%g" % threshold if threshold is not None else "budget_%g" % budget)
    plan = _plan(layers, share, ["full"] * num_steps, model_cfg, label,
                 {**meta, "max_phases": max_phases, "analysis_seed": analysis.get("seed")})
    if uncond:
        ruled = rules_plan(model_cfg, num_steps, uncond=uncond)
        keep = np.asarray(ruled.uncond) == "full"
        share = share & keep[:, None]
        plan = _plan(layers, share, ruled.uncond, model_cfg, label, {**plan.meta,
                                                                     "uncond": list(uncond)})
    return plan
