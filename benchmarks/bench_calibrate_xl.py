"""DiT-XL/2 calibrate + quantize on the CPU: stage times, peak host memory and bytes.

The model has RANDOM weights (``init_params`` plus N(0, 0.02) noise on every parameter, so the
adaLN-zero layers are not exactly zero): no checkpoint is needed, and the cost of calibration
and quantization depends on the shapes, not on the values. Quality numbers would mean nothing
and are not reported.

What runs is the public API, as a user would call it::

    calib = trdq_jax.quant.calibrate(model, params, recipe, sampler, labels=..., null_label=...,
                                     shape=..., progress=True)
    qparams = trdq_jax.quant.quantize(params, calib, recipe, progress=True)

with ``recipe = get_recipe(--recipe, w_bits, a_bits)`` and a DDIM sampler of ``--steps`` steps.
The statistics do not depend on the bit widths, so one calibration serves every ``--bits``
entry (each is quantized from it). Reported:

* wall seconds per stage (``trdq_jax.quant.timing``: the stages ``calibrate``/``quantize``
  mark), both inclusive and self (a stage nested in another, e.g. ``gptq`` inside
  ``alpha_search``, is subtracted from its parent's self time), and the time spent outside
  every stage;
* peak host memory: ``getrusage`` max RSS of the whole process, and the peak of a 0.1 s
  ``/proc/self/status`` VmRSS sampler per phase;
* seconds per ``quantize_layer`` call, summarised per layer kind (``attn/qkv``, ``mlp/fc2``,
  ...) as the first call (which compiles) and the median of the later ones;
* bytes: the checkpoint ``save_quantized`` writes (to a temporary directory, removed after),
  and the whole model's parameter bytes (``weight_bytes(qparams)["total"]``: quantized layers
  + float remainder) against the bf16 size of the whole float model (every parameter as 2
  bytes);
* the calibration directory ``save_calibration`` writes (what ``trdq calibrate`` stores; to a
  temporary directory, removed after): its bytes, the seconds to write it and to load it back
  with every check of ``load_calibration``.

``--calibrate-only`` stops after the calibration directory (no quantization).

``--duquant`` also times the ``trdq_release`` recipe's DuQuant greedy rotation search
(``trdq_jax.quant.duquant.calibrate_duquant``, block 128) on ``--duquant-rows`` random rows
with planted outlier channels at the XL widths K=1152 and K=4608, once each, and extrapolates
to what ``trdq_release`` runs: one search per integer layer (84 at K=1152, 28 at K=4608) x 6
alphas x 4 segments.

    PYTHONPATH=. python benchmarks/bench_calibrate_xl.py [--bits W4A8] [--steps 20]
        [--labels 2] [--recipe trdq] [--duquant] [--depth 28] [--tiny] [--write BENCHMARKS.md]

``--depth N`` keeps the XL widths but builds N of the 28 blocks (minutes instead of hours);
the quantize time is then extrapolated to 28 blocks from the block layers' steady per-call
cost, and calibration is scaled by 28/N (the peak memory is NOT extrapolated: the float
parameters and statistics of the missing blocks, about 0.2 GiB per block, are not held).

``--write`` replaces the text between ``<!-- bench_calibrate_xl:begin -->`` and
``<!-- bench_calibrate_xl:end -->`` in that file (appending the markers if absent).
``--tiny`` swaps in a two-block width-128 DiT (a smoke run of this script, seconds).
"""
from __future__ import annotations

import os

# As in bench_quant: numpy's small rotation matmuls thrash with a multi-threaded OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import trdq_jax.quant as Q  # noqa: E402
from trdq_jax.config import DiTConfig, SamplerConfig  # noqa: E402
from trdq_jax.models import build_model, dit_config, init_params, input_shape  # noqa: E402
from trdq_jax.quant import duquant, timing, transform  # noqa: E402
from trdq_jax.sampling import Sampler  # noqa: E402

BEGIN, END = "<!-- bench_calibrate_xl:begin -->", "<!-- bench_calibrate_xl:end -->"
MIB = 2 ** 20
# trdq_release: one DuQuant search per integer layer x alpha x segment (DiT-XL/2 widths).
XL_DUQUANT_LAYERS = {1152: 84, 4608: 28}  # qkv, proj, fc1 read K=1152; fc2 reads K=4608
RELEASE_ALPHAS, RELEASE_SEGMENTS = 6, 4


