"""The generic loop: schedule, AdamW + clipping + EMA against numpy, resume, clear errors."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trdq_jax.config import TrainConfig
from trdq_jax.training.loop import NonFiniteLossError, fit, learning_rate_schedule


def _quadratic_loss(params, batch, rng):
    """0.5 * mean_b ||w - target_b||^2 (+ b * noise, so the rng stream is exercised)."""
    (targets,) = batch
    noise = jax.random.normal(rng, ())
    loss = 0.5 * jnp.mean(jnp.sum((params["w"][None] - targets) ** 2, -1)) + params["b"] * noise
    return loss, {"noise": noise}


def _target_batches(start):
    step = start
    while True:
        yield (np.random.default_rng(step).normal(size=(4, 3)).astype(np.float32) * 3.0,)
        step += 1


def test_schedule_matches_closed_form():
    cfg = TrainConfig(num_steps=100, warmup_steps=10, learning_rate=2e-3)
    sched = learning_rate_schedule(cfg)
    for s in (0, 4, 9):
        assert float(sched(s)) == pytest.approx(2e-3 * (s + 1) / 10, rel=1e-6)
    for s in (10, 37, 55, 99):
        want = 2e-3 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))
        assert float(sched(s)) == pytest.approx(want, rel=1e-5, abs=2e-9)  # float32
    no_warmup = learning_rate_schedule(TrainConfig(num_steps=50, warmup_steps=0,
                                                   learning_rate=1e-3))
    assert float(no_warmup(0)) == pytest.approx(1e-3)
    assert float(no_warmup(25)) == pytest.approx(0.5e-3, rel=1e-5)


def _numpy_reference(cfg: TrainConfig, w0, b0, num_steps):
    """float64 clip-by-global-norm(1) + AdamW (optax defaults) + EMA, with the same batches and
    the same per-step noise draws as the loop."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    p = np.concatenate([w0, [b0]]).astype(np.float64)
    mu, nu, ema = np.zeros_like(p), np.zeros_like(p), p.copy()
    rng = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    batches = _target_batches(0)
    for s in range(num_steps):
        rng, step_rng = jax.random.split(rng)
        noise = float(jax.random.normal(step_rng, ()))
        (targets,) = next(batches)
        grad = np.concatenate([p[:3] - targets.astype(np.float64).mean(0), [noise]])
        norm = np.linalg.norm(grad)
        if norm > 1.0:
            grad = grad / norm
        mu = b1 * mu + (1 - b1) * grad
        nu = b2 * nu + (1 - b2) * grad ** 2
        adam = (mu / (1 - b1 ** (s + 1))) / (np.sqrt(nu / (1 - b2 ** (s + 1))) + eps)
        warm, total = cfg.warmup_steps, cfg.num_steps
        lr = (cfg.learning_rate * (s + 1) / warm if s < warm else
              cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
        p = p - lr * (adam + cfg.weight_decay * p)
        ema = cfg.ema_decay * ema + (1 - cfg.ema_decay) * p
    return p, ema


def test_adamw_clip_and_ema_match_numpy(tmp_path):
    cfg = TrainConfig(num_steps=30, warmup_steps=5, learning_rate=0.05, weight_decay=0.01,
                      ema_decay=0.9, checkpoint_every=1000, log_every=7, seed=3)
    w0, b0 = np.array([0.5, -1.0, 2.0], np.float32), np.float32(0.25)
    result = fit(_quadratic_loss, {"w": jnp.asarray(w0), "b": jnp.asarray(b0)}, _target_batches,
                 cfg, tmp_path / "run", progress=False)
    p, ema = _numpy_reference(cfg, w0, b0, 30)
    got = np.concatenate([np.asarray(result.params["w"]), [float(result.params["b"])]])
    got_ema = np.concatenate([np.asarray(result.ema_params["w"]), [float(result.ema_params["b"])]])
    np.testing.assert_allclose(got, p, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got_ema, ema, rtol=2e-5, atol=2e-6)
    assert result.step == 30
    # Logged every 7 steps plus the final one; lines are whole JSON objects.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [7, 14, 21, 28, 30] == [h["step"] for h in result.history]
    assert result.history[-1]["learning_rate"] == pytest.approx(
        0.05 * 0.5 * (1 + math.cos(math.pi * 24 / 25)), rel=1e-5)


class _Killed(Exception):
    pass


def _killing_batches(kill_at):
    def batches(start):
        for step, batch in enumerate(_target_batches(start), start):
            if step == kill_at:
                raise _Killed()
            yield batch
    return batches


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    cfg = TrainConfig(num_steps=25, warmup_steps=3, learning_rate=0.05, ema_decay=0.8,
                      checkpoint_every=5, log_every=3, seed=1)
    init = {"w": jnp.zeros(3), "b": jnp.ones(())}
    full = fit(_quadratic_loss, init, _target_batches, cfg, tmp_path / "full", progress=False)
    with pytest.raises(_Killed):  # dies at step 13: last checkpoint 10, metrics logged up to 12
        fit(_quadratic_loss, init, _killing_batches(13), cfg, tmp_path / "cut", progress=False)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["10", "5"]
    starts, served = [], []

    def recording_batches(start):
        starts.append(start)
        for step, batch in enumerate(_target_batches(start), start):
            served.append(step)
            yield batch

    resumed = fit(_quadratic_loss, init, recording_batches, cfg, tmp_path / "cut", progress=False)
    assert resumed.step == 25
    assert starts == [10] and served == list(range(10, 25))  # really resumed, not restarted
    for a, b in zip(jax.tree.leaves((full.params, full.ema_params)),
                    jax.tree.leaves((resumed.params, resumed.ema_params))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # Step 12 was logged before the kill and re-logged after the resume: not duplicated.
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [3, 6, 9, 12, 15, 18, 21, 24, 25]
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["20", "25"]
    # A finished run resumes to itself without training.
    again = fit(_quadratic_loss, init, _killing_batches(0), cfg, tmp_path / "cut", progress=False)
    assert again.step == 25
    np.testing.assert_array_equal(np.asarray(again.params["w"]), np.asarray(resumed.params["w"]))


def test_workdir_with_other_config_or_no_resume_is_refused(tmp_path):
    cfg = TrainConfig(num_steps=4, warmup_steps=1, checkpoint_every=2, log_every=2)
    init = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    fit(_quadratic_loss, init, _target_batches, cfg, tmp_path, progress=False)
    other = TrainConfig(num_steps=4, warmup_steps=1, checkpoint_every=2, log_every=2,
                        learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"workdir: .*different config: learning_rate: "
                                         r"stored 0.0003, given 0.001"):
        fit(_quadratic_loss, init, _target_batches, other, tmp_path, progress=False)
    with pytest.raises(ValueError, match="workdir: .*already holds checkpoints"):
        fit(_quadratic_loss, init, _target_batches, cfg, tmp_path, resume=False, progress=False)


def test_non_finite_loss_names_the_step(tmp_path):
    def batches(start):
        for step, (targets,) in enumerate(_target_batches(start), start):
            if step == 6:
                targets = np.full_like(targets, np.nan)
            yield (targets,)
    cfg = TrainConfig(num_steps=20, warmup_steps=1, checkpoint_every=4, log_every=10)
    with pytest.raises(NonFiniteLossError, match="at step 6 "):
        fit(_quadratic_loss, {"w": jnp.zeros(3), "b": jnp.zeros(())}, batches, cfg, tmp_path,
            progress=False)
    # The checkpoint of step 8 (after the NaN) was never written.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]


def test_bad_arguments(tmp_path):
    init = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    with pytest.raises(ValueError, match="train_cfg"):
        fit(_quadratic_loss, init, _target_batches, {"num_steps": 3}, tmp_path)
    with pytest.raises(ValueError, match="params"):
        fit(_quadratic_loss, {}, _target_batches, TrainConfig(), tmp_path)
