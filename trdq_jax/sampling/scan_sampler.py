"""The sampling loop: one jitted ``lax.scan`` over steps with batched classifier-free guidance.

``apply_fn(params, x, t, y, segment, share_cfg) -> out`` is the denoiser (optionally with a
``prepare_cond(params, y) -> y`` method, run once on the conditioning before the step loop):
  x ``[2N, ...spatial, C]`` float32 (``[x; x]``), t ``[2N]`` float32 in training units,
  y the conditioning ``[cond; null]`` with leading axis 2N (class labels: int32 ``[2N]``; see
  ``trdq_jax.sampling.conditioning``), segment a traced int32 scalar (the step's time segment),
  share_cfg a Python bool or a frozenset of attention paths that share (static). At steps where
  a ``CFGPlan`` skips the uncond branch it is called on the cond half alone: x ``[N, ...]``,
  t ``[N]``, y = cond, share_cfg False; an unconditional sampler (cond None) always calls it so,
  with y None. out ``[2N, ...spatial, C]`` (eps, or velocity for flow_euler) or
  ``[2N, ...spatial, 2C]`` (eps then IDDPM variance values ``v``).

Randomness: sample ``i`` of a batch has the index ``j = sample_offset + i`` (or
``sample_indices[i]``) and uses ``k_j = fold_in(key(seed), j)``; its initial noise is
``normal(k_j)`` (``initial_noise(seed, shape, sample_offset)``, or the caller's ``x_T``) and the
noise of step ``s`` is ``normal(fold_in(k_j, s))``. A sample is therefore the same whatever batch
it lands in, up to float rounding: XLA may block a matmul differently for another batch size.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax.config import check_cfg_scale
from trdq_jax.models.layers import count_nonfinite
from trdq_jax.sampling import conditioning
from trdq_jax.sampling.solvers import Sampler

ApplyFn = Callable[..., jax.Array]
_INT32_MAX = 2 ** 31 - 1
X_T_LIMIT = 1e4  # far above any schedule's noise (EDM's sigma_max = 80 gives ~400)


def sample(apply_fn: ApplyFn, params: Any, sampler: Sampler, cond, *, seed: int,
           cfg_scale: float | None, null_label: int | None = None, null_cond=None,
           shape: tuple[int, ...],
           share_cfg: "bool | CFGPlan" = False, sample_offset: int = 0, sample_indices=None,
           progress: bool | Callable[[int, int], None] = False,
           return_trajectory: bool = False,
           x_T=None, unroll: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Draw ``N = shape[0]`` samples; returns the final x, float32 ``shape``.

    cond: the conditioning (``trdq_jax.sampling.conditioning``): class labels, ints ``[N]`` in
      ``[0, null_label]`` (``null_label`` itself draws unconditionally), or any pytree of arrays
      with leading axis N (e.g. caption embeddings and a mask), or None for an unconditional
      model (no guidance: one forward per step, ``cfg_scale`` and ``share_cfg`` unused).
    null_cond: the uncond branch's conditioning, cond's tree structure with one element per leaf
      (broadcast over the batch) or full ``[N, ...]`` leaves; ``null_label=k`` is the same as
      ``null_cond=k`` for class labels.
    ``sample`` may be called inside a user's ``jit``: ``cond``, ``cfg_scale``, ``seed`` and
    ``sample_offset`` may then be traced; their shapes and dtypes are checked, and the value
    ranges only when they are concrete (a traced seed is cast to uint32 and an offset to int32,
    so out-of-range values wrap).
    shape: the full batch shape ``(N, ...spatial, C)``.
    cfg_scale: guidance ``uncond + cfg_scale * (cond - uncond)`` on the eps channels, a number in
      [0, 100] (``trdq_jax.config.check_cfg_scale``); a traced value (changing it never
      recompiles). ``None`` uses ``sampler.cfg_scale``.
    seed, sample_offset: sample i's randomness derives from ``(seed, sample_offset + i)``.
    sample_indices: optional ints ``[N]`` in ``[0, 2**31 - 1]`` (concrete, not traced), instead
      of ``sample_offset``: sample i's randomness derives from ``(seed, sample_indices[i])``, so
      any subset of a run's samples (e.g. the ones a resumed generation still lacks) can be
      drawn in one batch.
    progress: ``True`` prints ``step i/n`` to stderr via ``jax.debug.callback``; a callable
      ``f(step, num_steps)`` is called instead (it is part of the compile key: pass the same
      object to reuse the program). Off by default: no host round trip in the loop.
    return_trajectory: also return ``xs``, float32 ``[num_steps, *shape]``: the model input x of
      every step in sampling order (``xs[0]`` is the initial noise), as ``(x_final, xs)``. It
      costs no extra model call; it is a separate compiled program from the default one.
    x_T: the initial noise, an array of exactly ``shape`` with a float dtype (cast to float32),
      finite when concrete (it may be traced); ``None`` draws ``initial_noise(seed, shape,
      sample_offset)``, which passed explicitly gives the same samples bit for bit. The
      per-step noise of stochastic solvers still derives from ``(seed, sample_offset + i)``.
    share_cfg: False, True (every attention of the uncond half reuses the cond half's
      probabilities at every step) or a ``trdq_jax.sampling.cfg_plan.CFGPlan`` (per layer and
      step, and the uncond branch cached or dropped at some steps); a plan must match the
      sampler's step count and, when ``apply_fn`` has a ``model`` with a ``config``, its model.
    unroll: unroll the step loop fully (a larger program, the same samples): XLA's cost analysis
      counts a loop body once, so FLOP counts of the whole sampler need it.
    apply_fn must be hashable (a function, or ``denoise_fn_for(model)``): it keys the compile cache.
    When it has a ``check_params(params)`` method (``denoise_fn_for(model)`` does), that is called
    first, so params of another model config fail with a list of the differing paths.
    """
    if not callable(apply_fn):
        raise ValueError(f"apply_fn: expected a callable, got {type(apply_fn).__name__}")
    if not isinstance(sampler, Sampler):
        raise ValueError(f"sampler: expected a Sampler, got {type(sampler).__name__}")
    if not jax.tree.leaves(params):
        raise ValueError("params: expected a non-empty pytree of arrays")
    if callable(getattr(apply_fn, "check_params", None)):
        apply_fn.check_params(params)
    cond, null_cond = _check_conditioning(cond, null_label, null_cond)
    shape = _check_shape(shape, conditioning.batch_size(cond))
    cfg_name = "sampler.cfg_scale" if cfg_scale is None else "cfg_scale"
    cfg_scale = sampler.cfg_scale if cfg_scale is None else cfg_scale
    if _is_checked_tracer(cfg_name, cfg_scale, "number", (jnp.floating, jnp.integer)):
        cfg_value = cfg_scale
    else:
        cfg_value = check_cfg_scale(cfg_scale, cfg_name)
    if not _is_checked_tracer("seed", seed, "integer", (jnp.integer,)):
        seed = _check_int("seed", seed, 0, 2 ** 32 - 1)
    indices = _indices(sample_offset, sample_indices, shape[0])
    phases = _phases(share_cfg, apply_fn, sampler)
    if cond is None and phases != _phases(False, apply_fn, sampler):
        raise ValueError("share_cfg: an unconditional sampler (cond None) has no uncond branch "
                         "to share or cache; use share_cfg=False")
    if not isinstance(unroll, bool):
        raise ValueError(f"unroll: expected a bool, got {unroll!r}")
    if not (isinstance(progress, bool) or callable(progress)):
        raise ValueError(f"progress: expected a bool or a callable, got {progress!r}")
    if not isinstance(return_trajectory, bool):
        raise ValueError(f"return_trajectory: expected a bool, got {return_trajectory!r}")
    x_T = _check_x_T(x_T, shape)
    report = (_print_progress if progress is True else progress) or None
    return _sample_scan(apply_fn, params, sampler, cond, jnp.asarray(seed, jnp.uint32),
                        jnp.asarray(cfg_value, jnp.float32), null_cond, indices,
                        x_T, shape=shape, phases=phases, report=report,
                        return_trajectory=return_trajectory, unroll=unroll)


