"""Calibration storage before/after: directory bytes, peak memory and PSNR of two code versions.

Two source trees (``--before``, ``--after``: checkouts of this repository, e.g. ``git worktree
add /tmp/before 31502e2``) run side by side in one invocation; every measured command is a
subprocess with ``PYTHONPATH`` set to its tree (checked: ``trdq_jax.__file__`` must lie in it),
``python -P`` (the current directory never shadows it) and ``--no-compile-cache`` (each process
compiles from scratch, alike for both versions). For each bundled diffusion model:

* ``trdq calibrate --model M --out DIR`` with every default (recipe ``trdq``, 4 samples per
  class, 64 sampled rows per step and layer): bytes of DIR (every file), peak RSS of the
  process (``wait4`` max RSS) and its wall seconds;
* ``trdq quantize --calib DIR --w-bits W --a-bits A --out Q`` for each ``--bits``: peak RSS and
  seconds;
* ``trdq sample --quantized Q --per-class P --seed 0`` against ``trdq sample --model M`` (float,
  same noise and labels, run once with the ``--after`` tree): PSNR in dB of the clipped samples
  (data range 2; a video is one image of its stacked frames), as ``bench_quant``.

DiT-XL/2 (``--xl-depth N``, 0 skips it): the ``bench_calibrate_xl`` model (XL/2 widths, RANDOM
weights, N of the 28 blocks), calibrated through the public API (``trdq`` recipe, ``--xl-steps``
DDIM steps, ``--xl-labels`` labels, 64 rows per step) and written with ``save_calibration``, once
per version: directory bytes, max RSS and the sampled VmRSS peak while calibrating. ``--xl-full``
adds a 28-block run of the ``--after`` tree. Both full-depth sizes are also computed from the
array shapes of the stored layers (format 2: ``steps x R x K'`` float32 rows per layer, R = the
rows sampled per step; format 3: the packed Gram ``K'(K'+1)/2`` float32 plus ``steps x min(8, R)
x K'`` rows, float16 when the layer fits) and the formula is checked against every measured
directory.

    PYTHONPATH=. python benchmarks/bench_calib_storage.py --before /tmp/before [--after .] \\
        [--models digits-dit,digits-unet,moving-digits-vdit] [--bits W4A8,W8A8] [--per-class 3] \\
        [--xl-depth 4] [--xl-full] [--work DIR] [--write BENCHMARKS.md]

Every finished command leaves ``<log>.json`` in ``--work``; a rerun with the same ``--work``
reuses it (an interrupted run resumes). ``--write`` replaces the text between ``<!-- bench_calib_storage:begin -->`` and
``<!-- bench_calib_storage:end -->`` in that file (appending the markers if absent).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

import numpy as np

BEGIN, END = "<!-- bench_calib_storage:begin -->", "<!-- bench_calib_storage:end -->"
MODELS = ("digits-dit", "digits-unet", "moving-digits-vdit")
MIB = 2 ** 20
TIE_DB = 0.5
XL_BLOCKS = 28
KEPT_ROWS = 8  # capture.KEPT_ROWS_PER_STEP of format 3
HERE = pathlib.Path(__file__).resolve().parent
STEP_SECONDS: list[float] = []  # of every measured command (also those of a resumed run)


# ----------------------------------------------------------------------------- subprocesses

def run(cmd: list[str], tree: pathlib.Path, log: pathlib.Path, cwd: pathlib.Path) -> dict:
    """Run ``cmd`` with ``PYTHONPATH=tree``; ``{"seconds", "max_rss", "stdout"}`` (max RSS in
    bytes from ``wait4``, this child and its own children). Raises on a non-zero exit."""
    done = log.with_suffix(".json")
    if done.exists():  # a finished step of an interrupted run with the same --work
        print(f"[{tree.name}] (done before) {log.name}", flush=True)
        result = json.loads(done.read_text())
        STEP_SECONDS.append(result["seconds"])
        return result
    env = dict(os.environ, PYTHONPATH=str(tree))
    print(f"[{tree.name}] $ {shlex.join(cmd[3:] if cmd[1] == '-P' else cmd[1:])}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    print(f"    {seconds:.1f} s, max RSS {usage.ru_maxrss / 1024:.0f} MiB", flush=True)
    result = {"seconds": seconds, "max_rss": usage.ru_maxrss * 1024, "stdout": text[-20000:]}
    done.write_text(json.dumps(result))
    STEP_SECONDS.append(seconds)
    return result


def trdq(tree: pathlib.Path, args: list[str], log: pathlib.Path, cwd: pathlib.Path) -> dict:
    return run([sys.executable, "-P", "-m", "trdq_jax.cli", *args, "--no-compile-cache"], tree,
               log, cwd)


def check_tree(tree: pathlib.Path) -> str:
    """Short commit of ``tree`` (plus ``+dirty`` when trdq_jax/ has uncommitted changes), after
    checking that a child with ``PYTHONPATH=tree`` imports trdq_jax from it."""
    out = subprocess.run([sys.executable, "-P", "-c", "import trdq_jax; print(trdq_jax.__file__)"],
                         env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True,
                         text=True, check=True, cwd=tempfile.gettempdir()).stdout.strip()
    if not pathlib.Path(out).resolve().is_relative_to(tree):
        raise SystemExit(f"PYTHONPATH={tree}: trdq_jax imports from {out}, not from that tree")
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "trdq_jax"],
                           capture_output=True, text=True).stdout.strip()
    return commit + ("+dirty" if dirty else "")


def dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def parse_bits(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"W(\d+)A(\d+)", item.strip(), re.IGNORECASE)
        if not m:
            raise ValueError(f"--bits: expected comma-separated WxAy like W4A8, got {item!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def psnr_vs_float(quantized: pathlib.Path, reference: pathlib.Path) -> float:
    """Mean PSNR (dB) of ``trdq sample`` directories, as bench_quant: clipped to [-1, 1], a
    video as one tall image of its frames."""
    from trdq_jax.eval import psnr
    with np.load(quantized / "samples.npz") as q, np.load(reference / "samples.npz") as f:
        a, b = np.clip(q["samples"], -1, 1), np.clip(f["samples"], -1, 1)
        assert np.array_equal(q["labels"], f["labels"])
    if a.ndim == 5:
        a, b = (v.reshape(v.shape[0], -1, *v.shape[-2:]) for v in (a, b))
    return float(psnr(a, b)[1])


# ----------------------------------------------------------------------------- layout formula

def layer_shapes(calib_dir: pathlib.Path) -> list[dict]:
    """Per stored layer: path, array shapes/dtypes of stats.npz (headers only, no data read),
    npz member bytes."""
    meta = json.loads((calib_dir / "metadata.json").read_text())
    layers = [{"path": p, "arrays": {}} for p in meta["layers"]]
    with zipfile.ZipFile(calib_dir / "stats.npz") as z:
        for info in z.infolist():
            i, field = info.filename[:-4].split(".", 1)
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
            layers[int(i)]["arrays"][field] = (shape, np.dtype(dtype), info.file_size)
    return layers


def layer_payload(layer: dict, fmt: int, steps: int | None = None) -> int:
    """Array bytes of one layer in format 2 or 3, from its stored shapes (either format), at
    its own number of calibration steps S or at ``steps``.

    Both: absmax ``[S, K]``, tensor_min/max ``[S]``, weight_absmax ``[K]`` float32. Format 2:
    rows ``[S, R, K']`` float32, R rows sampled per step. Format 3: packed Gram
    ``K'(K'+1)/2`` float32 + gram_rows int64 + rows ``[S, min(8, R), K']`` (float16 when the
    layer fits, as stored)."""
    a = layer["arrays"]
    stored_steps, kept, width = a["rows"][0]
    scale = 1.0 if steps is None else steps / stored_steps
    steps = stored_steps if steps is None else steps
    common = round(sum(int(np.prod(a[f][0])) * 4 for f in ("absmax", "tensor_min",
                                                            "tensor_max")) * scale)
    common += int(np.prod(a["weight_absmax"][0])) * 4
    if "gram" in a:  # stored in format 3: R from the Gram's row count
        with_rows = layer["gram_rows"] // stored_steps
        row_bytes = a["rows"][1].itemsize
    else:
        with_rows, row_bytes = kept, 2
    if fmt == 2:
        return common + steps * with_rows * width * 4
    return common + width * (width + 1) // 2 * 4 + 8 + steps * min(KEPT_ROWS, with_rows) * width \
        * row_bytes


def read_gram_rows(calib_dir: pathlib.Path, layers: list[dict]) -> None:
    """Fill ``layer["gram_rows"]`` (a scalar per layer) of a format-3 directory."""
    if "gram" not in layers[0]["arrays"]:
        return
    with np.load(calib_dir / "stats.npz") as z:
        for i, layer in enumerate(layers):
            layer["gram_rows"] = int(z[f"{i}.gram_rows"])


def blockwise(layers: list[dict], fmt: int, blocks: int, steps: int | None = None) -> int:
    """Array bytes of ``layers`` with their ``blocks_<i>/`` layers repeated to ``blocks``
    blocks (block 0's layers stand for every block: all blocks have the same shapes)."""
    rest = sum(layer_payload(v, fmt, steps) for v in layers if "blocks_" not in v["path"])
    block0 = sum(layer_payload(v, fmt, steps) for v in layers
                 if re.search(r"(^|/)blocks_0/", v["path"]))
    return rest + blocks * block0


# ----------------------------------------------------------------------------- DiT-XL/2 child

def xl_child(args) -> None:
    """(Runs under the measured tree.) Calibrate the bench_calibrate_xl model, write the
    directory; print one JSON line with seconds and sampled VmRSS peaks per phase."""
    sys.path.insert(0, str(HERE))
    import jax
    import trdq_jax.quant as Q
    from bench_calibrate_xl import model_config, random_params  # noqa: E402
    from trdq_jax.config import ExperimentConfig, SamplerConfig
    from trdq_jax.models import build_model, input_shape
    from trdq_jax.quant.calib_io import save_calibration
    from trdq_jax.sampling import Sampler

    peaks: dict[str, int] = {}
    phase = ["setup"]
    done = threading.Event()

    def sample_rss():
        while not done.wait(0.1):
            with open("/proc/self/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
            peaks[phase[0]] = max(peaks.get(phase[0], 0), kb * 1024)

    threading.Thread(target=sample_rss, daemon=True).start()
    cfg = model_config(False, args.xl_depth)
    model = build_model(cfg)
    params = jax.block_until_ready(random_params(cfg, 0))
    sampler = Sampler.from_config(SamplerConfig(num_steps=args.xl_steps, cfg_scale=4.0))
    n = args.xl_labels
    recipe = Q.get_recipe("trdq", 4, 8)
    phase[0] = "calibrate"
    start = time.perf_counter()
    calib = Q.calibrate(model, params, recipe, sampler, labels=np.arange(n) * 7 % cfg.num_classes,
                        null_label=cfg.num_classes, shape=input_shape(cfg, n), seed=0)
    seconds = time.perf_counter() - start
    phase[0] = "save"
    experiment = ExperimentConfig(name="dit-xl-random", model=cfg,
                                  sampler=SamplerConfig(num_steps=args.xl_steps, cfg_scale=4.0))
    save_calibration(pathlib.Path(args.out), calib, recipe, experiment, source={"model": "x"},
                     params_sha256="0" * 64, per_class=n, seed=0, rows_per_step=64)
    done.set()
    print("XL_RESULT " + json.dumps({"calibrate_seconds": seconds, "peaks": peaks}), flush=True)


def run_xl(tree: pathlib.Path, depth: int, args, work: pathlib.Path, tag: str) -> dict:
    out = work / f"xl_{tag}_d{depth}"
    cmd = [sys.executable, str(HERE / pathlib.Path(__file__).name), "--xl-child",
           "--xl-depth", str(depth), "--xl-steps", str(args.xl_steps),
           "--xl-labels", str(args.xl_labels), "--out", str(out)]
    res = run(cmd, tree, work / f"xl_{tag}_d{depth}.log", work)
    line = next(v for v in res["stdout"].splitlines() if v.startswith("XL_RESULT "))
    res.update(json.loads(line.split(" ", 1)[1]))
    res["bytes"] = dir_bytes(out)
    res["stats_bytes"] = (out / "stats.npz").stat().st_size
    layers = layer_shapes(out)
    read_gram_rows(out, layers)
    res["layers"] = layers
    res["depth"] = depth
    res["dir"] = out
    return res


# ----------------------------------------------------------------------------- main

def fixed_recipe_flag(tree: pathlib.Path) -> list[str]:
    """``["--no-choose"]`` where ``tree``'s ``trdq quantize`` chooses trdq's components by
    default (then the fixed recipe is what this benchmark compares), else ``[]``."""
    out = subprocess.run([sys.executable, "-P", "-m", "trdq_jax.cli", "quantize", "--help"],
                         env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True,
                         text=True, check=True).stdout
    return ["--no-choose"] if "--no-choose" in out else []


def bench_model(name: str, trees: dict, bits, per_class: int, work: pathlib.Path) -> dict:
    mdir = work / name
    mdir.mkdir(parents=True, exist_ok=True)
    ref = mdir / "float_samples"
    row = {"model": name, "float": trdq(trees["after"], ["sample", "--model", name, "--per-class",
                                                           str(per_class), "--seed", "0",
                                                           "--out", str(ref)],
                                        mdir / "float_sample.log", mdir)}
    for tag, tree in trees.items():
        calib = mdir / f"calib_{tag}"
        cal = trdq(tree, ["calibrate", "--model", name, "--out", str(calib)],
                   mdir / f"calibrate_{tag}.log", mdir)
        cal["bytes"] = dir_bytes(calib)
        runs = {}
        for w, a in bits:
            label = f"W{w}A{a}"
            qdir, sdir = mdir / f"q_{tag}_{label}", mdir / f"s_{tag}_{label}"
            quant = trdq(tree, ["quantize", "--calib", str(calib), "--w-bits", str(w),
                                "--a-bits", str(a), *fixed_recipe_flag(tree), "--out",
                                str(qdir)],
                         mdir / f"quantize_{tag}_{label}.log", mdir)
            samp = trdq(tree, ["sample", "--quantized", str(qdir), "--per-class", str(per_class),
                               "--seed", "0", "--out", str(sdir)],
                        mdir / f"sample_{tag}_{label}.log", mdir)
            runs[label] = {"quantize": quant, "sample": samp, "psnr": psnr_vs_float(sdir, ref)}
            print(f"    {name} {tag} {label}: PSNR {runs[label]['psnr']:.2f} dB", flush=True)
        row[tag] = {"calibrate": cal, "runs": runs}
    return row


def mib(v: float) -> str:
    return f"{v / MIB:,.1f}"


def to_markdown(command: str, commits: dict, args, rows: list[dict], xl: dict | None,
                total_s: float) -> str:
    import jax
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    b, a = commits["before"], commits["after"]
    lines = [BEGIN, "## bench_calib_storage: calibration directory size, peak memory and PSNR, "
             "format 2 vs format 3", "",
             f"Command: `{command}`  ",
             f"Date: {now}; machine: {platform.machine()} CPU, {len(os.sched_getaffinity(0))} "
             f"cores, jax {jax.__version__}; the measured commands took {total_s / 60:.0f} min "
             "in all.  ",
             f"Before: `{b}` (calibration format 2: every sampled row, float32, 64 per step and "
             f"layer); after: `{a}` (format 3: a packed float32 Gram of every sampled row plus "
             f"{KEPT_ROWS} rows per step, float16). Both run in this one invocation, each "
             "command a subprocess with `PYTHONPATH` at its tree and `--no-compile-cache` "
             "(every process compiles from scratch, alike for both).", ""]
    if rows:
        lines += [f"Bundled models, `trdq calibrate --model M` at its defaults (recipe `trdq`, 4 "
                  "samples per class, 64 rows sampled per step and layer), then `trdq quantize "
                  "--calib DIR --w-bits W --a-bits A` (recipe `trdq`). Peak RSS: `wait4` max "
                  "RSS of the whole process (model loading and compilation included). PSNR: "
                  f"`trdq sample --quantized Q --per-class {args.per_class} --seed 0` against the "
                  "float model's samples from the same noise and labels (clipped, data range 2; "
                  "a video as one image of its frames).", "",
                  "| model | calib MiB before | calib MiB after | after / before | calibrate "
                  "peak RSS MiB before / after | quantize peak RSS MiB before / after | "
                  "calibrate s before / after |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            cb, ca = r["before"]["calibrate"], r["after"]["calibrate"]
            qb = max(v["quantize"]["max_rss"] for v in r["before"]["runs"].values())
            qa = max(v["quantize"]["max_rss"] for v in r["after"]["runs"].values())
            lines.append(f"| {r['model']} | {mib(cb['bytes'])} | **{mib(ca['bytes'])}** "
                         f"({ca['bytes']:,} B) | {ca['bytes'] / cb['bytes']:.3f} | "
                         f"{mib(cb['max_rss'])} / {mib(ca['max_rss'])} | {mib(qb)} / {mib(qa)} | "
                         f"{cb['seconds']:.0f} / {ca['seconds']:.0f} |")
        lines += ["", "| model | bits | PSNR dB before | PSNR dB after | change dB | quantize s "
                  "before / after | quantize peak RSS MiB before / after |",
                  "|---|---|---|---|---|---|---|"]
        worst = 0.0
        for r in rows:
            for label, vb in r["before"]["runs"].items():
                va = r["after"]["runs"][label]
                delta = va["psnr"] - vb["psnr"]
                worst = max(worst, abs(delta))
                lines.append(f"| {r['model']} | {label} | {vb['psnr']:.2f} | {va['psnr']:.2f} | "
                             f"{delta:+.2f} | {vb['quantize']['seconds']:.0f} / "
                             f"{va['quantize']['seconds']:.0f} | "
                             f"{mib(vb['quantize']['max_rss'])} / "
                             f"{mib(va['quantize']['max_rss'])} |")
        dit = next((r for r in rows if r["model"] == "digits-dit"), None)
        lines += [""]
        if dit is not None:
            size = dit["after"]["calibrate"]["bytes"]
            lines.append(f"- digits-dit calibration directory after: {size / 1e6:.2f} MB "
                         f"({size / MIB:.2f} MiB): {'within' if size <= 20e6 else 'OVER'} the "
                         "20 MB bound.")
        lines.append(f"- Largest PSNR change: {worst:.2f} dB "
                     f"({'within' if worst <= TIE_DB else 'OUTSIDE'} the {TIE_DB} dB tie "
                     "margin).")
    if xl is not None:
        lines += xl_markdown(xl, args)
    lines.append(END)
    return "\n".join(lines)


def xl_markdown(xl: dict, args) -> list[str]:
    d = args.xl_depth
    rb, ra = xl["before"], xl["after"]
    lines = ["", f"DiT-XL/2 (`bench_calibrate_xl`'s model: XL/2 widths, RANDOM weights), "
             f"recipe `trdq`, {args.xl_steps} DDIM steps, {args.xl_labels} labels (CFG batch "
             f"{2 * args.xl_labels}: {2 * args.xl_labels * 256} token rows per step, 64 sampled "
             f"per step and layer; the adaLN and timestep-MLP layers see one row per sample, "
             f"{2 * args.xl_labels}), `Q.calibrate` + `save_calibration`. Peak memory: "
             "VmRSS sampled every 0.1 s while calibrating (max RSS of the process, which "
             "includes building the random parameters, in parentheses).", "",
             "| run | calib MiB | calibrate peak VmRSS GiB (max RSS) | calibrate s | "
             "formula MiB (arrays only) |", "|---|---|---|---|---|"]
    runs = [(f"before, {d} of 28 blocks (measured)", rb, 2),
            (f"after, {d} of 28 blocks (measured)", ra, 3)]
    if "after_full" in xl:
        runs.append(("after, 28 blocks (measured)", xl["after_full"], 3))
    for label, r, fmt in runs:
        payload = sum(layer_payload(v, fmt) for v in r["layers"])
        lines.append(f"| {label} | {mib(r['bytes'])} ({r['bytes']:,} B) | "
                     f"{r['peaks'].get('calibrate', 0) / 2 ** 30:.2f} "
                     f"({r['max_rss'] / 2 ** 30:.2f}) | {r['calibrate_seconds']:.0f} | "
                     f"{mib(payload)} ({payload:,} B) |")
    # full-depth sizes from the layout formula, applied to stored format-3 shapes
    if "after_full" in xl:
        shapes, src = xl["after_full"]["layers"], "the 28-block after directory's"
        full2 = sum(layer_payload(v, 2) for v in shapes)
        full3 = sum(layer_payload(v, 3) for v in shapes)
    else:
        src = f"the {d}-block after directory's (block 0 repeated to 28 blocks)"
        full2, full3 = (blockwise(ra["layers"], fmt, XL_BLOCKS) for fmt in (2, 3))
    own2 = sum(layer_payload(v, 2) for v in rb["layers"])  # from the before shapes
    cross2 = sum(layer_payload(v, 2) for v in ra["layers"])  # from the after shapes (R = rows/S)
    own3 = sum(layer_payload(v, 3) for v in ra["layers"])
    lines += ["", f"- Formula check at {d} blocks: format 2 arrays from the before directory's "
              f"shapes {own2:,} B, from the after directory's shapes {cross2:,} B "
              f"({'equal' if own2 == cross2 else 'DIFFERENT'}); measured before directory "
              f"{rb['bytes']:,} B (overhead: npy headers, zip entries, metadata.json "
              f"{rb['bytes'] - own2:,} B). Format 3 arrays {own3:,} B, measured after directory "
              f"{ra['bytes']:,} B (overhead {ra['bytes'] - own3:,} B)."]
    lines.append(f"- Full DiT-XL/2 (28 blocks) from {src} shapes: format 2 **{mib(full2)} MiB** "
                 f"({full2 / 1e9:.3f} GB) vs format 3 **{mib(full3)} MiB** ({full3 / 1e9:.3f} "
                 f"GB) of arrays, plus well under 1 MiB of overhead.")
    lines += ["", "Full DiT-XL/2 (28 blocks), arrays by the layout formula at other step counts "
              "(the per-step parts scale with the steps; the Gram and the rows sampled per step "
              "do not depend on the number of samples). `trdq calibrate --checkpoint` on a "
              "converted DiT uses the sampler config's 50 steps:", "",
              "| calibration steps | format 2 GB | format 3 GB | format 3 / format 2 |",
              "|---|---|---|---|"]
    for steps in sorted({args.xl_steps, 20, 50, 100, 250}):
        f2, f3 = (blockwise(ra["layers"], fmt, XL_BLOCKS, steps) for fmt in (2, 3))
        lines.append(f"| {steps} | {f2 / 1e9:.3f} | {f3 / 1e9:.3f} | {f3 / f2:.2f} |")
    lines.append("")
    if "after_full" in xl:
        extrap = blockwise(ra["layers"], 3, XL_BLOCKS)
        f = xl["after_full"]
        lines.append(f"- Measured 28-block after directory: **{f['bytes'] / 1e9:.3f} GB** "
                     f"({f['bytes']:,} B; {'within' if f['bytes'] <= 2e9 else 'OVER'} the 2 GB "
                     f"bound); the {d}-block shapes repeated to 28 blocks predict {extrap:,} B "
                     "of arrays.")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=pathlib.Path, help="source tree of the old version")
    parser.add_argument("--after", type=pathlib.Path, default=HERE.parent,
                        help="source tree of the new version (default: this checkout)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated bundled models ('' for none)")
    parser.add_argument("--bits", default="W4A8,W8A8")
    parser.add_argument("--per-class", type=int, default=3, help="PSNR samples per class")
    parser.add_argument("--xl-depth", type=int, default=4,
                        help="DiT-XL/2 blocks of the before/after XL runs (0: no XL runs)")
    parser.add_argument("--xl-full", action="store_true",
                        help="also calibrate the 28-block DiT-XL/2 with the --after tree")
    parser.add_argument("--xl-steps", type=int, default=20)
    parser.add_argument("--xl-labels", type=int, default=2)
    parser.add_argument("--work", type=pathlib.Path, default=None,
                        help="directory for calibrations, checkpoints, samples and logs "
                             "(default: a new temporary one, kept)")
    parser.add_argument("--write", default=None, help="markdown file whose section to replace")
    parser.add_argument("--xl-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.xl_child:
        return xl_child(args)
    if args.before is None:
        parser.error("--before: the old version's source tree is required")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    commits = {k: check_tree(v) for k, v in trees.items()}
    print(f"before: {trees['before']} ({commits['before']}); after: {trees['after']} "
          f"({commits['after']})", flush=True)
    work = (args.work or pathlib.Path(tempfile.mkdtemp(prefix="bench_calib_storage_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory: {work}", flush=True)
    bits = parse_bits(args.bits)
    rows = [bench_model(m, trees, bits, args.per_class, work)
            for m in filter(None, args.models.split(","))]
    xl = None
    if args.xl_depth:
        xl = {tag: run_xl(tree, args.xl_depth, args, work, tag) for tag, tree in trees.items()}
        if args.xl_full:
            xl["after_full"] = run_xl(trees["after"], XL_BLOCKS, args, work, "after")
    command = "PYTHONPATH=. python " + shlex.join(["benchmarks/bench_calib_storage.py",
                                                   *(argv if argv is not None else sys.argv[1:])])
    section = to_markdown(command, commits, args, rows, xl, sum(STEP_SECONDS))
    print(section)
    if args.write:
        sys.path.insert(0, str(HERE))
        from bench_quant import write_section
        write_section(pathlib.Path(args.write), section, BEGIN, END)
        print(f"wrote the section into {args.write}")


if __name__ == "__main__":
    main()
