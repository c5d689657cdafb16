"""Kronecker-factored Hadamard transform vs a dense n x n matmul, both jitted.

Times x [tokens, n] @ (diag(s) H_n / sqrt(n)) for the DiT widths 1152 = 36*2^5 and
4608 = 36*2^7 and prints the two side by side with their ratio (dense / fast; > 1 means the
factored transform is faster). Both use float32 with Precision.HIGHEST.

    PYTHONPATH=. python benchmarks/bench_hadamard.py [--tokens 4096] [--reps 5] [--sizes 1152 4608]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from trdq_jax.quant.hadamard import hadamard_rotation, hadamard_transform, random_signs


def _best_seconds(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1152, 4608])
    args = parser.parse_args()

    fast = jax.jit(hadamard_transform)
    dense = jax.jit(lambda x, r: jnp.matmul(x, r, precision=lax.Precision.HIGHEST))
    print(f"device: {jax.devices()[0].device_kind}  tokens: {args.tokens}  best of {args.reps}")
    print(f"{'n':>6} {'fast ms':>9} {'dense ms':>9} {'dense/fast':>10} {'max |diff|':>11}")
    for n in args.sizes:
        x = jnp.asarray(np.random.default_rng(0).standard_normal((args.tokens, n)), jnp.float32)
        signs = jnp.asarray(random_signs(n, 0))
        rotation = jnp.asarray(hadamard_rotation(n, 0), jnp.float32)
        t_fast = _best_seconds(fast, x, signs, reps=args.reps)
        t_dense = _best_seconds(dense, x, rotation, reps=args.reps)
        diff = float(jnp.abs(fast(x, signs) - dense(x, rotation)).max())
        print(f"{n:>6} {t_fast * 1e3:>9.2f} {t_dense * 1e3:>9.2f} {t_dense / t_fast:>10.1f} "
              f"{diff:>11.2e}")


if __name__ == "__main__":
    main()