def _check_conditioning(cond, null_label, null_cond):
    """``(cond, null_cond)`` checked; class labels (an integer ``[N]`` with ``null_label``)
    keep their range check and are cast to int32."""
    if null_label is not None:
        if null_cond is not None:
            raise ValueError("null_label: give null_label (class labels) or null_cond, not both")
        null_label = _check_int("null_label", null_label, 0, _INT32_MAX)
        labels = _check_labels(cond, null_label)
        return jnp.asarray(labels, jnp.int32), jnp.asarray(null_label, jnp.int32)
    cond = conditioning.check_cond(cond)
    return cond, conditioning.check_null(null_cond, cond)


def _phases(share_cfg, apply_fn, sampler) -> tuple:
    """The static phases ``_sample_scan`` runs: ``(start, stop, share, uncond)`` tuples."""
    from trdq_jax.sampling.cfg_plan import CFGPlan, Phase, Step
    if isinstance(share_cfg, bool):
        return (Phase(0, sampler.num_steps, (Step(share_cfg, "full"),)),)
    if not isinstance(share_cfg, CFGPlan):
        raise ValueError(f"share_cfg: expected a bool or a CFGPlan, got {share_cfg!r}")
    cfg = getattr(getattr(apply_fn, "model", None), "config", None)
    if dataclasses.is_dataclass(cfg):
        from trdq_jax.sampling.cfg_plan import attention_layers, model_fingerprint
        share_cfg.check(model=model_fingerprint(cfg), layers=attention_layers(cfg))
    share_cfg.check(num_steps=sampler.num_steps)
    return share_cfg.phases()


