"""Offline generation throughput: samples/s of ``trdq generate`` for 1 vs N devices.

Each configuration runs in its own process (the device count is fixed when JAX starts:
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` on the CPU), generating
``--num-samples`` samples of the bundled model into a fresh directory, float and ``trdq`` W8A8,
in batches of ``--batch`` samples whatever the device count (so that the rows differ only in
how the batch is spread).
The rate counts steady batches only: a first run of one batch (its own directory) compiles,
then the timed run generates into a second directory in the same process. Emulated CPU
devices share the same cores, so on a CPU a ratio says how well one batch spread over them
uses those cores, not a multi-chip speed-up; on a TPU slice or a multi-GPU node the same
script measures the real scaling.

    PYTHONPATH=. python benchmarks/bench_generate.py [--model digits-dit] [--devices 1,4]
        [--model-parallel 2] [--num-samples 512] [--batch 128] [--write BENCHMARKS.md]

``--model-parallel M`` adds, per setting, a run on the largest device count with a
``(devices / M) x M`` mesh (parameters split along the model axis).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_quant import write_section  # noqa: E402

BEGIN, END = "<!-- bench_generate:begin -->", "<!-- bench_generate:end -->"
ROOT = pathlib.Path(__file__).resolve().parents[1]

WORKER = """
import json, sys, time
import numpy as np
import trdq_jax.quant as Q
from trdq_jax.models import zoo, input_shape
from trdq_jax.sampling import Sampler
from trdq_jax.sampling.generate import null_label
from trdq_jax.sampling.offline import finished_shards, generate_to_dir
name, setting, n, batch, root, mp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
model, params, cfg = zoo.load(name)
sampler, fn = Sampler.from_config(cfg.sampler), None
if setting != "float":
    recipe = Q.get_recipe("trdq", int(setting[1]), int(setting[3]))
    labels = np.arange(cfg.model.num_classes)
    calib = Q.calibrate(model, params, recipe, sampler, labels=labels,
                        null_label=null_label(cfg.model), shape=input_shape(cfg.model, len(labels)))
    params, fn = Q.quantize(params, calib, recipe), Q.QuantizedDenoiser(model, "xla")
    sampler = sampler.with_segments(calib.segment_of_step, calib.num_segments)
kw = dict(batch_size=batch, apply_fn=fn, sampler=sampler, source=name, model_parallel=mp)
warm = generate_to_dir(f"{root}/warm", model, params, cfg, num_samples=batch, **kw)
run = generate_to_dir(f"{root}/run", model, params, cfg, num_samples=n, **kw)
t0 = time.perf_counter()
assert len(finished_shards(f"{root}/run")) == -(-n // run["shard_size"])  # what a resume checks
run["verify_s"] = time.perf_counter() - t0
print(json.dumps(run))
"""


def measure(model: str, setting: str, devices: int, num_samples: int, batch: int,
            model_parallel: int = 1) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    with tempfile.TemporaryDirectory() as root:
        done = subprocess.run([sys.executable, "-c", WORKER, model, setting, str(num_samples),
                               str(batch), root, str(model_parallel)], env=env,
                              capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-dit")
    parser.add_argument("--devices", default="1,4")
    parser.add_argument("--settings", default="float,W8A8")
    parser.add_argument("--model-parallel", type=int, default=1,
                        help="also run the largest device count on a (D/M) x M mesh")
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128,
                        help="samples per batch on every mesh (a multiple of each data axis)")
    parser.add_argument("--write", default=None)
    args = parser.parse_args(argv)
    devices = [int(d) for d in args.devices.split(",")]
    runs = [(d, 1) for d in devices]
    if args.model_parallel > 1:
        runs.append((max(devices), args.model_parallel))
    rows = []
    for setting in args.settings.split(","):
        for d, mp in runs:
            got = measure(args.model, setting, d, args.num_samples, args.batch, mp)
            rows.append((setting, d, mp, got["samples_per_s"], got["verify_s"]))
            print(rows[-1], flush=True)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "PYTHONPATH=. python benchmarks/bench_generate.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    lines = [BEGIN, "## bench_generate: offline generation throughput", "",
             f"Command: `{command}`  ",
             f"Date: {now}; machine: {platform.machine()} CPU, {os.cpu_count()} cores. "
             f"{args.model}, {args.num_samples} samples in batches of {args.batch} on every "
             "mesh, compiled beforehand (a first batch in its own directory). Emulated CPU "
             "devices share the same cores: a ratio here is what spreading one batch over them "
             "costs or gains on this CPU, not a multi-chip speed-up. Verify: the time to check "
             "every shard of the finished run (manifest lines, sizes, sha256 of shards and PNGs, "
             "indices held), what a resume spends before it generates.", "",
             "| setting | devices | mesh (data x model) | samples/s | x 1 device | verify (s) |",
             "|---|---|---|---|---|---|"]
    base = {s: r for s, d, mp, r, _ in rows if (d, mp) == (devices[0], 1)}
    for setting, d, mp, rate, verify in rows:
        lines.append(f"| {setting} | {d} | {d // mp} x {mp} | {rate:.1f} | "
                     f"{rate / base[setting]:.2f} | {verify:.2f} |")
    lines.append(END)
    section = "\n".join(lines)
    print(section)
    if args.write:
        write_section(pathlib.Path(args.write), section, BEGIN, END)


if __name__ == "__main__":
    main()
