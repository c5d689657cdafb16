"""Pallas W8A8 / W4A8 kernels vs a bf16 dot, XLA's int8 ``dot_general`` and XLA's float8
(e4m3) ``dot_general`` on DiT-XL shapes.

Shapes: ``tokens x 1152 @ 1152 x {1152, 3456, 4608}`` (attn proj, qkv, fc1) and
``tokens x 4608 @ 4608 x 1152`` (fc2); PixArt-alpha XL/2 has the same width (1152), so these
are its transformer's shapes too. The fp8 method (``Recipe.fp8``, what ``qlinear_apply`` runs on
the ``xla`` backend) feeds float8_e4m3fn operands with a float32 accumulator, then applies the
per-token x per-channel scales and bias. Every integer method includes its dequantisation epilogue
(zero-point correction, per-token x per-channel scales, bias) and writes float32, as
``qlinear_apply`` does; the bf16 dot writes bf16. Activation codes are prepared beforehand, so
this times the matmuls only. ``w4a4g``: SVDQuant's INT4 format (int4 weights and
activations, a scale and zero point per group of 64 input channels on both sides), XLA's
batched per-group int32 dots (what ``qlinear_apply`` runs on ``xla``) vs
``pallas_kernels.grouped_matmul``. Timings are medians over interleaved repetitions
(each repetition runs every method once, in turn), so drifting clocks or a busy host affect all
methods alike. Ratios > 1 mean the Pallas kernel is faster.

On CPU Pallas only runs in interpret mode: those timings are NOT speed results (the script says
so); use them only to check that the script works.

    PYTHONPATH=. python benchmarks/bench_matmul.py [--tokens 4096] [--reps 10] [--tiny]
        [--block-sizes BM BN BK]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import grouped_matmul, platform, w8a8_matmul
from trdq_jax.quant.quantizers import pack_int4, unpack_int4

SHAPES = [(1152, 1152), (1152, 3456), (1152, 4608), (4608, 1152)]  # (K, N)
GROUP = 64  # SVDQuant's INT4 group size


def _operands(tokens: int, k: int, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    w8 = rng.integers(-127, 128, (k, n)).astype(np.int8)
    w4 = rng.integers(-7, 8, (k, n)).astype(np.int8)
    ops = dict(
        x_bf16=jnp.asarray(rng.standard_normal((tokens, k)), jnp.bfloat16),
        x_q=rng.integers(-128, 128, (tokens, k)).astype(np.int8),
        x_scale=rng.uniform(0.01, 0.1, (tokens, 1)).astype(np.float32),
        x_zero=rng.integers(-20, 20, (tokens, 1)).astype(np.int32),
        w_bf16=jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16),
        x_f8=jnp.asarray(rng.standard_normal((tokens, k)) * 50, jnp.float32).astype(
            jnp.float8_e4m3fn),
        w_f8=jnp.asarray(rng.standard_normal((k, n)) * 50, jnp.float32).astype(
            jnp.float8_e4m3fn),
        w8=w8, w4_packed=np.asarray(pack_int4(jnp.asarray(w4))),
        colsum8=w8.astype(np.int32).sum(0), colsum4=w4.astype(np.int32).sum(0),
        x_q4=rng.integers(-8, 8, (tokens, k)).astype(np.int8),
        xg_scale=rng.uniform(0.01, 0.1, (tokens, k // GROUP)).astype(np.float32),
        xg_zero=rng.integers(-4, 4, (tokens, k // GROUP)).astype(np.int32),
        wg_scale=rng.uniform(0.001, 0.01, (1, k // GROUP, n)).astype(np.float32),
        colsum4g=w4.astype(np.int32).reshape(1, k // GROUP, GROUP, n).sum(2),
        w_scale=rng.uniform(0.001, 0.01, n).astype(np.float32),
        bias=rng.standard_normal(n).astype(np.float32))
    return {name: jax.device_put(v) for name, v in ops.items()}


def _xla_w8a8(x_q, w, x_scale, x_zero, w_scale, colsum, bias):
    acc = jax.lax.dot_general(x_q, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return (acc - x_zero * colsum).astype(jnp.float32) * x_scale * w_scale + bias


def _xla_fp8(x, w, x_scale, w_scale, bias):
    acc = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return acc * x_scale * w_scale + bias


def _xla_grouped(x_q, w, x_scale, x_zero, w_scale, colsum, bias):
    """One int32 dot per group (a batched dot_general), corrected and scaled, summed."""
    groups = w_scale.shape[1]
    lhs = x_q.reshape(x_q.shape[0], groups, GROUP)
    acc = jax.lax.dot_general(lhs, w.reshape(groups, GROUP, -1), (((2,), (1,)), ((1,), (0,))),
                              preferred_element_type=jnp.int32)           # [G, M, N]
    acc = acc - x_zero.T[:, :, None] * colsum[0][:, None, :]
    return jnp.sum(acc.astype(jnp.float32) * x_scale.T[:, :, None] * w_scale[0][:, None, :],
                   axis=0) + bias


def _methods(k: int, blocks) -> dict:
    """name -> (jitted fn, operand names)."""
    int8 = ("x_q", "w8", "x_scale", "x_zero", "w_scale", "colsum8", "bias")
    int4 = ("x_q", "w4_packed", "x_scale", "x_zero", "w_scale", "colsum4", "bias")
    int4g = ("x_q4", "w4_packed", "xg_scale", "xg_zero", "wg_scale", "colsum4g", "bias")
    return {
        "bf16": (jax.jit(jnp.dot), ("x_bf16", "w_bf16")),
        "xla_w8a8": (jax.jit(_xla_w8a8), int8),
        "pallas_w8a8": (jax.jit(lambda *a: w8a8_matmul(*a, block_sizes=blocks)), int8),
        "xla_w4a8": (jax.jit(lambda x, w, *a: _xla_w8a8(x, unpack_int4(w, k), *a)), int4),
        "pallas_w4a8": (jax.jit(lambda *a: w8a8_matmul(*a, w_bits=4, block_sizes=blocks)),
                        int4),
        "xla_fp8": (jax.jit(_xla_fp8), ("x_f8", "w_f8", "x_scale", "w_scale", "bias")),
        "xla_w4a4g": (jax.jit(lambda x, w, *a: _xla_grouped(x, unpack_int4(w, k), *a)), int4g),
        "pallas_w4a4g": (jax.jit(lambda *a: grouped_matmul(*a, group_size=GROUP, w_bits=4)),
                         int4g),
    }


def _interleaved_medians(calls: dict, reps: int) -> dict:
    for fn, args in calls.values():  # compile and warm up
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: 64 tokens, 2 reps")
    parser.add_argument("--block-sizes", type=int, nargs=3, metavar=("BM", "BN", "BK"))
    args = parser.parse_args()
    tokens, reps = (64, 2) if args.tiny else (args.tokens, args.reps)
    backend = platform.backend_name()
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({backend}, generation {platform.chip_generation()})  "
          f"tokens: {tokens}  median of {reps} interleaved reps")
    if backend == "cpu":
        print("WARNING: CPU -> Pallas runs in INTERPRET mode; these timings are NOT speed "
              "results, only a check that the benchmark runs.")
    names = ["bf16", "xla_w8a8", "pallas_w8a8", "xla_w4a8", "pallas_w4a8", "xla_fp8",
             "xla_w4a4g", "pallas_w4a4g"]
    print(f"{'K x N':>12} " + " ".join(f"{n + ' ms':>15}" for n in names)
          + f" {'bf16/p8':>8} {'xla8/p8':>8} {'bf16/p4':>8} {'xla4/p4':>8} {'bf16/f8':>8}"
          + f" {'xla8/f8':>8} {'bf16/pg':>8} {'xlag/pg':>8} {'max rel diff':>12}")
    for k, n in SHAPES:
        ops = _operands(tokens, k, n)
        blocks = tuple(args.block_sizes) if args.block_sizes else None
        calls = {name: (fn, tuple(ops[a] for a in arg_names))
                 for name, (fn, arg_names) in _methods(k, blocks).items()}
        med = _interleaved_medians(calls, reps)
        diff = 0.0
        for xla_name, pallas_name in (("xla_w8a8", "pallas_w8a8"), ("xla_w4a8", "pallas_w4a8"),
                                      ("xla_w4a4g", "pallas_w4a4g")):
            want = np.asarray(calls[xla_name][0](*calls[xla_name][1]))
            got = np.asarray(calls[pallas_name][0](*calls[pallas_name][1]))
            diff = max(diff, float(np.abs(got - want).max() / np.abs(want).max()))
        print(f"{f'{k} x {n}':>12} " + " ".join(f"{med[name] * 1e3:>15.3f}" for name in names)
              + f" {med['bf16'] / med['pallas_w8a8']:>8.2f}"
              + f" {med['xla_w8a8'] / med['pallas_w8a8']:>8.2f}"
              + f" {med['bf16'] / med['pallas_w4a8']:>8.2f}"
              + f" {med['xla_w4a8'] / med['pallas_w4a8']:>8.2f}"
              + f" {med['bf16'] / med['xla_fp8']:>8.2f} {med['xla_w8a8'] / med['xla_fp8']:>8.2f}"
              + f" {med['bf16'] / med['pallas_w4a4g']:>8.2f}"
              + f" {med['xla_w4a4g'] / med['pallas_w4a4g']:>8.2f}"
              + f" {diff:>12.1e}")
    if backend == "cpu":
        print("(interpret-mode timings: not speed results)")


if __name__ == "__main__":
    main()