def initial_noise(seed: int, shape: tuple[int, ...], sample_offset: int = 0,
                  sample_indices=None) -> jax.Array:
    """The initial noise ``x_T`` that ``sample(..., seed=seed, shape=shape,
    sample_offset=sample_offset)`` draws: float32 ``shape``, row ``i`` is
    ``normal(fold_in(key(seed), sample_offset + i))`` (or ``sample_indices[i]``).

    Passing it back as ``sample(..., x_T=initial_noise(...))`` gives bit-identical samples; edit
    it (e.g. interpolate two noises) to steer sampling. ``seed`` and ``sample_offset`` are checked
    as in ``sample`` (they may be traced).
    """
    if not isinstance(shape, (tuple, list)) or not shape:
        raise ValueError("shape: expected a tuple (N, ...spatial, C) of positive ints, "
                         f"got {shape!r}")
    shape = _check_shape(shape, shape[0])
    if not _is_checked_tracer("seed", seed, "integer", (jnp.integer,)):
        seed = _check_int("seed", seed, 0, 2 ** 32 - 1)
    indices = _indices(sample_offset, sample_indices, shape[0])
    return _initial_noise_jit(jnp.asarray(seed, jnp.uint32), indices, shape=shape)


def _indices(sample_offset, sample_indices, n: int) -> jax.Array:
    """The int32 ``[n]`` sample indices of a batch: ``sample_offset + arange(n)``, or the
    checked ``sample_indices``."""
    if sample_indices is None:
        if not _is_checked_tracer("sample_offset", sample_offset, "integer", (jnp.integer,)):
            sample_offset = _check_int("sample_offset", sample_offset, 0, _INT32_MAX - n)
        return jnp.asarray(sample_offset, jnp.int32) + jnp.arange(n, dtype=jnp.int32)
    if not (isinstance(sample_offset, (int, np.integer)) and sample_offset == 0):
        raise ValueError("sample_indices: give sample_indices or sample_offset, not both")
    if isinstance(sample_indices, jax.core.Tracer):
        raise ValueError("sample_indices: expected concrete ints (not traced inside jit)")
    array = np.asarray(sample_indices)
    if (array.shape != (n,) or not np.issubdtype(array.dtype, np.integer)
            or array.min() < 0 or array.max() > _INT32_MAX):
        raise ValueError(f"sample_indices: expected {n} ints in [0, {_INT32_MAX}], got "
                         f"{array.dtype}{list(array.shape)}")
    return jnp.asarray(array, jnp.int32)


