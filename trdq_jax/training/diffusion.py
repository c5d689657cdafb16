"""DDPM training objective: epsilon-prediction MSE, plus the IDDPM hybrid VLB for learned sigma.

For a clean batch ``x0`` the loss draws ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)`` per example,
forms ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` and regresses the model's epsilon output
on ``eps``. With ``learn_sigma`` the model's second half of channels interpolates the log
variance between ``beta_t`` and the posterior variance (IDDPM "learned range"), trained through
``L_vlb`` with the mean held fixed (stop-gradient), weighted so that ``L = L_simple + lambda T L_t``
with ``lambda = 0.001`` (Nichol & Dhariwal 2021; for T = 1000 this is DiT's ``mse + vb``).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax.sampling.schedules import alphas_cumprod, make_betas

HYBRID_LAMBDA = 0.001


def make_diffusion_loss(model: nn.Module, model_cfg, schedule: str = "linear",
                        num_train_steps: int = 1000, min_snr_gamma: float = 0.0,
                        prediction: str = "epsilon"):
    """Build ``loss_fn(params, batch, rng) -> (loss, metrics)`` for ``fit``.

    Args:
      model: Flax module called as ``model.apply({'params': p}, x_t, t, y, train=True,
        rngs={'dropout': r})`` (label dropout for classifier-free guidance happens inside).
      model_cfg: its config; ``learn_sigma`` and ``in_channels`` are read from it.
      schedule: noise schedule name for ``make_betas`` ("linear" or "cosine").
      num_train_steps: number of diffusion steps T.
      min_snr_gamma: 0 for the plain MSE; ``gamma > 0`` weights example ``b``'s MSE by
        ``min(SNR(t_b), gamma) / SNR(t_b)`` (epsilon) or ``min(SNR, gamma) / (SNR + 1)`` (v) with
        ``SNR = acp / (1 - acp)`` (Min-SNR-gamma: both are ``min(SNR, gamma)`` times the x0 MSE).
      prediction: the regression target, "epsilon" or "v" (``sqrt(acp) eps - sqrt(1 - acp) x0``).
    Returns:
      ``loss_fn`` taking ``batch = (x0, y)`` with ``x0`` float ``[B, ..., C]`` (images or videos,
      channels last) and ``y`` int ``[B]``, and a ``jax.random`` key. The key is split as
      ``t_key, noise_key, dropout_key = jax.random.split(rng, 3)``; ``t`` is
      ``jax.random.randint(t_key, (B,), 0, T)`` and ``eps`` is
      ``jax.random.normal(noise_key, x0.shape, float32)``. Metrics: ``mse`` (unweighted, of the
      target) and, with learned sigma, ``vb`` (bits per dimension of the sampled term).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a flax.linen Module, got {type(model).__name__}")
    if not hasattr(model_cfg, "learn_sigma") or not hasattr(model_cfg, "in_channels"):
        raise ValueError(f"model_cfg: expected a diffusion model config with learn_sigma and "
                         f"in_channels, got {type(model_cfg).__name__}")
    betas = make_betas(schedule, num_train_steps)
    tables = _diffusion_tables(betas)
    learn_sigma = bool(model_cfg.learn_sigma)
    channels = int(model_cfg.in_channels)
    steps = int(num_train_steps)
    if isinstance(min_snr_gamma, bool) or not isinstance(min_snr_gamma, (int, float)) \
            or not 0.0 <= min_snr_gamma < float("inf"):
        raise ValueError(f"min_snr_gamma: expected a finite number >= 0, got {min_snr_gamma!r}")
    if prediction not in ("epsilon", "v"):
        raise ValueError(f"prediction: expected 'epsilon' or 'v', got {prediction!r}")
    acp = alphas_cumprod(betas)
    snr = acp / (1.0 - acp)
    denominator = snr if prediction == "epsilon" else snr + 1.0
    weight_table = jnp.asarray(np.minimum(snr, min_snr_gamma) / denominator if min_snr_gamma > 0
                               else np.ones_like(snr), jnp.float32)

    def loss_fn(params, batch, rng):
        x0, y = batch
        x0 = jnp.asarray(x0, jnp.float32)
        batch_size = x0.shape[0]
        t_key, noise_key, dropout_key = jax.random.split(rng, 3)
        t = jax.random.randint(t_key, (batch_size,), 0, steps)
        eps = jax.random.normal(noise_key, x0.shape, jnp.float32)
        x_t = _gather(tables["sqrt_acp"], t, x0) * x0 + _gather(tables["sqrt_1m_acp"], t, x0) * eps
        out = model.apply({"params": params}, x_t, t, y, train=True,
                          rngs={"dropout": dropout_key})
        expected = channels * (2 if learn_sigma else 1)
        if out.shape[-1] != expected:
            raise ValueError(f"model: output has {out.shape[-1]} channels, expected {expected} "
                             f"(in_channels={channels}, learn_sigma={learn_sigma})")
        pred = out[..., :channels]
        if prediction == "v":
            a, b = _gather(tables["sqrt_acp"], t, x0), _gather(tables["sqrt_1m_acp"], t, x0)
            target, eps_pred = a * eps - b * x0, a * pred + b * x_t
        else:
            target, eps_pred = eps, pred
        per_example = jnp.mean((pred - target) ** 2, axis=tuple(range(1, eps.ndim)))
        mse = jnp.mean(per_example)
        weighted = jnp.mean(weight_table[t] * per_example)
        if not learn_sigma:
            return weighted, {"mse": mse}
        vb = _vlb_term(tables, x0, x_t, t, jax.lax.stop_gradient(eps_pred), out[..., channels:])
        vb = jnp.mean(vb)
        return weighted + HYBRID_LAMBDA * steps * vb, {"mse": mse, "vb": vb}

    return loss_fn


