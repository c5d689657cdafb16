"""Independent float64 reference formulas (written from the papers / IDDPM, not from trdq_jax)."""
import math

import numpy as np


def betas(schedule: str, num_train_steps: int) -> np.ndarray:
    T = num_train_steps
    if schedule == "linear":
        lo, hi = 0.0001 * 1000 / T, 0.02 * 1000 / T
        return np.array([lo + (hi - lo) * i / (T - 1) if T > 1 else lo for i in range(T)])
    out = []
    for i in range(T):
        f1 = math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2
        f2 = math.cos(((i + 1) / T + 0.008) / 1.008 * math.pi / 2) ** 2
        out.append(min(1 - f2 / f1, 0.999))
    return np.array(out)


def alphas_cumprod(b: np.ndarray) -> np.ndarray:
    out, running = [], 1.0
    for beta in b:
        running *= 1.0 - beta
        out.append(running)
    return np.array(out)


def space_timesteps(num_train_steps: int, count: int) -> list[int]:
    """IDDPM ``space_timesteps(T, [count])``, one section."""
    if count == 1:
        return [0]
    stride = (num_train_steps - 1) / (count - 1)
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


def respaced_betas(b: np.ndarray, use_timesteps) -> np.ndarray:
    """IDDPM ``SpacedDiffusion.__init__``."""
    last, new = 1.0, []
    for i, abar in enumerate(alphas_cumprod(b)):
        if i in set(use_timesteps):
            new.append(1 - abar / last)
            last = abar
    return np.array(new)


def chain(schedule: str, num_train_steps: int, num_steps: int):
    """(kept timesteps, alpha_bar, alpha_bar_prev, beta) of the respaced chain, cleanest first."""
    ts = space_timesteps(num_train_steps, num_steps)
    b = betas(schedule, num_train_steps)
    abar = alphas_cumprod(b)[ts]
    prev = np.array([1.0] + list(abar[:-1]))
    return np.array(ts), abar, prev, respaced_betas(b, ts)


# ----------------------------------------------------------------------------- solver loops
# ``model(x, t, i)`` returns the model output at step i (training-unit time t): eps, or for DDPM
# with ``learned=True`` a pair (eps, v); velocity for the flow loop. ``zs[i]`` is step i's noise.
# Each loop returns the list of states after every step.

def ddpm_loop(schedule, n, x, model, zs, learned):
    """IDDPM p_sample on the respaced chain (no clipping; 'fixed large' variance if not learned)."""
    ts, abar, prev, beta = chain(schedule, 1000, n)
    post_var = beta * (1 - prev) / (1 - abar)
    clipped = np.log(np.append(post_var[1], post_var[1:])) if n > 1 else np.log(beta)
    fixed_large = np.log(np.append(post_var[1], beta[1:])) if n > 1 else np.log(beta)
    trajectory = []
    for i, k in enumerate(range(n - 1, -1, -1)):
        eps, v = model(x, ts[k], i) if learned else (model(x, ts[k], i), None)
        x0 = math.sqrt(1 / abar[k]) * x - math.sqrt(1 / abar[k] - 1) * eps
        mean = (beta[k] * math.sqrt(prev[k]) / (1 - abar[k]) * x0
                + (1 - prev[k]) * math.sqrt(1 - beta[k]) / (1 - abar[k]) * x)
        if learned:
            frac = (v + 1) / 2
            log_var = frac * np.log(beta[k]) + (1 - frac) * clipped[k]
        else:
            log_var = fixed_large[k]
        x = mean + (k > 0) * np.exp(0.5 * log_var) * zs[i]
        trajectory.append(x)
    return trajectory


def ddim_loop(schedule, n, eta, x, model, zs):
    """DDIM (Song et al. 2021) eq. 12 with sigma from eq. 16 times eta."""
    ts, abar, prev, _ = chain(schedule, 1000, n)
    trajectory = []
    for i, k in enumerate(range(n - 1, -1, -1)):
        eps = model(x, ts[k], i)
        x0 = (x - math.sqrt(1 - abar[k]) * eps) / math.sqrt(abar[k])
        sigma = eta * math.sqrt((1 - prev[k]) / (1 - abar[k]) * (1 - abar[k] / prev[k]))
        x = math.sqrt(prev[k]) * x0 + math.sqrt(1 - prev[k] - sigma ** 2) * eps + sigma * zs[i]
        trajectory.append(x)
    return trajectory


def dpm_pp_2m_loop(schedule, n, x, model):
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2; first order on the first and final step."""
    ts, abar, _, _ = chain(schedule, 1000, n)
    ts, order = ts[::-1], abar[::-1]  # noisiest first
    alpha, sigma = np.sqrt(order), np.sqrt(1 - order)
    lam = np.log(alpha) - np.log(sigma)
    trajectory, x0s = [], []
    for i in range(n):
        x0s.append((x - sigma[i] * model(x, ts[i], i)) / alpha[i])
        if i == n - 1:  # to sigma = 0 (alpha = 1): the data prediction itself
            x = x0s[-1]
        else:
            h = lam[i + 1] - lam[i]
            if i == 0:
                d = x0s[-1]
            else:
                r = (lam[i] - lam[i - 1]) / h
                d = (1 + 1 / (2 * r)) * x0s[-1] - 1 / (2 * r) * x0s[-2]
            x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * (math.exp(-h) - 1) * d
        trajectory.append(x)
    return trajectory


def flow_euler_loop(n, x, model, num_train_steps=1000):
    """Euler on dx/dt = v from t = 1 to 0 in n equal steps; the model sees t * num_train_steps."""
    trajectory = []
    for i in range(n):
        t, t_next = 1 - i / n, 1 - (i + 1) / n
        x = x + (t_next - t) * model(x, t * num_train_steps, i)
        trajectory.append(x)
    return trajectory