def _sample_keys(seed, indices):
    """``[n]`` keys ``k_j = fold_in(key(seed), j)`` of the sample indices ``j``."""
    base = jax.random.key(seed)
    return jax.vmap(lambda j: jax.random.fold_in(base, j))(indices)


def _noise_from_keys(sample_keys, shape: tuple[int, ...]):
    """The initial noise of the samples whose keys are ``sample_keys``: ``normal(k_i)``."""
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(sample_keys)


@functools.partial(jax.jit, static_argnames=("shape",))
def _initial_noise_jit(seed, indices, *, shape):
    return _noise_from_keys(_sample_keys(seed, indices), shape)


@functools.partial(jax.jit, static_argnames=("apply_fn", "shape", "phases", "report",
                                             "return_trajectory", "unroll"))
def _sample_scan(apply_fn, params, sampler, cond, seed, cfg_scale, null_cond, indices,
                 x_T=None, *, shape, phases, report, return_trajectory=False, unroll=False):
    n, channels = shape[0], shape[-1]
    sample_keys = _sample_keys(seed, indices)
    # x_T None or an array is part of the jit signature: two programs, never a retrace per value
    x = _noise_from_keys(sample_keys, shape) if x_T is None else x_T.astype(jnp.float32)
    y_both, y_cond = conditioning.with_null(cond, null_cond), cond
    prepare = getattr(apply_fn, "prepare_cond", None)
    if prepare is not None and cond is not None:  # once per batch, outside the step loop
        y_both = prepare(params, y_both)
        y_cond = jax.tree.map(lambda a: a[:n], y_both)
    guidance = cond is not None  # static: an unconditional model runs one branch
    num_steps = sampler.num_steps
    uses_cache = any(step.uncond == "cached" for p in phases for step in p.pattern)

    def make_step(spec):  # spec: a cfg_plan.Step (shared layers, uncond mode)
        def step(carry, i):
            x, x0_prev, delta = carry
            take = lambda table: jnp.take(table, i)  # noqa: E731 (traced index, one program)
            segment = take(sampler.segment_of_step)
            if spec.uncond == "full" and guidance:
                t = jnp.full((2 * n,), take(sampler.model_time), jnp.float32)
                out = apply_fn(params, jnp.concatenate([x, x]), t, y_both, segment, spec.share)
                out = _check_output(out, shape, 2).astype(jnp.float32)
                cond, uncond_eps = out[:n], out[n:, ..., :channels]
                if uses_cache:
                    delta = cond[..., :channels] - uncond_eps
            else:  # the uncond branch does not run: cached difference, or no guidance
                t = jnp.full((n,), take(sampler.model_time), jnp.float32)
                cond = _check_output(apply_fn(params, x, t, y_cond, segment, False), shape,
                                     1).astype(jnp.float32)
                uncond_eps = cond[..., :channels]
                if spec.uncond == "cached":
                    uncond_eps = uncond_eps - delta
            cond_eps = cond[..., :channels]
            guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
            x0 = take(sampler.x0_from_x) * x + take(sampler.x0_from_out) * guided
            x_next = (take(sampler.x_coef) * x + take(sampler.out_coef) * guided
                      + take(sampler.prev_x0_coef) * x0_prev)
            if sampler.stochastic:
                if cond.shape[-1] == 2 * channels:  # learned sigma: the conditional branch's v
                    frac = (cond[..., channels:] + 1.0) / 2.0
                    log_var = (frac * take(sampler.log_var_max)
                               + (1.0 - frac) * take(sampler.log_var_min))
                else:
                    log_var = take(sampler.fixed_log_var)
                z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape[1:],
                                                         jnp.float32))(sample_keys)
                x_next = x_next + take(sampler.noise_scale) * jnp.exp(0.5 * log_var) * z
            if report is not None:
                jax.debug.callback(report, i + 1, num_steps)
            return (x_next, x0, delta), (x if return_trajectory else None)
        return step

    def make_body(phase):
        steps = [make_step(step) for step in phase.pattern]

        def body(carry, i0):  # one repeat of the phase's pattern: steps i0, i0 + 1, ...
            xs = []
            for j, step in enumerate(steps):
                carry, x_in = step(carry, i0 + j)
                xs.append(x_in)
            return carry, (jnp.stack(xs) if return_trajectory else None)
        return body

    carry = (x, jnp.zeros_like(x), jnp.zeros_like(x) if uses_cache else None)
    trajectory = []
    for phase in phases:  # one scan per phase of the plan (one phase without a plan)
        period = len(phase.pattern)
        carry, xs = jax.lax.scan(make_body(phase), carry,
                                 jnp.arange(phase.start, phase.stop, period, dtype=jnp.int32),
                                 unroll=unroll)
        if return_trajectory:
            trajectory.append(xs.reshape(-1, *xs.shape[2:]))
    x = carry[0]
    if not return_trajectory:
        return x
    return x, (trajectory[0] if len(trajectory) == 1 else jnp.concatenate(trajectory))


