"""A generic, resumable training loop: AdamW + warmup/cosine, clipping, EMA, orbax checkpoints.

::

    result = fit(loss_fn, params, lambda step: batch_iterator(arrays, 128, 0, start_step=step),
                 train_cfg, "runs/digits")

``workdir`` layout::

    config.json      the run's config; a resumed run must present the same one
    metrics.jsonl    one JSON object per logged step (appended and flushed)
    checkpoints/N/   orbax CheckpointManager steps (latest 2 kept), full train state

Every step ``s`` (0-based) uses the batch ``batches(start)`` yields at position ``s - start`` and
the rng obtained by splitting the stored rng once per step, so a run killed after a checkpoint and
resumed ends with exactly the params of an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trdq_jax import files
from trdq_jax.config import TrainConfig, dict_diff, to_dict

GRAD_CLIP_NORM = 1.0
_CONFIG_FILE = "config.json"
_METRICS_FILE = "metrics.jsonl"
_CHECKPOINT_DIR = "checkpoints"
_MAX_TO_KEEP = 2

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    """What ``fit`` returns.

    Attributes:
      params: final parameters (pytree of float arrays).
      ema_params: exponential moving average of the parameters, same tree.
      step: number of optimiser steps taken in total (including those before a resume).
      history: logged metrics, one dict per logged step (``step``, ``loss``, ``learning_rate``,
        ``steps_per_sec`` and whatever the loss function reports), oldest first.
    """

    params: Any
    ema_params: Any
    step: int
    history: list[dict]


def learning_rate_schedule(train_cfg: TrainConfig) -> Callable[[jax.Array], jax.Array]:
    """Learning rate as a function of the 0-based update index ``s``.

    ``lr * (s + 1) / W`` for ``s < W`` (linear warmup over ``W = warmup_steps`` updates, the first
    update already uses a non-zero rate), then cosine decay
    ``lr * 0.5 * (1 + cos(pi * (s - W) / (T - W)))`` towards 0 at ``s = T = num_steps``.
    """
    peak = float(train_cfg.learning_rate)
    warmup, total = int(train_cfg.warmup_steps), int(train_cfg.num_steps)
    decay_steps = max(total - warmup, 1)

    def schedule(count):
        s = jnp.asarray(count, jnp.float32)
        warm = peak * (s + 1.0) / max(warmup, 1)
        progress = jnp.clip((s - warmup) / decay_steps, 0.0, 1.0)
        cosine = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(s < warmup, warm, cosine)

    return schedule


def make_optimizer(train_cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping to ``GRAD_CLIP_NORM`` followed by AdamW on the schedule above."""
    return optax.chain(
        optax.clip_by_global_norm(GRAD_CLIP_NORM),
        optax.adamw(learning_rate_schedule(train_cfg), weight_decay=train_cfg.weight_decay))