def parse_bits(text: str) -> list[tuple[int, int]]:
    """``"W4A8,W8A8"`` -> ``[(4, 8), (8, 8)]``; ``ValueError`` naming a malformed entry."""
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"W(\d+)A(\d+)", item.strip().upper())
        if not m:
            raise ValueError(f"--bits: expected entries like W4A8, got {item!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def model_config(tiny: bool, depth: int | None = None) -> DiTConfig:
    """DiT-XL/2 at 256 px (32x32x4 latents, 256 tokens, width 1152, 28 blocks, 1000 classes),
    with ``depth`` blocks when given, or a two-block width-128 DiT for a smoke run."""
    if tiny:
        return DiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=128, depth=2,
                         num_heads=2, num_classes=10)
    return dit_config("XL/2", **({} if depth is None else {"depth": depth}))


@jax.jit
def _perturbed(params, key):
    """Every float32 parameter plus N(0, 0.02) noise (DiT's adaLN-zero init is exactly 0)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape, p.dtype)
                                     for p, k in zip(leaves, keys)])


def random_params(cfg: DiTConfig, seed: int = 0):
    """Random float32 params of ``cfg`` (see ``_perturbed``)."""
    return _perturbed(init_params(cfg, jax.random.key(seed)), jax.random.key(seed + 1))


class RssMonitor:
    """Samples the process's resident set (``VmRSS`` of ``/proc/self/status``) every
    ``interval`` s on a daemon thread; ``peak[phase]`` is the largest value seen (bytes) while
    ``phase`` (set by the caller) was current."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.phase, self.layer = interval, "setup", None
        self.peak: dict[str, int] = collections.defaultdict(int)
        self.layer_peak: dict[str, int] = collections.defaultdict(int)  # while ``layer`` set
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        """Current resident set in bytes (0 where /proc is unavailable)."""
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self):
        while not self._stop.wait(self.interval):
            phase, layer, rss = self.phase, self.layer, self.rss()
            self.peak[phase] = max(self.peak[phase], rss)
            if layer is not None:
                self.layer_peak[layer] = max(self.layer_peak[layer], rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def max_rss_bytes() -> int:
    """``getrusage`` peak resident set of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@contextlib.contextmanager
def self_times():
    """Yield ``{stage: self seconds}``: time in each ``timing.stage`` block minus the time of
    the stages nested inside it. Wraps ``timing.stage`` for the duration of the block (the
    library calls it as ``timing.stage(...)``), still calling the original so ``timing.record``
    sees everything; single-threaded callers only."""
    original, own, stack = timing.stage, collections.Counter(), []

    @contextlib.contextmanager
    def stage(name: str):
        frame = [time.perf_counter(), 0.0]  # start, seconds of the nested stages
        stack.append(frame)
        try:
            with original(name):
                yield
        finally:
            stack.pop()
            elapsed = time.perf_counter() - frame[0]
            own[name] += elapsed - frame[1]
            if stack:
                stack[-1][1] += elapsed

    timing.stage = stage
    try:
        yield own
    finally:
        timing.stage = original


@contextlib.contextmanager
def layer_times(monitor: RssMonitor):
    """Yield ``{layer path: seconds}`` of every ``quantize_layer`` call ``quantize`` makes
    (wrapping ``trdq_jax.quant.transform.quantize_layer``, which it calls by that name) and
    point ``monitor.layer`` at the layer being quantized."""
    original, seconds = transform.quantize_layer, {}

    def timed(*args, **kwargs):
        path = args[-1] if len(args) >= 7 else kwargs.get("path", "?")
        monitor.layer = path
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[path] = time.perf_counter() - start
            monitor.layer = None

    transform.quantize_layer = timed
    try:
        yield seconds
    finally:
        transform.quantize_layer = original


def _dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_checkpoint(qparams, cfg, recipe, segment_of_step) -> tuple[float, int | str]:
    """``(seconds, bytes)`` of ``save_quantized`` into a temporary directory (removed after);
    ``(seconds, "error message")`` when saving fails, so the timings already paid for are
    still reported."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_calibrate_xl_"))
    start = time.perf_counter()
    try:
        Q.save_quantized(tmp / "q", qparams, cfg, recipe, segment_of_step)
        return time.perf_counter() - start, _dir_bytes(tmp / "q")
    except Exception as e:  # noqa: BLE001 (reported in the table, the run goes on)
        print(f"WARNING: save_quantized failed: {type(e).__name__}: {e}", flush=True)
        return time.perf_counter() - start, f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def calibration_dir_cost(calib, recipe, cfg: DiTConfig, steps: int, labels: int, seed: int,
                         monitor: RssMonitor) -> dict:
    """``{"bytes", "save_seconds", "load_seconds"}`` of the calibration directory of ``calib``
    (``save_calibration`` into a temporary directory, ``load_calibration`` back, removed
    after); ``{"error": message}`` when writing or reading fails."""
    from trdq_jax.config import ExperimentConfig
    from trdq_jax.quant.calib_io import load_calibration, save_calibration
    experiment = ExperimentConfig(name="dit-xl-random", model=cfg,
                                  sampler=SamplerConfig(num_steps=steps, cfg_scale=4.0))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_calibrate_xl_calib_"))
    try:
        monitor.phase = "save calibration"
        start = time.perf_counter()
        out = save_calibration(tmp / "calib", calib, recipe, experiment, source={"model": "x"},
                               params_sha256="0" * 64, per_class=labels, seed=seed,
                               rows_per_step=64)
        saved = time.perf_counter() - start
        size = _dir_bytes(out)
        monitor.phase = "load calibration"
        start = time.perf_counter()
        loaded = load_calibration(out)
        seconds = time.perf_counter() - start
        del loaded
        return {"bytes": size, "save_seconds": saved, "load_seconds": seconds}
    except Exception as e:  # noqa: BLE001 (reported, the run goes on)
        print(f"WARNING: calibration directory failed: {type(e).__name__}: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _phase(name: str, monitor: RssMonitor, fn):
    """``(fn(), {"seconds", "inclusive", "self", "layers"})``: ``fn`` run as memory phase
    ``name``; ``layers``: seconds per ``quantize_layer`` call."""
    monitor.phase = name
    start = time.perf_counter()
    with timing.record() as inclusive, self_times() as own, layer_times(monitor) as layers:
        out = jax.block_until_ready(fn())
    return out, {"seconds": time.perf_counter() - start, "inclusive": dict(inclusive),
                 "self": dict(own), "layers": layers}


def run_quantization(args) -> dict:
    """Calibrate once, quantize at every ``--bits``; times, memory and bytes (see module doc)."""
    cfg = model_config(args.tiny, args.depth)
    n = args.labels
    with RssMonitor() as monitor:
        model = build_model(cfg)
        params = jax.block_until_ready(random_params(cfg, args.seed))
        num_params = int(sum(p.size for p in jax.tree.leaves(params)))
        bf16 = 2 * num_params
        sampler = Sampler.from_config(SamplerConfig(num_steps=args.steps, cfg_scale=4.0))
        labels = np.arange(n) * 7 % cfg.num_classes
        first_bits = parse_bits(args.bits)[0]
        base = Q.get_recipe(args.recipe, *first_bits, search_weights=args.search_weights)
        calib, cal = _phase("calibrate", monitor, lambda: Q.calibrate(
            model, params, base, sampler, labels=labels, null_label=cfg.num_classes,
            shape=input_shape(cfg, n), seed=args.seed, progress=True))
        calib_dir = calibration_dir_cost(calib, base, cfg, args.steps, n, args.seed, monitor)
        runs = []
        for w_bits, a_bits in ([] if args.calibrate_only else parse_bits(args.bits)):
            recipe = base.with_bits(w_bits, a_bits)
            name = f"W{w_bits}A{a_bits}"
            qparams, quant = _phase(f"quantize {name}", monitor,
                                    lambda: Q.quantize(params, calib, recipe, progress=True))
            monitor.phase = f"save {name}"
            save_s, ckpt = save_checkpoint(qparams, cfg, recipe, calib.segment_of_step)
            wb = Q.weight_bytes(qparams)
            runs.append({"bits": name, "quantize": quant, "save_seconds": save_s,
                         "checkpoint_bytes": ckpt, "weight_bytes": wb,
                         "ratio": wb["total"] / bf16,
                         "layers": len(Q.quantized_layer_paths(qparams))})
            del qparams
    model_name = "tiny DiT (smoke run)" if args.tiny else "DiT-XL/2" + (
        "" if args.depth in (None, 28) else f" widths, {args.depth} of its 28 blocks")
    return {"model": model_name, "depth": cfg.depth, "layer_peak": dict(monitor.layer_peak),
            "num_params": num_params, "bf16_bytes": bf16, "steps": args.steps, "labels": n,
            "recipe": f"{args.recipe} (search_weights={args.search_weights!r})",
            "segments": int(calib.num_segments), "calibrate": cal, "calib_dir": calib_dir,
            "runs": runs, "peak_rss": dict(monitor.peak), "max_rss": max_rss_bytes()}


def planted_outliers(rows: int, k: int, seed: int = 0) -> np.ndarray:
    """float32 ``[rows, k]`` N(0, 1) activations whose every 64th channel is scaled by 20-50
    (the few large channels that DuQuant's rotations spread out)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[:, ::64] *= rng.uniform(20.0, 50.0, size=len(range(0, k, 64))).astype(np.float32)
    return x


def time_duquant(rows: int, block: int = 128, seed: int = 0) -> dict:
    """Seconds of one ``calibrate_duquant`` per XL width (after one warm-up at that width, so
    compilation is excluded) and the extrapolated ``trdq_release`` total."""
    seconds = {}
    for k in XL_DUQUANT_LAYERS:
        x = planted_outliers(rows, k, seed)
        duquant.calibrate_duquant(x, block, seed=seed)  # compile at this shape
        start = time.perf_counter()
        jax.block_until_ready(duquant.calibrate_duquant(x, block, seed=seed + 1))
        seconds[k] = time.perf_counter() - start
    per_pass = sum(seconds[k] * count for k, count in XL_DUQUANT_LAYERS.items())
    return {"rows": rows, "block": block, "seconds": seconds,
            "total_seconds": per_pass * RELEASE_ALPHAS * RELEASE_SEGMENTS}


def _stage_rows(phases: list[tuple[str, dict]]) -> list[str]:
    """Markdown table: one row per stage, one column per phase (self s, inclusive s where it
    differs), then the time outside every stage and the phase total."""
    names = list(dict.fromkeys(s for _, ph in phases for s in ph["inclusive"]))
    lines = ["| stage | " + " | ".join(name for name, _ in phases) + " |",
             "|---|" + "---|" * len(phases)]
    for stage in names:
        cells = []
        for _, ph in phases:
            inc, own = ph["inclusive"].get(stage), ph["self"].get(stage)
            if inc is None:
                cells.append("")
            elif own is None or abs(own - inc) < 0.05:
                cells.append(f"{inc:.1f}")
            else:
                cells.append(f"{own:.1f} (incl. {inc:.1f})")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    outside = [ph["seconds"] - sum(ph["self"].values()) for _, ph in phases]
    lines.append("| outside every stage | " + " | ".join(f"{s:.1f}" for s in outside) + " |")
    lines.append("| **total** | " + " | ".join(f"**{ph['seconds']:.1f}**" for _, ph in phases)
                 + " |")
    return lines


def layer_kind(path: str) -> str:
    """``blocks_3/mlp/fc2`` -> ``mlp/fc2``; paths outside the blocks are their own kind."""
    return re.sub(r"^blocks_\d+/", "", path)


def steady_layer_seconds(layers: dict[str, float]) -> dict[str, tuple[float, float, int]]:
    """Per layer kind: ``(first call s, median of the later calls s or nan, count)``; the first
    call of a shape pays the compilation, the later ones show the steady cost."""
    kinds: dict[str, list[float]] = collections.defaultdict(list)
    for path, sec in layers.items():
        kinds[layer_kind(path)].append(sec)
    return {k: (v[0], float(np.median(v[1:])) if len(v) > 1 else float("nan"), len(v))
            for k, v in kinds.items()}


def extrapolate_quantize(layers: dict[str, float], depth: int, full: int = 28) -> float | None:
    """Quantize seconds of a ``full``-block model from a ``depth``-block run: the block layers'
    steady per-call cost times the missing blocks, added to the measured time (None when no
    block layer ran twice)."""
    kinds = steady_layer_seconds(layers)
    block = {k: v for k, v in kinds.items() if any(p.startswith("blocks_") and
                                                   layer_kind(p) == k for p in layers)}
    if depth >= full or not block or any(np.isnan(v[1]) for v in block.values()):
        return None
    return sum(layers.values()) + (full - depth) * sum(v[1] for v in block.values())


def _dominant(phases: list[tuple[str, dict]]) -> str:
    own = collections.Counter()
    for _, ph in phases:
        own.update(ph["self"])
    if not own:
        return "no stage recorded"
    stage, seconds = own.most_common(1)[0]
    total = sum(ph["seconds"] for _, ph in phases)
    return f"`{stage}` ({seconds:.0f} s self, {100 * seconds / total:.0f}% of {total:.0f} s)"


def _checkpoint_cell(value) -> str:
    if isinstance(value, str):
        return f"not written ({value[:120]})".replace("|", "/")
    return f"{value / MIB:.1f}"


def to_markdown(res: dict | None, dq: dict | None, command: str) -> str:
    """The marked section for BENCHMARKS.md."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [BEGIN, "## bench_calibrate_xl: DiT-XL/2 calibration + quantization cost", "",
             f"Command: `{command}`  ",
             f"Date: {now}; machine: {platform.machine()} {jax.devices()[0].platform.upper()}, "
             f"{len(os.sched_getaffinity(0))} cores, jax {jax.__version__}.  "]
    if res is not None:
        lines += [f"{res['model']} with RANDOM weights ({res['num_params'] / 1e6:.0f}M float32 "
                  f"parameters; costs depend on shapes, not values), recipe `{res['recipe']}` "
                  f"({res['segments']} segments), {res['labels']} calibration labels (CFG "
                  f"batch {2 * res['labels']}), {res['steps']} DDIM steps.", ""]
        phases = [("calibrate", res["calibrate"])] + [
            (f"quantize {r['bits']}", r["quantize"]) for r in res["runs"]]
        lines += ["Wall seconds per stage (self time; a stage's inclusive time in parentheses "
                  "when stages nest inside it):", ""] + _stage_rows(phases) + [""]
        for r in res["runs"]:
            total = res["calibrate"]["seconds"] + r["quantize"]["seconds"]
            lines.append(f"- **{r['bits']}**: calibrate + quantize **{total / 60:.1f} min** "
                         f"(goal < 30); {r['layers']} quantized layers; dominant stage "
                         f"{_dominant([phases[0], (r['bits'], r['quantize'])])}.")
        for r in res["runs"]:
            kinds = steady_layer_seconds(r["quantize"]["layers"])
            cells = "; ".join(f"`{k}` {first:.1f} / {later:.1f} (x{n})" if n > 1 else
                              f"`{k}` {first:.1f}" for k, (first, later, n) in kinds.items())
            lines.append(f"- {r['bits']} seconds per layer kind, first call (compiles) / "
                         f"median of the later calls: {cells}.")
            est = extrapolate_quantize(r["quantize"]["layers"], res["depth"])
            if est is not None and res["model"].startswith("DiT-XL/2"):
                cal = res["calibrate"]["seconds"] * 28 / res["depth"]
                lines.append(f"- Extrapolated to all 28 blocks (calibrate scaled by 28/"
                             f"{res['depth']}, block layers at their steady cost): calibrate "
                             f"~{cal / 60:.0f} min + quantize {r['bits']} ~{est / 60:.0f} min.")
        cd = res["calib_dir"]
        if "error" in cd:
            lines.append(f"- Calibration directory: not written ({cd['error'][:200]}).")
        else:
            lines.append(f"- Calibration directory (`save_calibration`, what `trdq calibrate` "
                         f"writes): **{cd['bytes'] / MIB:.1f} MiB** ({cd['bytes']:,} bytes); "
                         f"written in {cd['save_seconds']:.1f} s, loaded back with every check "
                         f"of `load_calibration` in {cd['load_seconds']:.1f} s.")
        if res["layer_peak"]:
            path, peak = max(res["layer_peak"].items(), key=lambda kv: kv[1])
            lines.append(f"- Largest VmRSS while one layer was quantized: {peak / 2 ** 30:.2f} "
                         f"GiB, at `{path}`.")
        peaks = ", ".join(f"{p} {b / 2 ** 30:.2f}" for p, b in res["peak_rss"].items())
        partial = (f" ({res['depth']} of 28 blocks: the missing blocks' float parameters and "
                   "statistics are not included)") if res["depth"] < 28 and not \
            res["model"].startswith("tiny") else ""
        lines += [f"- Peak host memory: max RSS **{res['max_rss'] / 2 ** 30:.2f} GiB** "
                  f"(goal < 16){partial}; sampled VmRSS peak per phase, GiB: {peaks}.", "",
                  "| bits | quantized layers MiB | float remainder MiB | whole model MiB | "
                  "x bf16 model | checkpoint MiB | save s |", "|---|---|---|---|---|---|---|"]
        for r in res["runs"]:
            wb = r["weight_bytes"]
            lines.append(f"| {r['bits']} | {wb['quantized_layers'] / MIB:.1f} | "
                         f"{wb['float_params'] / MIB:.1f} | {wb['total'] / MIB:.1f} | "
                         f"{r['ratio']:.3f} | {_checkpoint_cell(r['checkpoint_bytes'])} | "
                         f"{r['save_seconds']:.1f} |")
        lines += ["", f"bf16 float model: {res['bf16_bytes'] / MIB:.1f} MiB (every parameter "
                  "as 2 bytes). The float remainder is stored float32."]
    if dq is not None:
        per = ", ".join(f"K={k}: {s:.2f} s" for k, s in dq["seconds"].items())
        lines += ["", f"`trdq_release` DuQuant greedy rotation search (`calibrate_duquant`, "
                  f"block {dq['block']}, {dq['rows']} random rows with planted outlier "
                  f"channels), one layer: {per}. Extrapolated to its "
                  f"{sum(XL_DUQUANT_LAYERS.values())} integer layers "
                  f"({' + '.join(f'{c} at K={k}' for k, c in XL_DUQUANT_LAYERS.items())}) x "
                  f"{RELEASE_ALPHAS} alphas x {RELEASE_SEGMENTS} segments: "
                  f"**{dq['total_seconds'] / 3600:.1f} h** of rotation search alone."]
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Random weights: times and bytes only, no quality numbers.")
    parser.add_argument("--bits", default="W4A8",
                        help="comma-separated bit widths, e.g. W4A8,W8A8 (one calibration "
                             "serves all; default W4A8)")
    parser.add_argument("--recipe", default="trdq", choices=sorted(Q.RECIPES),
                        help="recipe to calibrate and quantize with (default trdq)")
    parser.add_argument("--steps", type=int, default=20,
                        help="DDIM sampling steps of the calibration trajectory (default 20)")
    parser.add_argument("--labels", type=int, default=2,
                        help="calibration samples, one label each (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--search-weights", choices=("final", "rtn"), default="final",
                        help="Recipe.search_weights: 'final' judges every smoothing alpha with "
                             "its own GPTQ weights; 'rtn' compares alphas with round-to-"
                             "nearest weights and runs GPTQ once (several times cheaper)")
    parser.add_argument("--duquant", action="store_true",
                        help="also time trdq_release's DuQuant search at XL widths")
    parser.add_argument("--duquant-rows", type=int, default=320,
                        help="activation rows per DuQuant search (default 320 = 20 steps / 4 "
                             "segments x 64 rows per step)")
    parser.add_argument("--skip-quantize", action="store_true",
                        help="only the --duquant timing (no calibration)")
    parser.add_argument("--depth", type=int, default=None,
                        help="XL widths with this many blocks (default all 28): a quicker "
                             "partial run, quantize time extrapolated to 28 blocks")
    parser.add_argument("--calibrate-only", action="store_true",
                        help="calibrate and write/read the calibration directory, no "
                             "quantization")
    parser.add_argument("--tiny", action="store_true", help="two-block width-128 DiT smoke run")
    parser.add_argument("--write", default=None, help="markdown file whose section to replace")
    args = parser.parse_args(argv)
    try:
        parse_bits(args.bits)
    except ValueError as e:
        parser.error(str(e))
    if args.steps < 1 or args.labels < 1 or args.duquant_rows < 1 or (
            args.depth is not None and not 1 <= args.depth <= 28):
        parser.error("--steps, --labels and --duquant-rows must be positive, --depth in 1..28")
    if args.tiny and args.depth is not None:
        parser.error("--depth: XL widths only, not with --tiny")
    recipe = Q.get_recipe(args.recipe)
    if recipe.num_segments > args.steps:
        parser.error(f"--steps: recipe {args.recipe!r} has {recipe.num_segments} segments; "
                     f"needs at least that many steps, got {args.steps}")
    if args.skip_quantize and not args.duquant:
        parser.error("--skip-quantize: nothing left to run without --duquant")
    if args.tiny and args.write:
        parser.error("--write: a --tiny smoke run is not a benchmark result")
    print(f"{'tiny DiT' if args.tiny else 'DiT-XL/2'} with RANDOM weights; device "
          f"{jax.devices()[0].platform}, {len(os.sched_getaffinity(0))} cores", flush=True)

    res = None if args.skip_quantize else run_quantization(args)
    dq = time_duquant(args.duquant_rows) if args.duquant else None
    command = "PYTHONPATH=. python benchmarks/bench_calibrate_xl.py " + shlex.join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    section = to_markdown(res, dq, command.strip())
    print(section)
    if args.write:
        from bench_quant import write_section  # same directory (sys.path[0])
        write_section(pathlib.Path(args.write), section, BEGIN, END)
        print(f"wrote the section into {args.write}")


if __name__ == "__main__":
    main()
