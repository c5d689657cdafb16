"""Full DiT-XL/2 sampling: float vs W8A8 vs W4A8 vs W8A8-fp8 (random weights), time and memory.

The quantized models are built straight from the random float weights (per-channel symmetric
weights, dynamic per-token asymmetric 8-bit activations, no rotation; the default recipe's
layer choice: x/y embedders and the final linear kept in float, adaLN modulation and the
timestep MLP quantized weight-only, W{4,8}A16): calibrating XL is too slow for a benchmark, and
random weights time the same. Each variant runs the whole jitted ``lax.scan`` sampler (CFG
batched); timings are medians over interleaved repetitions.

Memory per variant: the whole model's parameter bytes (``trdq_jax.quant.weight_bytes``:
quantized layers + the float remainder, which keeps ``--float-dtype``) against the bf16 size
of the whole float model (every parameter as 2 bytes), and XLA's compiled estimate for the
sampler program (arguments + outputs + temporaries, temporaries also alone);
``memory_stats()`` peak, where the device reports one, is process-wide (all variants together).
``--memory-only`` compiles and reports memory without sampling.

"rel rms diff" compares final samples with the float variant's: a wiring check only. With
random weights and ``bfloat16`` the float reference is itself far from a float32 run (tens of
per cent here), so use ``--float-dtype float32`` to see the quantization error alone.

On CPU, ``--backend pallas`` runs the kernels in interpret mode (NOT a speed result) and
``auto`` means ``xla``. ``--tiny`` swaps in a two-block width-128 DiT for a CPU smoke run.

    PYTHONPATH=. python benchmarks/bench_sampler.py [--steps 50] [--batch 8] [--backend auto]
        [--reps 3] [--float-dtype bfloat16] [--tiny] [--memory-only]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import trdq_jax.quant as Q
from pallas_kernels import platform
from trdq_jax.config import DiTConfig, SamplerConfig
from trdq_jax.models import build_model, dit_config, init_params, input_shape
from trdq_jax.quant import quantizers
from trdq_jax.sampling import Sampler, denoise_fn_for, sample

_quantize_weight = jax.jit(quantizers.quantize_weight, static_argnames="bits")


def _dense_paths(tree, prefix=()) -> list[str]:
    """Module paths of every Dense (a dict holding a 2-D ``kernel``)."""
    if not hasattr(tree, "items"):
        return []
    if "kernel" in tree and getattr(tree["kernel"], "ndim", 0) == 2:
        return ["/".join(prefix)]
    return [p for name, sub in tree.items() for p in _dense_paths(sub, prefix + (name,))]


def _get(tree, path: str):
    for name in path.split("/"):
        tree = tree[name]
    return tree


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        names = path.split("/")
        node = out
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = value
    return out


def _without(tree, paths: set[str], prefix=()):
    return {name: (_without(sub, paths, prefix + (name,)) if hasattr(sub, "items") else sub)
            for name, sub in tree.items() if "/".join(prefix + (name,)) not in paths}


def quantize_random(params, w_bits: int, a_bits: int = 8, fp8: bool = False) -> dict:
    """``{"float", "layers"}`` qparams from float weights, without calibration (see module doc).

    Layers the default recipe marks weight-only (adaLN modulation, timestep MLP) get
    ``w_bits`` weights and float activations (``a_bits=16``), as ``trdq_jax.quant.quantize``
    gives them; the other selected layers get ``a_bits`` dynamic per-token activations.
    ``fp8``: float8 e4m3 codes (per-channel scales ``max |w| / 448``, symmetric activations).
    """
    recipe = Q.Recipe("bench", w_bits=w_bits, a_bits=a_bits, keep_float=Q.DEFAULT_KEEP_FLOAT,
                      weight_only=Q.DEFAULT_WEIGHT_ONLY)  # no calibration: the DiT's names
    paths = Q.select_layers(_dense_paths(params), recipe).quantized
    layers = {}
    for path in paths:
        dense = _get(params, path)
        kernel = jnp.asarray(dense["kernel"], jnp.float32)
        weight_only = recipe.is_weight_only(path)
        if fp8 and not weight_only:  # weight-only layers keep int8 codes, as quantize does
            scale = quantizers.fp8_scale(jnp.max(jnp.abs(kernel), axis=0))
            w_q = codes = quantizers.quantize_fp8(kernel, scale)
            colsum = jnp.zeros(scale.shape, jnp.int32)
        else:
            codes, scale, _ = _quantize_weight(kernel, bits=w_bits)
            w_q = quantizers.pack_int4(codes) if w_bits <= 4 else codes
            colsum = codes.astype(jnp.int32).sum(0)
        bias = dense.get("bias")
        layers[path] = Q.QLinear(
            w_q=w_q[None], w_scale=scale[None], w_colsum=colsum[None],
            bias=None if bias is None else jnp.asarray(bias, jnp.float32),
            in_features=kernel.shape[0], w_bits=w_bits,
            a_bits=16 if weight_only else a_bits, a_mode="dynamic",
            fp8=fp8 and not weight_only, a_symmetric=fp8 and not weight_only)
    return {"float": _without(params, set(paths)), "layers": _nest(layers)}


@jax.jit
def _randomized(params, key):
    """DiT's adaLN-zero init makes the output exactly 0; perturb every weight so it is not."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [p + (0.02 * jax.random.normal(k, p.shape)).astype(p.dtype)
                                     for p, k in zip(leaves, keys)])


