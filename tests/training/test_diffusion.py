"""Diffusion objective against float64 numpy, label dropout, and that a tiny DiT learns."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trdq_jax.config import DiTConfig, TrainConfig
from trdq_jax.models import build_model, init_params
from trdq_jax.training import fit, make_diffusion_loss


class _AffineModel(nn.Module):
    """eps = a * x + c * t / 1000 + e * y; with learn_sigma the variance channel is tanh(d * x)."""

    learn_sigma: bool = False

    @nn.compact
    def __call__(self, x, t, y, train=False):
        a, c, d, e = (self.param(n, nn.initializers.constant(v), ()) for n, v in
                      (("a", 0.7), ("c", 0.3), ("d", 0.9), ("e", 0.05)))
        shape = (-1,) + (1,) * (x.ndim - 1)
        eps = a * x + c * (t / 1000.0).reshape(shape) + e * y.reshape(shape)
        if not self.learn_sigma:
            return eps
        return jnp.concatenate([eps, jnp.tanh(d * x)], axis=-1)


class _Cfg:
    def __init__(self, learn_sigma):
        self.learn_sigma, self.in_channels = learn_sigma, 1


def _linear_acp(steps):
    betas = np.linspace(1e-4 * 1000 / steps, 0.02 * 1000 / steps, steps)
    return betas, np.cumprod(1 - betas)


def _draws(rng, shape, steps):
    t_key, noise_key, _ = jax.random.split(rng, 3)
    t = np.asarray(jax.random.randint(t_key, shape[:1], 0, steps))
    eps = np.asarray(jax.random.normal(noise_key, shape, jnp.float32), np.float64)
    return t, eps


def _batch(shape, seed=0):
    r = np.random.default_rng(seed)
    return (r.uniform(-1, 1, shape).astype(np.float32),
            r.integers(0, 10, shape[0]).astype(np.int32))


@pytest.mark.parametrize("shape", [(16, 4, 4, 1), (6, 3, 4, 4, 1)])  # images and videos
def test_epsilon_mse_matches_numpy(shape):
    model = _AffineModel()
    params = model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1]),
                        jnp.zeros(shape[:1], jnp.int32))["params"]
    loss_fn = make_diffusion_loss(model, _Cfg(False), "linear", 1000)
    x0, y = _batch(shape)
    rng = jax.random.key(42)
    loss, metrics = loss_fn(params, (x0, y), rng)

    _, acp = _linear_acp(1000)
    t, eps = _draws(rng, shape, 1000)
    bshape = (-1,) + (1,) * (len(shape) - 1)
    x = x0.astype(np.float64)
    x_t = np.sqrt(acp[t]).reshape(bshape) * x + np.sqrt(1 - acp[t]).reshape(bshape) * eps
    pred = 0.7 * x_t + 0.3 * (t / 1000.0).reshape(bshape) + 0.05 * y.reshape(bshape)
    want = np.mean((pred - eps) ** 2)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(metrics["mse"]) == pytest.approx(want, rel=1e-5)


def test_min_snr_weighting_matches_numpy():
    shape, gamma = (32, 4, 4, 1), 5.0
    model = _AffineModel()
    params = model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1]),
                        jnp.zeros(shape[:1], jnp.int32))["params"]
    loss_fn = make_diffusion_loss(model, _Cfg(False), "linear", 1000, min_snr_gamma=gamma)
    x0, y = _batch(shape, seed=2)
    rng = jax.random.key(5)
    loss, metrics = loss_fn(params, (x0, y), rng)

    _, acp = _linear_acp(1000)
    t, eps = _draws(rng, shape, 1000)
    bshape = (-1, 1, 1, 1)
    x_t = np.sqrt(acp[t]).reshape(bshape) * x0 + np.sqrt(1 - acp[t]).reshape(bshape) * eps
    pred = 0.7 * x_t + 0.3 * (t / 1000.0).reshape(bshape) + 0.05 * y.reshape(bshape)
    per_example = np.mean((pred - eps) ** 2, axis=(1, 2, 3))
    snr = acp[t] / (1 - acp[t])
    assert np.any(snr > gamma) and np.any(snr < gamma)  # both branches of the min are drawn
    assert float(loss) == pytest.approx(np.mean(np.minimum(snr, gamma) / snr * per_example),
                                        rel=1e-5)
    assert float(metrics["mse"]) == pytest.approx(np.mean(per_example), rel=1e-5)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        make_diffusion_loss(model, _Cfg(False), "linear", 1000, min_snr_gamma=-1.0)


@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_v_prediction_loss_matches_numpy(gamma):
    shape = (32, 4, 4, 1)
    model = _AffineModel()
    params = model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1]),
                        jnp.zeros(shape[:1], jnp.int32))["params"]
    loss_fn = make_diffusion_loss(model, _Cfg(False), "linear", 1000, min_snr_gamma=gamma,
                                  prediction="v")
    x0, y = _batch(shape, seed=3)
    rng = jax.random.key(6)
    loss, metrics = loss_fn(params, (x0, y), rng)

    _, acp = _linear_acp(1000)
    t, eps = _draws(rng, shape, 1000)
    a, b = np.sqrt(acp[t]).reshape(-1, 1, 1, 1), np.sqrt(1 - acp[t]).reshape(-1, 1, 1, 1)
    x_t = a * x0 + b * eps
    pred = 0.7 * x_t + 0.3 * (t / 1000.0).reshape(-1, 1, 1, 1) + 0.05 * y.reshape(-1, 1, 1, 1)
    per_example = np.mean((pred - (a * eps - b * x0)) ** 2, axis=(1, 2, 3))
    snr = acp[t] / (1 - acp[t])
    weight = np.minimum(snr, gamma) / (snr + 1) if gamma else np.ones_like(snr)
    assert float(loss) == pytest.approx(np.mean(weight * per_example), rel=1e-5)
    assert float(metrics["mse"]) == pytest.approx(np.mean(per_example), rel=1e-5)
    with pytest.raises(ValueError, match="prediction"):
        make_diffusion_loss(model, _Cfg(False), prediction="x0")


def _approx_cdf(x):
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_hybrid_vlb_matches_numpy_and_stops_mean_gradient():
    steps, shape = 50, (64, 4, 4, 1)
    model = _AffineModel(learn_sigma=True)
    params = model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1]),
                        jnp.zeros(shape[:1], jnp.int32))["params"]
    loss_fn = make_diffusion_loss(model, _Cfg(True), "linear", steps)
    x0, y = _batch(shape, seed=1)
    x0[:, 0, 0, 0] = -1.0  # exercise the edge bins of the decoder likelihood
    x0[:, 1, 1, 0] = 1.0
    rng = jax.random.key(3)  # draws t = 0 three times
    loss, metrics = loss_fn(params, (x0, y), rng)

    betas, acp = _linear_acp(steps)
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    post_var = betas * (1 - acp_prev) / (1 - acp)
    t, eps = _draws(rng, shape, steps)
    assert (t == 0).any() and (t > 0).any()
    b = lambda v: v[t].reshape(-1, 1, 1, 1)  # noqa: E731
    x = x0.astype(np.float64)
    x_t = np.sqrt(b(acp)) * x + np.sqrt(1 - b(acp)) * eps
    eps_pred = 0.7 * x_t + 0.3 * (t / 1000.0).reshape(-1, 1, 1, 1) + 0.05 * y.reshape(-1, 1, 1, 1)
    mse = np.mean((eps_pred - eps) ** 2)
    # Posterior q(x_{t-1} | x_t, x0) and the model's p(x_{t-1} | x_t).
    mean_of = lambda x0_: (np.sqrt(b(acp_prev)) * b(betas) * x0_  # noqa: E731
                           + np.sqrt(1 - b(betas)) * (1 - b(acp_prev)) * x_t) / (1 - b(acp))
    true_mean = mean_of(x)
    model_mean = mean_of((x_t - np.sqrt(1 - b(acp)) * eps_pred) / np.sqrt(b(acp)))
    log_post = np.log(np.where(t == 0, post_var[1], post_var[t])).reshape(-1, 1, 1, 1)
    frac = (np.tanh(0.9 * x_t) + 1) / 2
    model_log_var = frac * np.log(b(betas)) + (1 - frac) * log_post
    kl = 0.5 * (model_log_var - log_post + np.exp(log_post - model_log_var)
                + (true_mean - model_mean) ** 2 / np.exp(model_log_var) - 1)
    std = np.exp(0.5 * model_log_var)
    upper = np.where(x > 0.999, np.inf, x + 1 / 255)
    lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
    prob = (np.where(np.isinf(upper), 1.0, _approx_cdf((upper - model_mean) / std))
            - np.where(np.isinf(lower), 0.0, _approx_cdf((lower - model_mean) / std)))
    nll = -np.log(np.maximum(prob, 1e-12))
    vb = np.where(t == 0, nll.mean((1, 2, 3)), kl.mean((1, 2, 3))) / np.log(2)
    assert float(metrics["mse"]) == pytest.approx(mse, rel=1e-5)
    assert float(metrics["vb"]) == pytest.approx(vb.mean(), rel=1e-4)
    assert float(loss) == pytest.approx(mse + 0.001 * steps * vb.mean(), rel=1e-5)

    # The VLB trains only the variance: d(loss)/da equals the closed-form d(mse)/da.
    grads = jax.grad(lambda p: loss_fn(p, (x0, y), rng)[0])(params)
    assert float(grads["a"]) == pytest.approx(np.mean(2 * (eps_pred - eps) * x_t), rel=1e-4)
    assert abs(float(grads["d"])) > 1e-6


def test_label_dropout_goes_through_the_model():
    cfg = DiTConfig(input_size=4, in_channels=1, patch_size=2, hidden_size=16, depth=1,
                    num_heads=2, num_classes=3, class_dropout_prob=1.0, learn_sigma=False)
    model = build_model(cfg)
    params = init_params(cfg, jax.random.key(0))
    # Make the label embedding matter (adaLN-Zero outputs start at zero).
    noise = np.random.default_rng(1)
    params = jax.tree.map(lambda p: p + 0.1 * noise.normal(size=p.shape).astype(np.float32), params)
    loss_fn = make_diffusion_loss(model, cfg, "linear", 1000)
    x0, _ = _batch((5, 4, 4, 1))
    rng = jax.random.key(3)
    loss, _ = jax.jit(loss_fn)(params, (x0, np.array([0, 1, 2, 0, 1], np.int32)), rng)

    _, acp = _linear_acp(1000)
    t, eps = _draws(rng, x0.shape, 1000)
    col = lambda v: v[:, None, None, None]  # noqa: E731
    x_t = col(np.sqrt(acp[t])) * x0 + col(np.sqrt(1 - acp[t])) * eps
    apply = jax.jit(lambda labels: model.apply({"params": params}, jnp.asarray(x_t, jnp.float32),
                                               jnp.asarray(t), labels))
    null = apply(jnp.full((5,), 3, jnp.int32))
    labelled = apply(jnp.array([0, 1, 2, 0, 1], jnp.int32))
    want = np.mean((np.asarray(null, np.float64) - eps) ** 2)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(loss) != pytest.approx(np.mean((np.asarray(labelled, np.float64) - eps) ** 2),
                                        rel=1e-3)


def test_tiny_dit_loss_goes_down(tmp_path):
    cfg = DiTConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2,
                    num_heads=2, num_classes=10, learn_sigma=False)
    from trdq_jax.data import batch_iterator, load_digits
    arrays = load_digits("train")
    train_cfg = TrainConfig(num_steps=200, batch_size=32, learning_rate=2e-3, warmup_steps=20,
                            checkpoint_every=1000, log_every=40)
    result = fit(make_diffusion_loss(build_model(cfg), cfg), init_params(cfg, jax.random.key(0)),
                 lambda s: batch_iterator(arrays, 32, 0, start_step=s), train_cfg, tmp_path,
                 progress=False)
    first, last = result.history[0]["mse"], result.history[-1]["mse"]
    # Predicting eps = 0 scores 1.0; a model that learned the digits does far better.
    assert first > 0.5 and last < 0.25, (first, last)


def test_bad_arguments():
    with pytest.raises(ValueError, match="model:"):
        make_diffusion_loss("dit", _Cfg(False))
    with pytest.raises(ValueError, match="model_cfg:"):
        make_diffusion_loss(_AffineModel(), object())
    with pytest.raises(ValueError, match="schedule"):
        make_diffusion_loss(_AffineModel(), _Cfg(False), schedule="quadratic")
