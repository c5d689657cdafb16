"""Latent generation: SD-VAE decode cost and memory (issue #22), random weights everywhere.

Parts (``--part``, comma-separated; default all):

* ``decode``: the SD-VAE (``VAEConfig()``, ``init_vae_params``) decoding ``--batch`` latents
  ``[B, 32, 32, 4]`` to 256x256 uint8 pixels with ``make_decoder(..., chunk=K)`` for each K of
  ``--chunks``, every K in a fresh subprocess: compile seconds (``jit(...).lower().compile()``,
  outside the timing), wall seconds of ``--repeats`` decodes (median), the process's max RSS
  (``wait4``, i.e. ``getrusage`` of the child: includes building the random weights), and the
  VmRSS sampled every 50 ms before and during the timed decodes (what the decode adds).
* ``generation``: a small DiT in latent space (input 32, 4 channels, patch ``--gen-patch``,
  hidden ``--gen-hidden``, depth ``--gen-depth``, 10 classes) saved with the full SD-VAE
  (``checkpoint.save(..., vae=...)``); ``trdq generate --checkpoint`` runs as subprocesses for
  each (samples, decode batch) of ``--gen-runs`` (batch size ``--gen-batch``, ``--set
  sampler.num_steps=--gen-steps``), then ``trdq quantize ... --w-bits 8 --a-bits 8`` (same
  ``--set``) and ``trdq generate --quantized`` for ``--gen-quant-runs`` (no ``--set``: a
  quantized checkpoint fixes its steps): max RSS (``wait4``), peak VmRSS
  (polled from /proc every 0.1 s), wall, and the summary's ``seconds`` / ``decode_seconds``.
* ``dit-xl``: an official-layout DiT-XL/2 256x256 state dict with random non-zero weights
  (written as .safetensors) and a random SD-VAE in the diffusers layout (``save_diffusers_vae``);
  ``trdq convert --input --vae --out`` (wall, max RSS), ``trdq generate --checkpoint --num-samples
  2 --batch-size 2 --set sampler.num_steps=--xl-steps`` (wall, max RSS, decode seconds, PNG
  shape), and with ``--xl-sample`` also ``trdq sample --labels 207 --per-class 2``. The big
  files are deleted at the end unless ``--keep``.

Every trdq command gets ``XDG_CACHE_HOME=WORK/cache`` (a compilation cache private to the run,
emptied first): the first command of a shape compiles, later ones of the same programs reuse.

    PYTHONPATH=. python benchmarks/bench_latent.py [--part decode,generation,dit-xl] \\
        [--out /tmp/bench_latent.json] [--work /tmp/bench_latent]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
MIB = 2 ** 20
PARTS = ("decode", "generation", "dit-xl")


# ----------------------------------------------------------------------------- helpers

def vmrss(pid: int | str = "self") -> int:
    """Resident set of ``pid`` in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run(cmd: list[str], log: pathlib.Path, env: dict | None = None) -> dict:
    """Run ``cmd``; ``{"cmd", "seconds", "max_rss", "peak_vmrss", "stdout", "load_before",
    "load_after"}`` (max RSS from ``wait4``; peak VmRSS polled every 0.1 s). Raises on failure."""
    print(f"$ {shlex.join(cmd)}", flush=True)
    load_before = load_avg()
    peak = [0]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})))
        done = threading.Event()

        def poll():
            while not done.wait(0.1):
                peak[0] = max(peak[0], vmrss(proc.pid))

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        thread.join()
    seconds = time.perf_counter() - start
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{text[-3000:]}")
    res = {"cmd": shlex.join(cmd), "seconds": round(seconds, 2),
           "max_rss": usage.ru_maxrss * 1024, "peak_vmrss": peak[0], "stdout": text[-4000:],
           "load_before": load_before, "load_after": load_avg()}
    print(f"    {seconds:.1f} s, max RSS {res['max_rss'] / MIB:.0f} MiB, load {load_avg()}",
          flush=True)
    return res


def trdq(args: list[str], log: pathlib.Path, work: pathlib.Path) -> dict:
    res = run([sys.executable, "-P", "-m", "trdq_jax.cli", *args], log,
              {"XDG_CACHE_HOME": str(work / "cache")})
    res["cmd"] = "trdq " + shlex.join(args)
    res["summary"] = last_json(res["stdout"])
    return res


