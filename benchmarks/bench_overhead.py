"""Cost of TR-DQ on the bundled digits-dit, side by side in one run.

(a) calibration (trajectory + statistics) and ``quantize`` seconds with the ``trdq`` recipe
    (goal: under 2 minutes on 2 CPU cores);
(b) jitted forward seconds of the quantized model on the ``xla`` backend (online smoothing,
    rotation and per-token activation quantization included) against the float forward on the
    same CFG batch, repetitions interleaved, medians and their ratio (goal <= 1.10x), followed by
    a per-part breakdown of the quantized linear layers (cumulative stages, see ``_stages``).

On CPU an int8 x int8 -> int32 dot is not faster than a float32 one (XLA:CPU has no int8 GEMM
fast path comparable to its float GEMM), so the ratio measures the added work, not a speed-up.

    PYTHONPATH=. python benchmarks/bench_overhead.py [--batch 100] [--reps 20] [--bits W8A8] \\
        [--write BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax import quant as Q
from trdq_jax.sampling.generate import null_label
from trdq_jax.models import input_shape, zoo
from trdq_jax.quant import qlinear
from trdq_jax.sampling import Sampler

BEGIN, END = "<!-- bench_overhead:begin -->", "<!-- bench_overhead:end -->"


def time_calibration(model, params, cfg, recipe, calib_per_class: int):
    """(calibration, qparams, calibrate seconds, quantize seconds) for one recipe."""
    sampler = Sampler.from_config(cfg.sampler)
    labels = np.repeat(np.arange(cfg.model.num_classes), calib_per_class)
    start = time.perf_counter()
    calib = Q.calibrate(model, params, recipe, sampler, labels=labels,
                        null_label=null_label(cfg.model),
                        shape=input_shape(cfg.model, len(labels)), cfg_scale=cfg.sampler.cfg_scale)
    calib_s = time.perf_counter() - start
    start = time.perf_counter()
    qparams = jax.block_until_ready(Q.quantize(params, calib, recipe))
    return calib, qparams, calib_s, time.perf_counter() - start


def interleaved_medians(fns: dict, args: dict, reps: int) -> dict:
    """Median seconds of each jitted ``fns[k](*args[k])``, calls interleaved round-robin so that
    load changes on a shared machine hit every variant alike (one warm-up call each first)."""
    for k, fn in fns.items():
        jax.block_until_ready(fn(*args[k]))
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args[k]))
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def cfg_batch(cfg, batch: int):
    """The CFG batch of a sampler step: ``[x; x]`` with labels ``[y; null]``, ``2 * batch`` rows."""
    x = jax.random.normal(jax.random.key(0), input_shape(cfg.model, batch))
    x = jnp.concatenate([x, x])
    t = jnp.full((2 * batch,), 500.0, jnp.float32)
    labels = jnp.arange(batch, dtype=jnp.int32) % cfg.model.num_classes
    y = jnp.concatenate([labels, jnp.full((batch,), null_label(cfg.model), jnp.int32)])
    return x, t, y


def _stages(q: qlinear.QLinear):
    """Cumulative prefixes of ``qlinear_apply`` (xla backend, segment 0) as jittable functions
    of ``x [M, K]``; each returns one small reduction of its last product (nothing is dead code,
    and no stage pays for an extra pass over an earlier product)."""
    seg = jnp.int32(0)

    def minmax(x):
        return qlinear.token_min_max(qlinear.transform_activation(q, x, seg))

    def quantize(x):
        return qlinear.quantize_activation(q, qlinear.transform_activation(q, x, seg), seg)[0]

    def dot(x):
        return jax.lax.dot_general(quantize(x), qlinear.weight_codes(q, seg),
                                   (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)

    smooth = (lambda x: x / qlinear._select(q.smooth, seg)) if q.smooth is not None else (
        lambda x: x)
    return {"smooth": lambda x: jnp.sum(smooth(x)),
            "+ rotate": lambda x: jnp.sum(qlinear.transform_activation(q, x, seg)),
            "+ per-token min/max": lambda x: sum(jnp.sum(a) for a in minmax(x)),
            "+ quantize": lambda x: jnp.sum(quantize(x).astype(jnp.int32)),
            "+ int8 dot": lambda x: jnp.sum(dot(x)),
            "+ epilogue (= full layer)": lambda x: jnp.sum(qlinear.qlinear_apply(q, x, seg,
                                                                                  "xla"))}


def layer_breakdown(params, qparams, tokens: int, reps: int) -> dict[int, dict[str, float]]:
    """``{K: {stage: seconds}}``: each cumulative stage summed over the quantized layers of input
    width K (``tokens`` rows, the CFG batch's token count), next to the float ``x @ W + b`` of
    the same layers; the number of layers is under the key ``"layers"``."""
    totals: dict[int, dict[str, float]] = {}
    for path in Q.quantized_layer_paths(qparams):
        q, dense = qparams["layers"], params
        for name in path.split("/"):
            q, dense = q[name], dense[name]
        x = jax.random.normal(jax.random.key(1), (tokens, q.in_features))
        fns = {"float x @ W + b": jax.jit(lambda x, d=dense: jnp.sum(
            x @ d["kernel"].astype(jnp.float32) + d["bias"].astype(jnp.float32)))}
        fns.update({k: jax.jit(f) for k, f in _stages(q).items()})
        row = totals.setdefault(q.in_features, {"layers": 0})
        row["layers"] += 1
        for k, v in interleaved_medians(fns, {k: (x,) for k in fns}, reps).items():
            row[k] = row.get(k, 0.0) + v
    return totals


def variant_ratios(model, params, cfg, batch: int, reps: int, w_bits: int, a_bits: int,
                   calib_per_class: int) -> dict[str, float]:
    """Whole-model forward time of each transform added in turn, relative to float (one run,
    interleaved): where the quantized forward's extra time comes from."""
    dyn = dict(w_bits=w_bits, a_bits=a_bits, a_mode="dynamic")
    variants = {
        "minmax (no smoothing, no rotation)": Q.Recipe("v", **dyn),
        "+ smoothing": Q.Recipe("v", smoothing=True, alpha=0.5, **dyn),
        "+ full Hadamard (no smoothing)": Q.Recipe("v", rotation="hadamard", **dyn),
        "+ smoothing + full Hadamard": Q.Recipe("v", smoothing=True, alpha=0.5,
                                                rotation="hadamard", **dyn),
        "trdq": Q.get_recipe("trdq", w_bits, a_bits),
    }
    x, t, y = cfg_batch(cfg, batch)
    denoiser = Q.QuantizedDenoiser(model, "xla")
    quant_fn = jax.jit(lambda p, x, t, y, s: denoiser(p, x, t, y, s, False))
    fns = {"float": jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))}
    args = {"float": (params, x, t, y)}
    for name, recipe in variants.items():
        _, qparams, _, _ = time_calibration(model, params, cfg, recipe, calib_per_class)
        fns[name], args[name] = quant_fn, (qparams, x, t, y, jnp.int32(0))
    medians = interleaved_medians(fns, args, reps)
    return {k: v / medians["float"] for k, v in medians.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100, help="samples; the CFG batch is 2x")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--bits", default="W8A8")
    parser.add_argument("--recipe", default="trdq")
    parser.add_argument("--calib-per-class", type=int, default=2)
    parser.add_argument("--write", default=None, help="markdown file whose section to replace")
    parser.add_argument("--variants", action="store_true",
                        help="only print whole-model ratios with each transform added in turn")
    args = parser.parse_args(argv)
    w_bits, a_bits = (int(v) for v in args.bits.upper().lstrip("W").split("A"))
    model, params, cfg = zoo.load("digits-dit")
    if args.variants:
        for name, ratio in variant_ratios(model, params, cfg, args.batch, args.reps, w_bits,
                                          a_bits, args.calib_per_class).items():
            print(f"  {name:36s} {ratio:.2f}x float", flush=True)
        return
    recipe = Q.get_recipe(args.recipe, w_bits, a_bits)
    calib, qparams, calib_s, quant_s = time_calibration(model, params, cfg, recipe,
                                                        args.calib_per_class)
    print(f"(a) {args.recipe} {args.bits}: calibrate {calib_s:.1f} s + quantize {quant_s:.1f} s "
          f"= {calib_s + quant_s:.1f} s", flush=True)

    x, t, y = cfg_batch(cfg, args.batch)
    float_fn = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
    denoiser = Q.QuantizedDenoiser(model, "xla")
    quant_fn = jax.jit(lambda p, x, t, y, s: denoiser(p, x, t, y, s, False))
    seg = jnp.int32(calib.num_segments - 1)
    medians = interleaved_medians({"float": float_fn, "quantized": quant_fn},
                                  {"float": (params, x, t, y),
                                   "quantized": (qparams, x, t, y, seg)}, args.reps)
    ratio = medians["quantized"] / medians["float"]
    print(f"(b) forward, CFG batch {2 * args.batch}: float {1e3 * medians['float']:.2f} ms, "
          f"{args.recipe} {args.bits} xla {1e3 * medians['quantized']:.2f} ms, "
          f"ratio {ratio:.2f}x", flush=True)
    tokens = 2 * args.batch * (cfg.model.input_size // cfg.model.patch_size) ** 2
    parts = layer_breakdown(params, qparams, tokens, max(5, args.reps // 2))
    for k, row in parts.items():
        print(f"    K={k} ({row['layers']} layers): " + ", ".join(
            f"{name} {1e3 * v:.2f} ms" for name, v in row.items() if name != "layers"), flush=True)

    command = "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in
                                                 ["benchmarks/bench_overhead.py", *sys.argv[1:]])
    section = to_markdown(command, args, calib_s, quant_s, medians, ratio, parts, tokens)
    print(section)
    if args.write:
        from bench_quant import write_section  # same directory (sys.path[0])
        write_section(pathlib.Path(args.write), section, BEGIN, END)


def to_markdown(command, args, calib_s, quant_s, medians, ratio, parts, tokens) -> str:
    import os
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    widths = sorted(parts)
    stages = [s for s in parts[widths[0]] if s != "layers"]
    lines = [BEGIN, "## bench_overhead: calibration time and quantized forward cost", "",
             f"Command: `{command}`  ",
             f"Date: {now}; machine: {platform.machine()} CPU, {len(os.sched_getaffinity(0))} "
             f"cores, jax {jax.__version__}.", "",
             f"(a) digits-dit, `{args.recipe}` {args.bits}, {args.calib_per_class} calibration "
             f"samples per class: calibrate {calib_s:.1f} s + quantize {quant_s:.1f} s = "
             f"**{calib_s + quant_s:.1f} s** (goal < 120 s).", "",
             f"(b) jitted forward on a CFG batch of 2x{args.batch}, {args.reps} interleaved "
             f"repetitions, median: float {1e3 * medians['float']:.2f} ms, quantized (`xla`) "
             f"{1e3 * medians['quantized']:.2f} ms, **ratio {ratio:.2f}x** (goal <= 1.10x).", "",
             f"Breakdown: cumulative stages of `qlinear_apply` on {tokens} tokens, each layer "
             f"timed alone (median), ms summed over the layers of each input width K:", "",
             "| stage | " + " | ".join(f"K={k} ({parts[k]['layers']} layers)" for k in widths)
             + " | all |", "|---" * (len(widths) + 2) + "|"]
    for stage in stages:
        values = [parts[k][stage] for k in widths]
        lines.append(f"| {stage} | " + " | ".join(f"{1e3 * v:.2f}" for v in values)
                     + f" | {1e3 * sum(values):.2f} |")
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