def _nbytes(tree) -> int:
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)))


def _config(args) -> DiTConfig:
    if args.tiny:
        return DiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=128, depth=2,
                         num_heads=2, num_classes=10, dtype=args.float_dtype,
                         param_dtype=args.float_dtype)
    return dit_config("XL/2", dtype=args.float_dtype, param_dtype=args.float_dtype)


def _bf16_bytes(params) -> int:
    """Bytes of the whole float model with every parameter as bfloat16 (the ratios' reference)."""
    return int(sum(leaf.size * 2 for leaf in jax.tree.leaves(params)))


def _param_bytes(p) -> tuple[int, int, int]:
    """``(quantized layers, float remainder, total)`` bytes of a variant's parameters."""
    if isinstance(p, dict) and set(p) == {"float", "layers"}:
        b = Q.weight_bytes(p)
        return b["quantized_layers"], b["float_params"], b["total"]
    return 0, _nbytes(p), _nbytes(p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backend", default="auto", choices=Q.BACKENDS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--float-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--tiny", action="store_true", help="tiny DiT, 2 steps, batch 2")
    parser.add_argument("--memory-only", action="store_true",
                        help="compile and report memory; no sampling, no timings")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.batch, args.reps = 2, 2, 2
    cfg = _config(args)
    backend = platform.backend_name()
    print(f"device: {jax.devices()[0].device_kind} ({backend})  model: "
          f"{'tiny DiT' if args.tiny else 'DiT-XL/2'} {args.float_dtype}  steps: {args.steps}  "
          f"batch: {args.batch} (x2 for CFG)  quantized backend: {args.backend}")
    if backend == "cpu" and args.backend == "pallas" and not args.memory_only:
        print("WARNING: CPU -> Pallas runs in INTERPRET mode; timings are NOT speed results.")

    model = build_model(cfg)
    params = _randomized(init_params(cfg, jax.random.key(0)), jax.random.key(1))
    variants = {"float": (denoise_fn_for(model), params),
                "w8a8": (Q.QuantizedDenoiser(model, args.backend), quantize_random(params, 8)),
                "w4a8": (Q.QuantizedDenoiser(model, args.backend), quantize_random(params, 4)),
                "w8a8fp8": (Q.QuantizedDenoiser(model, args.backend),
                            quantize_random(params, 8, fp8=True))}
    sampler = Sampler.from_config(SamplerConfig(num_steps=args.steps, cfg_scale=4.0))
    labels = np.arange(args.batch) % cfg.num_classes
    shape = input_shape(cfg, args.batch)
    runs = {}
    for name, (apply_fn, p) in variants.items():
        run = jax.jit(lambda p, f=apply_fn: sample(f, p, sampler, labels, seed=0, cfg_scale=4.0,
                                                   null_label=cfg.num_classes, shape=shape))
        compiled = run.lower(p).compile()
        mem = compiled.memory_analysis()
        program = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                            + mem.temp_size_in_bytes, mem.temp_size_in_bytes)
        out = None if args.memory_only else np.asarray(compiled(p))  # warm-up output kept
        runs[name] = (compiled, p, program, out)

    if not args.memory_only:
        _report_times(runs, args.reps)
    bf16 = _bf16_bytes(params)
    mib = lambda b: f"{b / 2 ** 20:.1f}"  # noqa: E731
    print(f"whole-model parameter bytes vs the bf16 float model ({mib(bf16)} MiB); program = "
          "XLA's compiled sampler estimate (arguments + outputs + temporaries)")
    print(f"{'variant':>8} {'layers MiB':>11} {'float MiB':>10} {'total MiB':>10} {'x bf16':>7} "
          f"{'program MiB':>12} {'temp MiB':>9}")
    for name, (_, p, program, _) in runs.items():
        qbytes, fbytes, total = _param_bytes(p)
        prog, temp = ("n/a", "n/a") if program is None else (mib(program[0]), mib(program[1]))
        print(f"{name:>8} {mib(qbytes):>11} {mib(fbytes):>10} {mib(total):>10} "
              f"{total / bf16:>7.3f} {prog:>12} {temp:>9}")
    stats = jax.devices()[0].memory_stats()
    peak = None if not stats else stats.get("peak_bytes_in_use")
    print("device peak_bytes_in_use (process-wide): "
          + ("not reported by this device" if peak is None else f"{peak / 2 ** 20:.1f} MiB"))
    if backend == "cpu" and not args.memory_only:
        print("(CPU timings: a smoke run, not accelerator speed results)")


def _report_times(runs: dict, reps: int) -> None:
    """Median wall seconds of each compiled variant over ``reps`` interleaved runs, and the rel
    rms difference of its final samples from the float variant's."""
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, (compiled, p, _, _) in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(p))
            times[name].append(time.perf_counter() - start)
    ref_out = runs["float"][3]
    t_float = float(np.median(times["float"]))
    print(f"{'variant':>8} {'median s':>9} {'float/x':>8} {'rel rms diff':>13}")
    for name, (_, _, _, out) in runs.items():
        t = float(np.median(times[name]))
        rms = float(np.sqrt(np.mean((out - ref_out) ** 2) / np.mean(ref_out ** 2)))
        print(f"{name:>8} {t:>9.3f} {t_float / t:>8.2f} {rms:>13.3e}")


if __name__ == "__main__":
    main()