def _print_progress(step, num_steps) -> None:
    print(f"step {int(step)}/{int(num_steps)}", file=sys.stderr, flush=True)


def _check_output(out, shape, halves: int):
    channels = shape[-1]
    expected = [(halves * shape[0], *shape[1:-1], c) for c in (channels, 2 * channels)]
    if not hasattr(out, "shape") or tuple(out.shape) not in expected:
        raise ValueError(f"apply_fn: expected an output of shape {expected[0]} or {expected[1]} "
                         f"(learned sigma), got {getattr(out, 'shape', type(out).__name__)}")
    return out


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and np.issubdtype(
            value.dtype, np.integer):  # a concrete 0-d integer array, e.g. jnp.uint32(4)
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}], got {value!r}")
    return int(value)


def _is_checked_tracer(name: str, value, what: str, kinds: tuple) -> bool:
    """True when ``value`` is a tracer (``sample`` called inside ``jit``): only its shape and
    dtype can be checked there, and are (a scalar of one of the dtype ``kinds``). False for
    concrete values, which the caller checks fully."""
    if not isinstance(value, jax.core.Tracer):
        return False
    if value.shape != () or not any(jnp.issubdtype(value.dtype, k) for k in kinds):
        raise ValueError(f"{name}: expected a scalar {what}, got a traced "
                         f"{value.dtype}{list(value.shape)}")
    return True


def _check_labels(labels, null_label: int):
    if isinstance(labels, jax.core.Tracer):
        # Inside jit: values cannot be inspected (as in the models' input checks).
        if labels.ndim != 1 or labels.shape[0] == 0 or not jnp.issubdtype(labels.dtype,
                                                                          jnp.integer):
            raise ValueError(f"labels: expected a non-empty 1-D integer array [N], got a traced "
                             f"{labels.dtype}{list(labels.shape)}")
        return labels
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"labels: expected a non-empty 1-D array [N], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels: expected an integer dtype, got {array.dtype}")
    if array.min() < 0 or array.max() > null_label:
        raise ValueError(f"labels: expected values in [0, null_label={null_label}], got min "
                         f"{array.min()}, max {array.max()}")
    return array