def last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def png_shapes(directory: pathlib.Path) -> list[list[int]]:
    from PIL import Image
    shapes = []
    for p in sorted(directory.rglob("*.png"))[:4]:
        with Image.open(p) as im:
            shapes.append(list(np.asarray(im).shape))
    return shapes


# ----------------------------------------------------------------------------- part 1: decode

def decode_child(args) -> None:
    """(Subprocess.) Decode ``--batch`` random latents with chunk ``--chunk``; print DECODE_RESULT."""
    import resource

    import jax
    import jax.numpy as jnp
    from trdq_jax.config import VAEConfig
    from trdq_jax.models.vae import init_vae_params
    from trdq_jax.sampling.decode import make_decoder

    cfg = VAEConfig()
    t = time.perf_counter()
    params = jax.block_until_ready(init_vae_params(cfg, jax.random.key(0)))
    init_s = time.perf_counter() - t
    decode = make_decoder(cfg, params, chunk=args.chunk)
    z = jnp.asarray(np.random.default_rng(0).standard_normal((args.batch, 32, 32, 4),
                                                              dtype=np.float32))
    t = time.perf_counter()
    compiled = decode.lower(z).compile()
    compile_s = time.perf_counter() - t
    mem = {}
    try:
        stats = compiled.memory_analysis()
        mem = {k: int(getattr(stats, k)) for k in ("temp_size_in_bytes", "argument_size_in_bytes",
                                                    "output_size_in_bytes",
                                                    "generated_code_size_in_bytes")
               if hasattr(stats, k)}
    except Exception as e:  # noqa: BLE001 - optional information
        mem = {"error": str(e)[:200]}
    before = vmrss()
    peak = [before]
    done = threading.Event()

    def poll():
        while not done.wait(0.05):
            peak[0] = max(peak[0], vmrss())

    threading.Thread(target=poll, daemon=True).start()
    times, out = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(z))
        times.append(time.perf_counter() - t)
    done.set()
    assert out.shape == (args.batch, 256, 256, 3) and out.dtype == np.uint8, out.shape
    print("DECODE_RESULT " + json.dumps({
        "chunk": args.chunk, "batch": args.batch, "init_seconds": init_s,
        "compile_seconds": compile_s, "times": times, "median_seconds": statistics.median(times),
        "vmrss_before_decode": before, "vmrss_peak_decode": peak[0],
        "ru_maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "xla_memory": mem}), flush=True)


def part_decode(args, work: pathlib.Path) -> list[dict]:
    rows = []
    for k in args.chunks:
        res = run([sys.executable, str(HERE / "bench_latent.py"), "--decode-child",
                   "--chunk", str(k), "--batch", str(args.batch), "--repeats", str(args.repeats)],
                  work / f"decode_k{k}.log")
        line = next(v for v in res["stdout"].splitlines() if v.startswith("DECODE_RESULT "))
        res.update(json.loads(line.split(" ", 1)[1]))
        res.pop("stdout")
        rows.append(res)
        print(f"    chunk {k}: {res['median_seconds']:.1f} s / batch {args.batch}, compile "
              f"{res['compile_seconds']:.1f} s, decode VmRSS {res['vmrss_before_decode'] / MIB:.0f}"
              f" -> {res['vmrss_peak_decode'] / MIB:.0f} MiB", flush=True)
    return rows


# ----------------------------------------------------------------------------- part 2: generation

def make_small_checkpoint(args, path: pathlib.Path) -> dict:
    import jax
    from trdq_jax import checkpoint
    from trdq_jax.config import DiTConfig, ExperimentConfig, SamplerConfig, VAEConfig
    from trdq_jax.models import init_params
    from trdq_jax.models.vae import init_vae_params

    model = DiTConfig(input_size=32, in_channels=4, patch_size=args.gen_patch,
                      hidden_size=args.gen_hidden, depth=args.gen_depth, num_heads=4,
                      num_classes=10)
    cfg = ExperimentConfig(name="latent-small-dit", model=model,
                           sampler=SamplerConfig(num_steps=args.gen_steps, cfg_scale=4.0))
    params = init_params(model, jax.random.key(0))
    # adaLN-Zero init leaves the blocks' modulation at zero: perturb every leaf so that the
    # model computes something (random weights, as everywhere here)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [v + 0.02 * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys)]
    params = jax.tree.unflatten(tree, leaves)
    vae_cfg = VAEConfig()
    vae_params = init_vae_params(vae_cfg, jax.random.key(2))
    checkpoint.save(path, params, cfg, vae=(vae_cfg, vae_params))
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    return {"dit": {"patch": args.gen_patch, "hidden": args.gen_hidden, "depth": args.gen_depth,
                    "params": n, "steps": args.gen_steps},
            "vae_params": sum(int(np.prod(v.shape)) for v in jax.tree.leaves(vae_params))}


def gen_run(source: list[str], n: int, k: int, tag: str, args, work: pathlib.Path) -> dict:
    out = work / f"gen_{tag}_n{n}_k{k}"
    shutil.rmtree(out, ignore_errors=True)
    # a quantized checkpoint fixes its sampler steps (calibrated on that trajectory): --set
    # sampler.num_steps only for the float checkpoint (the quantized one was made with it)
    steps = [] if tag != "float" else ["--set", f"sampler.num_steps={args.gen_steps}"]
    res = trdq(["generate", *source, "--num-samples", str(n), "--batch-size",
                str(args.gen_batch), "--decode-batch", str(k), *steps, "--out", str(out)],
               work / f"gen_{tag}_n{n}_k{k}.log", work)
    res.pop("stdout")
    s = res["summary"]
    res.update({"tag": tag, "num_samples": n, "decode_batch": k, "png_shapes": png_shapes(out),
                "decode_share": s["decode_seconds"] / s["seconds"]})
    print(f"    {tag} N={n} K={k}: {s['seconds']:.1f} s, decode {s['decode_seconds']:.1f} s "
          f"({res['decode_share']:.0%}), png {res['png_shapes'][:1]}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return res


def part_generation(args, work: pathlib.Path) -> dict:
    ckpt = work / "small_ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    info = make_small_checkpoint(args, ckpt)
    runs = [gen_run(["--checkpoint", str(ckpt)], n, k, "float", args, work)
            for n, k in args.gen_runs]
    qdir = work / "small_w8a8"
    shutil.rmtree(qdir, ignore_errors=True)
    quant = None
    if args.gen_quant_runs:
        quant = trdq(["quantize", "--checkpoint", str(ckpt), "--out", str(qdir), "--recipe",
                      "trdq", "--no-choose", "--w-bits", "8", "--a-bits", "8", "--per-class",
                      str(args.gen_quant_per_class), "--set",
                      f"sampler.num_steps={args.gen_steps}"], work / "quantize.log", work)
        quant.pop("stdout")
        runs += [gen_run(["--quantized", str(qdir)], n, k, "W8A8", args, work)
                 for n, k in args.gen_quant_runs]
    return {**info, "quantize": quant, "runs": runs}


# ----------------------------------------------------------------------------- part 3: DiT-XL/2

def write_xl_state_dict(path: pathlib.Path) -> dict:
    from safetensors.numpy import save_file
    sys.path.insert(0, str(ROOT))
    from tests.models.official_dit import official_keys, pos_embed

    dims = dict(depth=28, hidden=1152, in_ch=4, patch=2, num_classes=1000, mlp_hidden=4608,
                out_ch=8, n_tokens=256)
    rng = np.random.default_rng(0)
    sd = {}
    for key, shape in official_keys(**dims).items():
        v = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        v[v == 0] = np.float32(1e-3)  # all non-zero
        sd[key] = v
    sd["pos_embed"] = pos_embed(1152, 16)[None].astype(np.float32)
    n = sum(v.size for v in sd.values())
    save_file(sd, str(path))
    return {"tensors": len(sd), "params": int(n), "bytes": path.stat().st_size}


def part_xl(args, work: pathlib.Path) -> dict:
    import jax
    from trdq_jax.config import VAEConfig
    from trdq_jax.models.convert_vae import save_diffusers_vae
    from trdq_jax.models.vae import init_vae_params

    free = shutil.disk_usage(work).free
    if free < 12e9:
        raise SystemExit(f"dit-xl: {free / 1e9:.1f} GB free under {work}; needs about 12 GB")
    sd_path, vae_dir = work / "dit_xl_2_256_random.safetensors", work / "sd_vae_random"
    ckpt, gen, smp = work / "xl_ckpt", work / "xl_gen", work / "xl_sample"
    for p in (vae_dir, ckpt, gen, smp):
        shutil.rmtree(p, ignore_errors=True)
    t = time.perf_counter()
    info = write_xl_state_dict(sd_path)
    info["write_seconds"] = time.perf_counter() - t
    vae_cfg = VAEConfig()
    save_diffusers_vae(vae_dir, jax.device_get(init_vae_params(vae_cfg, jax.random.key(3))),
                       vae_cfg)
    out = {"state_dict": info, "disk_free_before": free}
    try:
        conv = trdq(["convert", "--input", str(sd_path), "--vae", str(vae_dir), "--out",
                     str(ckpt)], work / "xl_convert.log", work)
        conv.pop("stdout")
        conv["ckpt_bytes"] = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        out["convert"] = conv
        g = trdq(["generate", "--checkpoint", str(ckpt), "--num-samples", "2", "--batch-size",
                  "2", "--set", f"sampler.num_steps={args.xl_steps}", "--out", str(gen)],
                 work / "xl_generate.log", work)
        g.pop("stdout")
        g["png_shapes"] = png_shapes(gen)
        out["generate"] = g
        if args.xl_sample:
            s = trdq(["sample", "--checkpoint", str(ckpt), "--labels", "207", "--per-class", "2",
                      "--set", f"sampler.num_steps={args.xl_steps}", "--out", str(smp)],
                     work / "xl_sample.log", work)
            s.pop("stdout")
            s["files"] = sorted(p.name for p in smp.iterdir())
            out["sample"] = s
    finally:
        if not args.keep:
            sd_path.unlink(missing_ok=True)
            for p in (ckpt, vae_dir, gen, smp):
                shutil.rmtree(p, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- main

def pairs(text: str) -> list[tuple[int, int]]:
    """``"8x8,24x8"`` -> [(8, 8), (24, 8)]: samples x decode batch."""
    out = []
    for item in filter(None, text.split(",")):
        n, k = item.lower().split("x")
        out.append((int(n), int(k)))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--part", default=",".join(PARTS),
                   help=f"comma-separated parts to run, of {', '.join(PARTS)}")
    p.add_argument("--out", type=pathlib.Path, default=None, help="write the results as JSON")
    p.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/bench_latent"),
                   help="scratch directory (checkpoints, logs, compilation cache)")
    p.add_argument("--batch", type=int, default=8, help="decode: latents per decode call")
    p.add_argument("--chunks", default="1,2,8", help="decode: make_decoder chunk sizes")
    p.add_argument("--repeats", type=int, default=1, help="decode: timed decodes (median)")
    p.add_argument("--gen-patch", type=int, default=4)
    p.add_argument("--gen-hidden", type=int, default=192)
    p.add_argument("--gen-depth", type=int, default=3)
    p.add_argument("--gen-steps", type=int, default=4)
    p.add_argument("--gen-batch", type=int, default=8, help="generation: --batch-size")
    p.add_argument("--gen-runs", default="8x8,24x8,8x2",
                   help="float generate runs, SAMPLESxDECODE_BATCH")
    p.add_argument("--gen-quant-runs", default="8x8", help="W8A8 generate runs ('' for none)")
    p.add_argument("--gen-quant-per-class", type=int, default=1)
    p.add_argument("--xl-steps", type=int, default=2)
    p.add_argument("--xl-sample", action="store_true", help="dit-xl: also run trdq sample")
    p.add_argument("--keep", action="store_true", help="dit-xl: keep the big files")
    p.add_argument("--decode-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=8, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.decode_child:
        return decode_child(args)
    args.chunks = [int(v) for v in args.chunks.split(",") if v]
    args.gen_runs, args.gen_quant_runs = pairs(args.gen_runs), pairs(args.gen_quant_runs)
    parts = [v.strip() for v in args.part.split(",") if v.strip()]
    bad = [v for v in parts if v not in PARTS]
    if bad:
        p.error(f"--part: unknown {bad}; choose from {PARTS}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    import jax
    result = {"command": "PYTHONPATH=. python " + shlex.join(
                  ["benchmarks/bench_latent.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()} CPU, {len(os.sched_getaffinity(0))} cores, "
                         f"jax {jax.__version__}",
              "load_start": load_avg()}

    def save():
        if args.out:
            args.out.write_text(json.dumps(result, indent=1, default=str))

    for part in parts:
        t = time.perf_counter()
        if part == "decode":
            result["decode"] = part_decode(args, work)
        elif part == "generation":
            result["generation"] = part_generation(args, work)
        else:
            result["dit-xl"] = part_xl(args, work)
        result[f"{part}_seconds"] = time.perf_counter() - t
        result["load_end"] = load_avg()
        save()
    print(json.dumps(result, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
