"""Offline generation throughput of two checkouts side by side (a code change's regression check).

Each run is its own process importing ``trdq_jax`` from one tree (``PYTHONPATH``), generating
``--num-samples`` digits-dit samples in batches of ``--batch`` after one warm-up batch; the
trees alternate (A B A B ...) so that a drifting machine speed hits both alike.

    git worktree add /tmp/oldtree <commit>
    PYTHONPATH=. python benchmarks/ab_generate.py --trees /tmp/oldtree,. [--devices 1]
        [--repeats 3] [--num-samples 384] [--batch 128]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

WORKER = """
import sys, tempfile
from trdq_jax.models import zoo
from trdq_jax.sampling.offline import generate_to_dir
model, params, cfg = zoo.load("digits-dit")
root, n, batch = tempfile.mkdtemp(), int(sys.argv[1]), int(sys.argv[2])
kw = dict(batch_size=batch, source="ab")
generate_to_dir(f"{root}/warm", model, params, cfg, num_samples=batch, **kw)
print(generate_to_dir(f"{root}/run", model, params, cfg, num_samples=n, **kw)["samples_per_s"])
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", required=True, help="two checkouts, comma-separated")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=384)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    trees = [str(pathlib.Path(t).resolve()) for t in args.trees.split(",")]
    rates = {t: [] for t in trees}
    for _ in range(args.repeats):
        for tree in trees:
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": tree,
                   "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
            out = subprocess.run([sys.executable, "-c", WORKER, str(args.num_samples),
                                  str(args.batch)], env=env, capture_output=True, text=True,
                                 check=True)
            rates[tree].append(float(out.stdout.strip().splitlines()[-1]))
            print(tree, rates[tree][-1], flush=True)
    for tree, got in rates.items():
        print(f"{tree}: samples/s {' / '.join(f'{r:.2f}' for r in got)}")


if __name__ == "__main__":
    main()