def _check_x_T(x_T, shape: tuple[int, ...]):
    """None, or ``x_T`` as a float32 array (a tracer stays a tracer) after checking it."""
    if x_T is None:
        return None
    if not isinstance(x_T, (jax.Array, np.ndarray)):
        try:
            x_T = np.asarray(x_T)
        except (TypeError, ValueError):
            raise ValueError(f"x_T: expected an array of shape {shape}, got "
                             f"{type(x_T).__name__}") from None
    traced = " traced" if isinstance(x_T, jax.core.Tracer) else ""
    if tuple(x_T.shape) != shape:
        raise ValueError(f"x_T: expected an array of shape {shape} (= shape), got{traced} "
                         f"shape {tuple(x_T.shape)}")
    if not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f"x_T: expected a floating dtype, got{traced} {x_T.dtype}")
    if not traced:
        bad = count_nonfinite(x_T)
        if bad:
            raise ValueError(f"x_T: expected finite values, got {bad[0]} NaN and {bad[1]} "
                             f"infinite of {x_T.size}")
        peak = float(np.max(np.abs(np.asarray(x_T)))) if x_T.size else 0.0
        if peak > X_T_LIMIT:
            raise ValueError(f"x_T: expected noise-scale values (|x| <= {X_T_LIMIT:g}; the "
                             f"sampler's first step sees unit-variance noise), got max |x| = "
                             f"{peak:.3g}: the model would overflow to NaN")
    return jnp.asarray(x_T, jnp.float32)


def _check_shape(shape, batch: int | None) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints whose batch ``shape[0]`` is ``batch`` (the
    conditioning's; None: unconditional, any batch)."""
    if not isinstance(shape, (tuple, list)) or len(shape) < 2 or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError("shape: expected a tuple (N, ...spatial, C) of positive ints, "
                         f"got {shape!r}")
    if batch is not None and shape[0] != batch:
        raise ValueError(f"shape: expected shape[0] == the conditioning's batch (len(labels)) "
                         f"= {batch}, got {shape[0]}")
    return tuple(int(d) for d in shape)


@dataclasses.dataclass(frozen=True)
class _FloatModelDenoiser:
    """``apply_fn`` for a Flax model that takes no segment; hashable by the model, so repeated
    ``denoise_fn_for(model)`` calls reuse one compiled sampler."""

    model: Any
    precompute_cond: bool = True

    def __call__(self, params, x, t, y, segment, share_cfg):
        del segment  # a float model is the same in every time segment
        return conditioning.apply_model(self.model, {"params": params}, x, t, y, share_cfg)

    def prepare_cond(self, params, cond):
        """The conditioning with the model's step-independent work done once
        (``conditioning.precompute``); unchanged with ``precompute_cond=False``."""
        if not self.precompute_cond:
            return cond
        return conditioning.precompute(self.model, {"params": params}, cond)

    def check_params(self, params) -> None:
        """``trdq_jax.models.factory.check_params`` for the model's config (shapes and dtypes
        only: tracers are fine); a model without a ``config`` field is not checked."""
        from trdq_jax.config import MODEL_CONFIGS
        cfg = getattr(self.model, "config", None)
        if isinstance(cfg, tuple(MODEL_CONFIGS.values())) and cfg.family != "external":
            from trdq_jax.models.factory import check_params
            check_params(cfg, params)


def denoise_fn_for(model, precompute_cond: bool = True) -> ApplyFn:
    """``apply_fn(params, x, t, y, segment, share_cfg)`` that calls
    ``model.apply({'params': params}, x, t, y, share_cfg=share_cfg)`` and ignores ``segment``
    (``y`` left out when None, ``share_cfg`` when the model takes none:
    ``conditioning.apply_model``): any Flax denoiser ``__call__(x, t[, cond])``.
    precompute_cond: when the model defines ``precompute_cond`` (PixArt), the sampler runs it
      once per batch before the step loop (the same samples, less work per step); False calls
      the model on the raw conditioning at every step (for comparisons)."""
    if not hasattr(model, "apply"):
        raise ValueError(f"model: expected a Flax module, got {type(model).__name__}")
    if not isinstance(precompute_cond, bool):
        raise ValueError(f"precompute_cond: expected True or False, got {precompute_cond!r}")
    return _FloatModelDenoiser(model, precompute_cond)
