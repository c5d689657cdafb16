"""Compile time of the scan sampler vs step count (10 vs 250 steps) on a tiny model function.

A ``lax.scan`` compiles the step body once, so compile time should barely depend on the number
of steps (ratio near 1); an unrolled Python loop would grow linearly.

    PYTHONPATH=. python benchmarks/bench_compile.py [--solver ddim] [--batch 8]
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


def compile_seconds(solver: str, num_steps: int, batch: int) -> tuple[float, float]:
    """(first call minus a warm call, warm call) in seconds; the difference is trace + compile."""
    sampler = Sampler.from_config(SamplerConfig(solver=solver, num_steps=num_steps,
                                                num_segments=4))
    labels = np.arange(batch, dtype=np.int32) % 10
    args = (tiny_model, _params(4), sampler, labels)
    kwargs = dict(seed=0, null_label=10, shape=(batch, 8, 8, 4))
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
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    print(f"backend={jax.default_backend()} solver={args.solver} batch={args.batch}")
    compile_seconds(args.solver, 5, args.batch)  # process warm-up (first jit, backend init)
    results = {}
    for steps in (10, 250):
        compile_s, run_s = compile_seconds(args.solver, steps, args.batch)
        results[steps] = compile_s
        print(f"steps={steps:4d}  compile={compile_s:.3f}s  run={run_s * 1e3:.1f}ms")
    print(f"compile-time ratio 250/10 steps: {results[250] / results[10]:.2f}")


if __name__ == "__main__":
    main()