def _diffusion_tables(betas: np.ndarray) -> dict[str, jax.Array]:
    """float32 ``[T]`` coefficient tables, computed in float64 on the host."""
    acp = alphas_cumprod(betas)
    acp_prev = np.append(1.0, acp[:-1])
    posterior_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    # Posterior variance is 0 at t = 0; IDDPM clips its log with the t = 1 value.
    clipped = np.append(posterior_var[1], posterior_var[1:]) if len(betas) > 1 else betas
    table = {
        "sqrt_acp": np.sqrt(acp), "sqrt_1m_acp": np.sqrt(1.0 - acp),
        "sqrt_recip_acp": np.sqrt(1.0 / acp), "sqrt_recipm1_acp": np.sqrt(1.0 / acp - 1.0),
        "posterior_log_var": np.log(clipped), "log_betas": np.log(betas),
        "posterior_coef_x0": betas * np.sqrt(acp_prev) / (1.0 - acp),
        "posterior_coef_xt": (1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp),
    }
    return {k: jnp.asarray(v, jnp.float32) for k, v in table.items()}


def _gather(table: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
    """``table[t]`` reshaped to ``[B, 1, ..., 1]`` to broadcast against ``like``."""
    return table[t].reshape((t.shape[0],) + (1,) * (like.ndim - 1))


def _vlb_term(tables, x0, x_t, t, eps_pred, var_values):
    """Per-example ``L_t`` in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0 and the
    discretised decoder NLL at t = 0. ``[B]`` float32."""
    g = lambda name: _gather(tables[name], t, x0)  # noqa: E731
    x0_pred = g("sqrt_recip_acp") * x_t - g("sqrt_recipm1_acp") * eps_pred
    model_mean = g("posterior_coef_x0") * x0_pred + g("posterior_coef_xt") * x_t
    frac = (var_values + 1.0) / 2.0
    model_log_var = frac * g("log_betas") + (1.0 - frac) * g("posterior_log_var")
    true_mean = g("posterior_coef_x0") * x0 + g("posterior_coef_xt") * x_t
    true_log_var = g("posterior_log_var")
    kl = 0.5 * (-1.0 + model_log_var - true_log_var + jnp.exp(true_log_var - model_log_var)
                + (true_mean - model_mean) ** 2 * jnp.exp(-model_log_var))
    nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    axes = tuple(range(1, x0.ndim))
    kl = jnp.mean(kl, axis=axes) / math.log(2.0)
    nll = jnp.mean(nll, axis=axes) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of ``x`` in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2)
    (IDDPM / ADM, with the same tanh approximation of the normal CDF)."""
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
