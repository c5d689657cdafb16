"""Per-step solver coefficients as data: the ``Sampler`` pytree.

Every solver is written as one affine update per step ``i`` (sampling order, noisiest first)::

    out     = model output at (x, model_time[i])             # eps, v, or velocity for flow_euler
    x0      = x0_from_x[i] * x + x0_from_out[i] * out         # data prediction, carried to i+1
    x_next  = x_coef[i] * x + out_coef[i] * out + prev_x0_coef[i] * x0_prev
              + noise_scale[i] * exp(log_var / 2) * z,        z ~ N(0, I)

with ``log_var = fixed_log_var[i]`` for models without learned sigma, and the IDDPM interpolation
``log_var = frac * log_var_max[i] + (1 - frac) * log_var_min[i]``, ``frac = (v + 1) / 2`` when
the model outputs ``2C`` channels (only the DDPM solver has ``log_var_min != log_var_max``).

Conventions (IDDPM/DiT): the N sampling steps are the training steps kept by
``space_timesteps``; the respaced chain's ``alpha_bar_prev`` before the last step is 1, so every
eps solver's last step returns its data prediction. DDPM has no x0 clipping (DiT samples latents
unclipped) and uses IDDPM's "fixed large" variance when sigma is not learned.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from trdq_jax.config import SamplerConfig
from trdq_jax.sampling.schedules import (alphas_cumprod, make_betas, respaced_betas,
                                         space_timesteps)

SOLVERS = ("ddpm", "ddim", "dpm_solver_pp_2m", "flow_euler")
_COEFFICIENTS = ("x_coef", "out_coef", "prev_x0_coef", "x0_from_x", "x0_from_out", "noise_scale",
                 "log_var_min", "log_var_max", "fixed_log_var")


@struct.dataclass
class Sampler:
    """Solver tables for one (solver, schedule, step count, segment split); a JAX pytree.

    Array fields (leaves) have length ``num_steps`` and are in sampling order:
      train_timesteps: int32, the training step of each sampling step (0..num_train_steps-1).
      model_time: float32, the time passed to the model, in training units.
      segment_of_step: int32 in ``[0, num_segments)``, the time segment of each step.
      x_coef ... fixed_log_var: float32 update coefficients (module docstring).
      cfg_scale: float32 scalar, the default guidance scale (a leaf, so it never recompiles).
    Static fields (part of the compiled program): solver, num_train_steps, num_segments,
    stochastic (whether any step draws noise).
    """

    train_timesteps: jnp.ndarray
    model_time: jnp.ndarray
    segment_of_step: jnp.ndarray
    x_coef: jnp.ndarray
    out_coef: jnp.ndarray
    prev_x0_coef: jnp.ndarray
    x0_from_x: jnp.ndarray
    x0_from_out: jnp.ndarray
    noise_scale: jnp.ndarray
    log_var_min: jnp.ndarray
    log_var_max: jnp.ndarray
    fixed_log_var: jnp.ndarray
    cfg_scale: jnp.ndarray
    solver: str = struct.field(pytree_node=False, default="ddim")
    num_train_steps: int = struct.field(pytree_node=False, default=1000)
    num_segments: int = struct.field(pytree_node=False, default=1)
    stochastic: bool = struct.field(pytree_node=False, default=False)

    @property
    def num_steps(self) -> int:
        return int(self.model_time.shape[0])

    @classmethod
    def from_config(cls, cfg: SamplerConfig, segment_of_step=None) -> "Sampler":
        """Build the tables for ``cfg``; ``segment_of_step`` overrides the uniform split
        (see ``with_segments``)."""
        if not isinstance(cfg, SamplerConfig):
            raise ValueError(f"cfg: expected a SamplerConfig, got {type(cfg).__name__}")
        if cfg.solver == "flow_euler":
            train_t, model_t, coef = _flow_euler(cfg.num_steps, cfg.num_train_steps)
        else:
            train_t = space_timesteps(cfg.num_train_steps, cfg.num_steps)
            betas = make_betas(cfg.schedule, cfg.num_train_steps)
            coef = _EPS_SOLVERS[cfg.solver](betas, train_t, cfg.eta)
            if cfg.prediction == "v":
                coef = _for_v_prediction(coef, alphas_cumprod(betas)[train_t])
            train_t, model_t = train_t[::-1], train_t[::-1].astype(np.float64)
            coef = {k: v[::-1] for k, v in coef.items()}
        sampler = cls(
            train_timesteps=jnp.asarray(train_t, jnp.int32),
            model_time=jnp.asarray(model_t, jnp.float32),
            segment_of_step=jnp.asarray(np.zeros(cfg.num_steps, np.int32)),
            **{k: jnp.asarray(coef[k], jnp.float32) for k in _COEFFICIENTS},
            solver=cfg.solver, num_train_steps=cfg.num_train_steps, num_segments=1,
            stochastic=bool(np.any(coef["noise_scale"] != 0)),
            cfg_scale=jnp.asarray(cfg.cfg_scale, jnp.float32))
        if segment_of_step is None:
            segment_of_step = uniform_segment_table(train_t, cfg.num_segments, cfg.num_train_steps)
        return sampler.with_segments(segment_of_step, cfg.num_segments)

    def with_segments(self, segment_of_step, num_segments: int) -> "Sampler":
        """A copy using a custom step -> segment table (e.g. a data-driven split).

        ``segment_of_step``: ints ``[num_steps]`` in ``[0, num_segments)``, sampling order.
        Changing the table's values does not recompile; changing ``num_segments`` does.
        """
        if isinstance(num_segments, bool) or not isinstance(num_segments, (int, np.integer)) \
                or not 1 <= num_segments <= self.num_steps:
            raise ValueError(f"num_segments: expected an int in [1, {self.num_steps}], "
                             f"got {num_segments!r}")
        table = np.asarray(segment_of_step)
        if table.shape != (self.num_steps,) or not np.issubdtype(table.dtype, np.integer):
            raise ValueError(f"segment_of_step: expected ints of shape ({self.num_steps},), "
                             f"got {table.dtype} {table.shape}")
        if table.min() < 0 or table.max() >= num_segments:
            raise ValueError(f"segment_of_step: expected values in [0, {num_segments}), got "
                             f"min {table.min()}, max {table.max()}")
        return self.replace(segment_of_step=jnp.asarray(table, jnp.int32),
                            num_segments=int(num_segments))


def make_sampler(cfg: SamplerConfig, segment_of_step=None) -> Sampler:
    """Same as ``Sampler.from_config``."""
    return Sampler.from_config(cfg, segment_of_step)


def uniform_segment_table(train_timesteps, num_segments: int, num_train_steps: int) -> np.ndarray:
    """Uniform contiguous segments over the training axis, numbered in sampling order like
    every segment table: segment 0 is the noisiest interval ``[T (S-1) / S, T)``, which
    sampling visits first; ``S - 1 - min(t * S // T, S - 1)``, int32."""
    t = np.asarray(train_timesteps, dtype=np.int64)
    bins = np.minimum(t * num_segments // num_train_steps, num_segments - 1)
    return (num_segments - 1 - bins).astype(np.int32)


# ----------------------------------------------------------------------------- eps solvers
# Builders return float64 arrays indexed by respaced chain position k (k = 0 is the cleanest
# step); Sampler.from_config flips them into sampling order.

def _respaced(betas: np.ndarray, timesteps: np.ndarray):
    """alpha_bar, alpha_bar_prev and beta of the respaced chain, float64 ``[N]``."""
    kept = alphas_cumprod(betas)[timesteps]
    return kept, np.concatenate([[1.0], kept[:-1]]), respaced_betas(betas, timesteps)


def _x0_prediction(kept: np.ndarray) -> dict:
    return {"x0_from_x": np.sqrt(1.0 / kept), "x0_from_out": -np.sqrt(1.0 / kept - 1.0)}


def _zeros(n: int, *names: str) -> dict:
    return {name: np.zeros(n) for name in names}


def _ddpm(betas, timesteps, eta):
    del eta  # ancestral sampling has its own variance
    kept, prev, beta = _respaced(betas, timesteps)
    x0 = _x0_prediction(kept)
    mean_x0 = beta * np.sqrt(prev) / (1.0 - kept)
    mean_xt = (1.0 - prev) * np.sqrt(1.0 - beta) / (1.0 - kept)
    posterior_var = beta * (1.0 - prev) / (1.0 - kept)
    # posterior_var[0] is 0; IDDPM clips its log to the next step's value.
    clipped_log_var = np.log(np.concatenate([posterior_var[1:2], posterior_var[1:]])) \
        if kept.size > 1 else np.log(beta)
    fixed_large = np.log(np.concatenate([posterior_var[1:2], beta[1:]])) \
        if kept.size > 1 else np.log(beta)
    noise = np.ones(kept.size)
    noise[0] = 0.0
    return {"x_coef": mean_x0 * x0["x0_from_x"] + mean_xt,
            "out_coef": mean_x0 * x0["x0_from_out"], **x0,
            "noise_scale": noise, "log_var_min": clipped_log_var, "log_var_max": np.log(beta),
            "fixed_log_var": fixed_large, **_zeros(kept.size, "prev_x0_coef")}


def _ddim(betas, timesteps, eta):
    kept, prev, _ = _respaced(betas, timesteps)
    x0 = _x0_prediction(kept)
    sigma = eta * np.sqrt((1.0 - prev) / (1.0 - kept)) * np.sqrt(1.0 - kept / prev)
    direction = np.sqrt(np.maximum(1.0 - prev - sigma ** 2, 0.0))
    return {"x_coef": np.sqrt(prev) * x0["x0_from_x"],
            "out_coef": np.sqrt(prev) * x0["x0_from_out"] + direction, **x0,
            "noise_scale": sigma,
            **_zeros(kept.size, "prev_x0_coef", "log_var_min", "log_var_max", "fixed_log_var")}


def _dpm_solver_pp_2m(betas, timesteps, eta):
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, in log-SNR ``lambda``.

    Step k -> k-1: ``x' = (s'/s) x + a' (1 - e^-h) D`` with ``h = lambda' - lambda`` and
    ``D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev``, ``r = h_prev / h``. The first step (no history) and
    the last step (to sigma = 0, h infinite) are first order, i.e. ``D = x0``.
    """
    del eta
    kept, prev, _ = _respaced(betas, timesteps)
    x0 = _x0_prediction(kept)
    n = kept.size
    alpha, sigma = np.sqrt(kept), np.sqrt(1.0 - kept)
    lam = np.log(alpha / sigma)
    x_coef, d_coef, prev_coef = np.zeros(n), np.zeros(n), np.zeros(n)
    for k in range(1, n):
        h = lam[k - 1] - lam[k]
        phi = alpha[k - 1] * (1.0 - np.exp(-h))
        x_coef[k] = sigma[k - 1] / sigma[k]
        if k == n - 1:  # first sampling step
            d_coef[k] = phi
        else:
            r = (lam[k] - lam[k + 1]) / h
            d_coef[k], prev_coef[k] = phi * (1.0 + 0.5 / r), -phi * 0.5 / r
    d_coef[0] = 1.0  # last step lands on the data prediction
    return {"x_coef": x_coef + d_coef * x0["x0_from_x"], "out_coef": d_coef * x0["x0_from_out"],
            "prev_x0_coef": prev_coef, **x0,
            **_zeros(n, "noise_scale", "log_var_min", "log_var_max", "fixed_log_var")}


def _for_v_prediction(coef: dict, kept: np.ndarray) -> dict:
    """Rewrite eps-solver tables for a v-prediction model.

    ``eps = sqrt(abar) v + sqrt(1 - abar) x`` is affine in ``v`` with the same ``x`` for both
    CFG branches, so it folds into the ``x`` and ``out`` coefficients (and guiding ``v`` equals
    guiding ``eps``).
    """
    a, b = np.sqrt(kept), np.sqrt(1.0 - kept)
    return {**coef,
            "x_coef": coef["x_coef"] + b * coef["out_coef"], "out_coef": a * coef["out_coef"],
            "x0_from_x": coef["x0_from_x"] + b * coef["x0_from_out"],
            "x0_from_out": a * coef["x0_from_out"]}


_EPS_SOLVERS = {"ddpm": _ddpm, "ddim": _ddim, "dpm_solver_pp_2m": _dpm_solver_pp_2m}


def _flow_euler(num_steps: int, num_train_steps: int):
    """Rectified flow ``x_t = (1 - t) x0 + t eps``, velocity ``v = eps - x0``; Euler from t=1 to 0.

    Returns (train_timesteps, model_time, coefficients), already in sampling order.
    """
    times = np.linspace(1.0, 0.0, num_steps + 1)
    current, nxt = times[:-1], times[1:]
    model_time = current * num_train_steps
    # floor(t * T) in exact integer arithmetic (t = (N - i) / N), clipped to the last step
    remaining = np.arange(num_steps, 0, -1, dtype=np.int64)
    train_t = np.minimum(remaining * num_train_steps // num_steps, num_train_steps - 1)
    coef = {"x_coef": np.ones(num_steps), "out_coef": nxt - current,
            "x0_from_x": np.ones(num_steps), "x0_from_out": -current,
            **_zeros(num_steps, "prev_x0_coef", "noise_scale", "log_var_min", "log_var_max",
                     "fixed_log_var")}
    return train_t, model_time, coef
