"""Noise schedules and timestep respacing (IDDPM / DiT conventions), float64 numpy.

These are host-side tables: samplers turn them into per-step coefficient arrays once, outside
any trace.
"""
from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("linear", "cosine")
_COSINE_MAX_BETA = 0.999
_COSINE_OFFSET = 0.008


def _check_num_steps(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def make_betas(schedule: str, num_train_steps: int = 1000) -> np.ndarray:
    """Training noise schedule ``beta_t``, float64 ``[num_train_steps]``.

    ``"linear"``: DDPM/DiT linear 1e-4 .. 0.02, both ends multiplied by ``1000 / num_train_steps``
    (IDDPM's rescaling, so that any T spans the same total noise).
    ``"cosine"``: IDDPM cosine ``alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2`` with
    ``beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), 0.999)``.
    """
    steps = _check_num_steps("num_train_steps", num_train_steps)
    if schedule == "linear":
        scale = 1000.0 / steps
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    if schedule == "cosine":
        def alpha_bar(s: float) -> float:
            return math.cos((s + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
        return np.array([min(1.0 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps),
                             _COSINE_MAX_BETA) for i in range(steps)], dtype=np.float64)
    raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")


def _check_betas(betas) -> np.ndarray:
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas: expected a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("betas: expected every value in (0, 1]")
    return betas


def alphas_cumprod(betas) -> np.ndarray:
    """``alpha_bar_t = prod_{s<=t} (1 - beta_s)``, float64 ``[T]``."""
    return np.cumprod(1.0 - _check_betas(betas))


def space_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
    """IDDPM ``space_timesteps`` for a single section: ``num_steps`` of ``num_train_steps``.

    Kept training steps, int64 ``[num_steps]``, increasing, first 0 and last T-1 (for N > 1),
    at the float stride ``(T - 1) / (N - 1)`` accumulated and rounded (Python ``round``) exactly
    as IDDPM does (20 of 1000 -> 0, 53, 105, ..., 999).
    """
    total = _check_num_steps("num_train_steps", num_train_steps)
    count = _check_num_steps("num_steps", num_steps)
    if count > total:
        raise ValueError(f"num_steps: expected <= num_train_steps={total}, got {count}")
    if count == 1:
        return np.zeros(1, dtype=np.int64)
    stride = (total - 1) / (count - 1)
    kept, position = [], 0.0
    for _ in range(count):
        kept.append(round(position))
        position += stride
    return np.array(kept, dtype=np.int64)


def respaced_betas(betas, timesteps) -> np.ndarray:
    """Betas of the respaced chain keeping only ``timesteps`` (IDDPM ``SpacedDiffusion``).

    ``beta'_k = 1 - alpha_bar[t_k] / alpha_bar[t_{k-1}]`` with ``alpha_bar[t_{-1}] = 1``, so the
    respaced chain has ``alphas_cumprod(beta') == alpha_bar[timesteps]``. float64 ``[N]``.
    """
    abar = alphas_cumprod(betas)
    timesteps = np.asarray(timesteps)
    if (timesteps.ndim != 1 or timesteps.size == 0 or not np.issubdtype(timesteps.dtype, np.integer)
            or np.any(np.diff(timesteps) <= 0) or timesteps[0] < 0 or timesteps[-1] >= abar.size):
        raise ValueError(f"timesteps: expected strictly increasing ints in [0, {abar.size}), "
                         f"got {timesteps!r}")
    kept = abar[timesteps]
    previous = np.concatenate([[1.0], kept[:-1]])
    return 1.0 - kept / previous
