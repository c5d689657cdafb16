"""Compile time of the scan sampler vs step count (10 vs 250 steps) on a tiny model function.

A ``lax.scan`` compiles the step body once, so compile time should barely depend on the number
of steps (ratio near 1); an unrolled Python loop would grow linearly.

    python benchmarks/bench_compile.py [--solver ddim] [--batch 8] [--model digits-dit]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax.config import SamplerConfig
from trdq_jax.sampling import Sampler, sample


def tiny_model(params, x, t, y, segment, share_cfg):
    """Per-pixel 2-layer MLP conditioned on time, label and segment; output has x's shape."""
    del share_cfg
    cond = jnp.sin(t[:, None] / 1000.0 * params["freq"]) + params["label"][y]
    cond = cond + params["segment"][segment]
    h = jnp.tanh(x @ params["w1"] + cond[:, None, None, :])
    return h @ params["w2"]


def _params(channels: int, hidden: int = 32, num_classes: int = 10, num_segments: int = 4):
    keys = jax.random.split(jax.random.key(0), 5)
    normal = lambda k, shape: 0.1 * jax.random.normal(k, shape)  # noqa: E731
    return {"w1": normal(keys[0], (channels, hidden)), "w2": normal(keys[1], (hidden, channels)),
            "freq": normal(keys[2], (hidden,)), "label": normal(keys[3], (num_classes + 1, hidden)),
            "segment": normal(keys[4], (num_segments, hidden))}


def _setup(model_name: str | None, batch: int):
    """(apply_fn, params, per-sample shape, num_classes) for the tiny function or a bundled model."""
    if model_name is None:
        return tiny_model, _params(4), (8, 8, 4), 10
    from trdq_jax.models import input_shape, zoo
    from trdq_jax.sampling import denoise_fn_for
    model, params, cfg = zoo.load(model_name)
    return denoise_fn_for(model), params, input_shape(cfg.model, 1)[1:], cfg.model.num_classes


def compile_seconds(solver: str, num_steps: int, batch: int,
                    model_name: str | None = None) -> tuple[float, float]:
    """(first call minus a warm call, warm call) in seconds; the difference is trace + compile."""
    sampler = Sampler.from_config(SamplerConfig(solver=solver, num_steps=num_steps,
                                                num_segments=4))
    apply_fn, params, sample_shape, num_classes = _setup(model_name, batch)
    labels = np.arange(batch, dtype=np.int32) % num_classes
    args = (apply_fn, params, sampler, labels)
    kwargs = dict(seed=0, null_label=num_classes, shape=(batch, *sample_shape))
    start = time.perf_counter()
    jax.block_until_ready(sample(*args, cfg_scale=4.0, **kwargs))
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(sample(*args, cfg_scale=3.0, **kwargs))
    warm = time.perf_counter() - start
    return first - warm, warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solver", default="ddim",
                        choices=["ddpm", "ddim", "dpm_solver_pp_2m", "flow_euler"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", default=None,
                        help="a bundled model (e.g. digits-dit) instead of the tiny function")
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    print(f"backend={jax.default_backend()} solver={args.solver} batch={args.batch} "
          f"model={args.model or 'tiny function'}")
    compile_seconds(args.solver, 5, args.batch, args.model)  # process warm-up
    results = {}
    for steps in (10, 250):
        compile_s, run_s = compile_seconds(args.solver, steps, args.batch, args.model)
        results[steps] = compile_s
        print(f"steps={steps:4d}  compile={compile_s:.3f}s  run={run_s * 1e3:.1f}ms")
    print(f"compile-time ratio 250/10 steps: {results[250] / results[10]:.2f}")


if __name__ == "__main__":
    main()