def ema_update(ema, params, decay: float):
    """``decay * ema + (1 - decay) * params`` leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def fit(loss_fn: LossFn, params, batches: Callable[[int], Iterable] | Iterable,
        train_cfg: TrainConfig, workdir: str | os.PathLike, *, resume: bool = True,
        progress: bool = True, run_config: dict | None = None) -> TrainResult:
    """Train ``params`` for ``train_cfg.num_steps`` steps, checkpointing into ``workdir``.

    Args:
      loss_fn: ``(params, batch, rng) -> (scalar loss, dict of scalar metrics)``; differentiated
        with respect to ``params``.
      params: initial parameter pytree (ignored, except as a shape template, when resuming).
      batches: ``start_step -> iterator`` yielding the batch of every step from ``start_step``
        on (e.g. ``lambda s: batch_iterator(arrays, bs, seed, start_step=s)``). A plain iterable
        is accepted only when the run starts at step 0.
      train_cfg: optimiser and loop settings.
      workdir: directory for ``config.json``, ``metrics.jsonl`` and ``checkpoints/``.
      resume: continue from the latest checkpoint in ``workdir``; when False a ``workdir``
        holding checkpoints is refused.
      progress: show a tqdm bar (only on a terminal).
      run_config: JSON-compatible dict identifying the run (default: ``to_dict(train_cfg)``);
        a resumed run must present the same dict.
    Raises:
      ValueError: bad arguments, or a ``workdir`` holding another run.
      NonFiniteLossError: the loss became NaN/inf; the message names the step.
    """
    if not isinstance(train_cfg, TrainConfig):
        raise ValueError(f"train_cfg: expected a TrainConfig, got {type(train_cfg).__name__}")
    if not jax.tree.leaves(params):
        raise ValueError("params: expected a pytree holding at least one array")
    workdir = pathlib.Path(workdir)
    run_config = to_dict(train_cfg) if run_config is None else run_config
    manager = _open_workdir(workdir, run_config, resume)
    optimizer = make_optimizer(train_cfg)
    state = _initial_state(params, optimizer, train_cfg.seed)
    try:
        latest = manager.latest_step()
        if latest is not None:
            state = _restore(manager, latest, state)
        start = int(state["step"])
        history = _truncate_metrics(workdir / _METRICS_FILE, start)
        if start < train_cfg.num_steps:
            state, history = _run(loss_fn, optimizer, state, _batches_from(batches, start),
                                  train_cfg, workdir, manager, history, progress)
    finally:
        manager.close()
    return TrainResult(params=state["params"], ema_params=state["ema_params"],
                       step=int(state["step"]), history=history)


# ----------------------------------------------------------------------------- the loop


def _initial_state(params, optimizer, seed: int) -> dict:
    params = jax.tree.map(jnp.array, params)  # a copy: the step donates its input buffers
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "ema_params": jax.tree.map(jnp.copy, params), "opt_state": optimizer.init(params),
            "rng": rng}


def _make_train_step(loss_fn: LossFn, optimizer, ema_decay: float):
    def train_step(state, batch):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch, step_rng)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        new_state = {"step": state["step"] + 1, "params": params,
                     "ema_params": ema_update(state["ema_params"], params, ema_decay),
                     "opt_state": opt_state, "rng": jax.random.key_data(rng)}
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0)


def _run(loss_fn, optimizer, state, batch_stream, train_cfg: TrainConfig, workdir, manager,
         history: list[dict], progress: bool):
    train_step = _make_train_step(loss_fn, optimizer, train_cfg.ema_decay)
    schedule = learning_rate_schedule(train_cfg)
    start, total = int(state["step"]), train_cfg.num_steps
    bar = _progress_bar(start, total, progress)
    pending: list[tuple[int, dict]] = []  # per-step device metrics since the last log
    window_start, window_time = start, time.perf_counter()
    try:
        with open(workdir / _METRICS_FILE, "a") as metrics_file:
            for step in range(start, total):
                batch = next(batch_stream, None)
                if batch is None:
                    raise ValueError(f"batches: the iterator ran out at step {step}")
                state, metrics = train_step(state, jax.tree.map(jnp.asarray, batch))
                pending.append((step, metrics))
                done = step + 1
                if bar is not None:
                    bar.update(1)
                if done % train_cfg.log_every == 0 or done == total:
                    now = time.perf_counter()
                    entry = _summarise(pending, done, float(schedule(done - 1)),
                                       (done - window_start) / max(now - window_time, 1e-9))
                    metrics_file.write(json.dumps(entry) + "\n")
                    metrics_file.flush()
                    history.append(entry)
                    if bar is not None:
                        bar.set_postfix(loss=f"{entry['loss']:.4f}",
                                        steps_per_s=f"{entry['steps_per_sec']:.1f}")
                    pending, window_start, window_time = [], done, now
                if done % train_cfg.checkpoint_every == 0 or done == total:
                    _check_finite(pending)
                    _save(manager, done, state)
    finally:
        if bar is not None:
            bar.close()
    return state, history


def _summarise(pending: list[tuple[int, dict]], done: int, lr: float, rate: float) -> dict:
    """Mean of the window's metrics; raises if any step's loss was not finite."""
    _check_finite(pending)
    values = jax.device_get([m for _, m in pending])
    entry = {"step": done}
    for key in sorted(values[0]):
        entry[key] = float(np.mean([float(v[key]) for v in values]))
    entry["learning_rate"] = lr
    entry["steps_per_sec"] = round(rate, 3)
    return entry


def _check_finite(pending: list[tuple[int, dict]]) -> None:
    if not pending:
        return
    losses = np.asarray(jax.device_get([m["loss"] for _, m in pending]), np.float64)
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        step = pending[int(bad[0])][0]
        raise NonFiniteLossError(f"loss is {losses[bad[0]]} at step {step} (0-based); training "
                                 "stopped, the last checkpoint precedes it")


def _batches_from(batches, start: int):
    if callable(batches):
        return iter(batches(start))
    if start:
        raise ValueError(f"batches: resuming at step {start} needs a callable start_step -> "
                         "iterator (e.g. lambda s: batch_iterator(..., start_step=s)), got "
                         f"{type(batches).__name__}")
    return iter(batches)


def _progress_bar(start: int, total: int, progress: bool):
    if not progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm  # not tqdm.auto: in a kernel without ipywidgets it warns
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------- workdir & orbax


def _open_workdir(workdir: pathlib.Path, run_config: dict, resume: bool):
    import orbax.checkpoint as ocp

    try:
        config_json = json.dumps(run_config, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"run_config: expected a JSON-compatible dict ({e})") from None
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"workdir: {str(workdir)!r} exists and is not a directory")
    config_file, ckpt_dir = workdir / _CONFIG_FILE, workdir / _CHECKPOINT_DIR
    has_checkpoints = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if has_checkpoints and not resume:
        raise ValueError(f"workdir: {str(workdir)!r} already holds checkpoints; pass resume=True "
                         "to continue that run or choose an empty directory")
    if config_file.is_file():
        try:
            stored = json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"workdir: {str(config_file)!r} is unreadable ({e}); not a trdq_jax "
                             "training directory") from None
        if stored != json.loads(config_json):
            diffs = "; ".join(dict_diff(stored, json.loads(config_json), "given")) or "(unknown)"
            raise ValueError(f"workdir: {str(workdir)!r} holds a run with a different config: "
                             f"{diffs}. Use another workdir or the original config")
    elif has_checkpoints:
        raise ValueError(f"workdir: {str(workdir)!r} holds checkpoints but no {_CONFIG_FILE}; "
                         "not a trdq_jax training directory")
    else:
        if workdir.is_dir() and any(workdir.iterdir()):
            raise ValueError(f"workdir: {str(workdir)!r} is not empty and holds no trdq_jax run "
                             f"({_CONFIG_FILE}); choose a new or empty directory")
        text = json.dumps(run_config, indent=2, sort_keys=True)
        files.replace_file(config_file, lambda tmp: tmp.write_text(text), arg="workdir")
    options = ocp.CheckpointManagerOptions(max_to_keep=_MAX_TO_KEEP, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(ckpt_dir.absolute(), options=options)


def _save(manager, step: int, state: dict) -> None:
    # Host copies: the device buffers are donated to the next step.
    host_state = jax.tree.map(lambda x: np.array(x, copy=True), state)
    import orbax.checkpoint as ocp
    manager.save(step, args=ocp.args.StandardSave(host_state))
    manager.wait_until_finished()


def _restore(manager, step: int, template: dict) -> dict:
    import orbax.checkpoint as ocp
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
    try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types for mismatched/corrupt trees
        raise ValueError(f"workdir: cannot restore the checkpoint of step {step} into this "
                         f"model's train state: {type(e).__name__}: {e}") from None
    restored = jax.tree.map(jnp.asarray, restored)
    if int(restored["step"]) != step:
        raise ValueError(f"workdir: checkpoint directory {step} holds step {int(restored['step'])}")
    return restored


def _truncate_metrics(path: pathlib.Path, step: int) -> list[dict]:
    """Keep only entries up to ``step`` (a run killed after logging but before checkpointing
    re-logs those steps); drops a torn last line. Returns the kept entries."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("step", math.inf) <= step:
            kept.append(entry)
    text = "".join(json.dumps(e) + "\n" for e in kept)
    files.replace_file(path, lambda tmp: tmp.write_text(text), arg="workdir")
    return kept
