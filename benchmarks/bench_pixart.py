"""PixArt-α XL/2 at real shapes on this CPU (issue #23), random weights.

Parts (``--part``, comma-separated; default all), each in a fresh subprocess:

* ``hoist``: the sampler (DDIM, ``--steps`` steps, CFG, batch ``--batch``) on
  ``pixart_config(--preset)`` (28 x 1152, 16 heads, 120 caption tokens of 4096 channels),
  with the caption projection and cross-attention K/V computed once per batch before the step
  loop (``denoise_fn_for(model)``) and at every step (``precompute_cond=False``). Both programs
  are compiled first (outside the timing), then run alternately ``--repeats`` times: medians
  and their ratio, side by side in one process.
* ``flops``: XLA's FLOP count of the whole sampler (``unroll=True``, so every step is
  counted) with the K/V once and per step, from the lowered programs of abstract parameters
  (nothing is allocated or run): the arithmetic the hoisting removes, free of timing noise.
* ``quantize``: ``calibrate`` (``--calib-prompts`` prompts, ``--steps`` steps) + ``quantize``
  with the ``trdq`` recipe at W4A8: seconds of each, the process's peak RSS (``ru_maxrss``:
  includes the random float32 weights), and whole-model bytes (quantized layers + float
  remainder) vs the float model in bfloat16.

Caption embeddings are random normal with a realistic mask (the first 20 of 120 tokens real).

    PYTHONPATH=. python benchmarks/bench_pixart.py [--part hoist,flops,quantize] \\
        [--preset alpha-256] [--steps 4]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

PARTS = ("hoist", "quantize", "flops")


def _setup(preset: str, batch: int, depth: int, seed: int = 0):
    import jax
    from trdq_jax.models.factory import build_model
    from trdq_jax.models.pixart import pixart_config
    cfg = pixart_config(preset, depth=depth)
    params = _random_params(cfg, seed)
    rng = np.random.default_rng(seed)
    cond = {"caption": rng.normal(size=(batch, cfg.max_tokens, cfg.caption_channels))
            .astype(np.float32),
            "mask": (np.arange(cfg.max_tokens)[None] < 20).repeat(batch, 0).astype(np.int32)}
    null = {"caption": rng.normal(size=(cfg.max_tokens, cfg.caption_channels))
            .astype(np.float32),
            "mask": (np.arange(cfg.max_tokens) < 1).astype(np.int32)}
    del jax
    return cfg, build_model(cfg), params, cond, null


def _random_params(cfg, seed: int):
    """Normal weights (scaled by 1/sqrt(fan-in)) for every leaf of the abstract params: one
    draw per leaf, no Flax init program (slow to compile at 610M parameters)."""
    import jax
    from trdq_jax.models.factory import abstract_params
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree.flatten(abstract_params(cfg))
    out = []
    for leaf in leaves:
        scale = 1.0 / np.sqrt(leaf.shape[0]) if len(leaf.shape) >= 2 else 0.02
        out.append((rng.standard_normal(leaf.shape, np.float32) * scale).astype(leaf.dtype))
    return jax.tree.unflatten(tree, out)


def part_hoist(args) -> dict:
    import jax
    from trdq_jax.config import SamplerConfig
    from trdq_jax.sampling.scan_sampler import denoise_fn_for, sample
    from trdq_jax.sampling.solvers import make_sampler
    cfg, model, params, cond, null = _setup(args.preset, args.batch, args.depth)
    sampler = make_sampler(SamplerConfig(num_steps=args.steps))
    shape = (args.batch, cfg.input_size, cfg.input_size, cfg.in_channels)
    fns = {"once": denoise_fn_for(model), "per_step": denoise_fn_for(model, precompute_cond=False)}
    compile_s = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(sample(fn, params, sampler, cond, null_cond=null, seed=0,
                                     cfg_scale=4.5, shape=shape))
        compile_s[name] = round(time.perf_counter() - t0, 2)
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(sample(fn, params, sampler, cond, null_cond=null, seed=0,
                                         cfg_scale=4.5, shape=shape))
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"preset": args.preset, "steps": args.steps, "batch": args.batch,
            "first_call_s": compile_s,
            "median_s": {k: round(v, 3) for k, v in med.items()},
            "per_step_over_once": round(med["per_step"] / med["once"], 3)}


def part_flops(args) -> dict:
    import jax
    import jax.numpy as jnp
    from trdq_jax.config import SamplerConfig
    from trdq_jax.models.factory import abstract_params, build_model
    from trdq_jax.models.pixart import pixart_config
    from trdq_jax.sampling.scan_sampler import denoise_fn_for, sample
    from trdq_jax.sampling.solvers import make_sampler
    cfg = pixart_config(args.preset, depth=args.depth)
    model, length = build_model(cfg), cfg.max_tokens
    sampler = make_sampler(SamplerConfig(num_steps=args.steps))
    cond = {"caption": jax.ShapeDtypeStruct((args.batch, length, cfg.caption_channels),
                                            jnp.float32),
            "mask": jax.ShapeDtypeStruct((args.batch, length), jnp.int32)}
    null = {"caption": np.zeros((length, cfg.caption_channels), np.float32),
            "mask": np.ones((length,), np.int32)}
    shape = (args.batch, cfg.input_size, cfg.input_size, cfg.in_channels)
    out = {}
    for name, fn in (("once", denoise_fn_for(model)),
                     ("per_step", denoise_fn_for(model, precompute_cond=False))):
        run = jax.jit(lambda p, c, fn=fn: sample(fn, p, sampler, c, null_cond=null, seed=0,
                                                 cfg_scale=4.5, shape=shape, unroll=True))
        cost = run.lower(abstract_params(cfg), cond).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out[name] = round(float(cost["flops"]) / 1e9, 1)
    return {"preset": args.preset, "steps": args.steps, "batch": args.batch, "gflop": out,
            "saved_fraction": round(1 - out["once"] / out["per_step"], 4)}


def part_quantize(args) -> dict:
    from trdq_jax import quant as Q
    from trdq_jax.config import SamplerConfig
    from trdq_jax.quant.pipeline import quantize_summary
    from trdq_jax.sampling.solvers import make_sampler
    cfg, model, params, cond, null = _setup(args.preset, args.calib_prompts, args.depth)
    sampler = make_sampler(SamplerConfig(num_steps=args.steps))
    recipe = Q.get_recipe("trdq", 4, 8, num_segments=min(args.steps, 4))
    shape = (args.calib_prompts, cfg.input_size, cfg.input_size, cfg.in_channels)
    t0 = time.perf_counter()
    calib = Q.calibrate(model, params, recipe, sampler, cond=cond, null_cond=null, shape=shape,
                        rows_per_step=64)
    calib_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    qparams = Q.quantize(params, calib, recipe)
    quant_s = time.perf_counter() - t0
    summary = quantize_summary(params, qparams, recipe, quant_s)
    return {"preset": args.preset, "recipe": "trdq W4A8", "calib_prompts": args.calib_prompts,
            "steps": args.steps, "calibrate_s": round(calib_s, 1), "quantize_s": round(quant_s, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
            "weight_only_layers": len(calib.weight_only),
            **{k: summary[k] for k in ("weight_bytes", "bf16_bytes", "ratio_to_bf16",
                                       "model_ratio_to_bf16") if k in summary}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default=",".join(PARTS))
    parser.add_argument("--preset", default="alpha-256")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--depth", type=int, default=28, help="blocks (28: XL/2; fewer: a "
                        "quick check of the script)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib-prompts", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    parts = args.part.split(",")
    if args.child:
        print(json.dumps({"hoist": part_hoist, "quantize": part_quantize,
                          "flops": part_flops}[parts[0]](args)))
        return 0
    results = {"machine": f"{platform.machine()} {platform.processor()}".strip()}
    for part in parts:
        if part not in PARTS:
            parser.error(f"--part: unknown part {part!r} (expected {PARTS})")
        cmd = [sys.executable, __file__, "--child", "--part", part] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("child", "part")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        results[part] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps({part: results[part]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
