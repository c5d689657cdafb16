"""CFG branch sharing: speed, FLOPs and quality of sharing plans against unshared sampling.

For each bundled diffusion model and setting (float, and ``trdq`` W8A8 / W4A8 quantized on the
``xla`` backend) every plan samples the SAME noise and labels as the unshared run of that same
setting:

* ``all``: every attention at every step (the old ``share_cfg=True``);
* ``trdq_release``: the released TR-DQ choice (spatial attention of the first 8 / last 6 of 28
  blocks, scaled to the model's depth), every step;
* ``threshold_T``: measured plans (``trdq cfg-analysis``): a layer shares in a quarter of the
  steps when its largest sharing error there is at most T;
* ``cache_alt``: the uncond branch runs every other step only; in between its output is the
  cond output minus the last measured guidance difference (a CFG cache);
* ``cache_alt+threshold_T``: both;
* ``guidance_off_last20``: the last 20% of the steps run without the uncond branch and
  without guidance (adaptive guidance).

Reported per plan: sampler wall time as a speed-up ratio over unshared (medians of
``--reps`` interleaved repetitions, compiled beforehand), FLOPs (XLA cost analysis of the
denoiser call of every step, summed over the steps; the sampler arithmetic is negligible),
PSNR / SSIM vs unshared (clipped to [-1, 1]), class match and digits-FID. The analysis runs on
its own labels and seed (``--analysis-seed``), not on the judged samples.

    PYTHONPATH=. python benchmarks/bench_cfg_sharing.py [--models digits-dit,...]
        [--settings float,W8A8,W4A8] [--per-class 3] [--reps 3] [--write BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax import quant as Q
from trdq_jax.eval import psnr, ssim
from trdq_jax.eval.cfg_analysis import analyze_cfg
from trdq_jax.eval.judge import heldout_data, judge
from trdq_jax.models import input_shape, zoo
from trdq_jax.sampling import Sampler, denoise_fn_for, sample
from trdq_jax.sampling.cfg_plan import plan_from_analysis, preset_plan, rules_plan
from trdq_jax.sampling.generate import null_label

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_quant import write_section  # noqa: E402

MODELS = ("digits-dit", "digits-unet", "moving-digits-vdit")
BEGIN, END = "<!-- bench_cfg_sharing:begin -->", "<!-- bench_cfg_sharing:end -->"
THRESHOLDS = (0.03, 0.06)


def make_plans(analysis, model_cfg, num_steps: int) -> dict:
    cached = [{"mode": "cached", "steps": [s, s + 1]} for s in range(1, num_steps, 2)]
    plans = {"all": True, "trdq_release": preset_plan("trdq_release", model_cfg, num_steps)}
    for th in THRESHOLDS:
        plans[f"threshold_{th}"] = plan_from_analysis(analysis, model_cfg, threshold=th)
    plans["cache_alt"] = rules_plan(model_cfg, num_steps, uncond=cached)
    th = THRESHOLDS[-1]
    plans[f"cache_alt+threshold_{th}"] = plan_from_analysis(analysis, model_cfg, threshold=th,
                                                            uncond=cached)
    start = num_steps - num_steps // 5
    plans["guidance_off_last20"] = rules_plan(model_cfg, num_steps,
                                              uncond=[{"mode": "none", "steps": [start, num_steps]}])
    return plans


def step_flops(apply_fn, params, model_cfg, n: int, plan, num_steps: int) -> float:
    """Sum over the steps of the compiled denoiser call's FLOPs (one compile per distinct step)."""
    from trdq_jax.sampling.cfg_plan import Step
    steps = ([Step(plan, "full")] * num_steps if isinstance(plan, bool) else list(plan.steps()))
    cache: dict = {}
    total = 0.0
    for step in steps:
        if step not in cache:
            batch = 2 * n if step.uncond == "full" else n
            share = step.share if step.uncond == "full" else False
            fn = jax.jit(lambda p, x, t, y: apply_fn(p, x, t, y, jnp.int32(0), share))
            lowered = fn.lower(params, jnp.zeros(input_shape(model_cfg, batch)),
                               jnp.zeros((batch,)), jnp.zeros((batch,), jnp.int32))
            cache[step] = lowered.compile().cost_analysis()["flops"]
        total += cache[step]
    return total


def _setting(name, model, params, cfg, sampler, calib_labels):
    """(apply_fn, params, sampler) of one setting."""
    if name == "float":
        return denoise_fn_for(model), params, sampler
    w_bits, a_bits = int(name[1]), int(name[3])
    recipe = Q.get_recipe("trdq", w_bits, a_bits)
    calib = Q.calibrate(model, params, recipe, sampler, labels=calib_labels,
                        null_label=null_label(cfg.model),
                        shape=input_shape(cfg.model, len(calib_labels)))
    qparams = Q.quantize(params, calib, recipe)
    return (Q.QuantizedDenoiser(model, "xla"), qparams,
            sampler.with_segments(calib.segment_of_step, calib.num_segments))


def bench_model(name: str, settings, per_class: int, reps: int, analysis_seed: int) -> dict:
    model, params, cfg = zoo.load(name)
    sampler = Sampler.from_config(cfg.sampler)
    n_classes, null = cfg.model.num_classes, null_label(cfg.model)
    t0 = time.perf_counter()
    analysis = analyze_cfg(model, params, cfg.model, sampler, np.arange(n_classes),
                           seed=analysis_seed, cfg_scale=cfg.sampler.cfg_scale, null_label=null)
    analysis_s = time.perf_counter() - t0
    plans = make_plans(analysis, cfg.model, sampler.num_steps)
    labels = np.tile(np.arange(n_classes), per_class)
    test_images, _ = heldout_data(cfg.model)
    rows = []
    for setting in settings:
        apply_fn, p, s = _setting(setting, model, params, cfg, sampler, np.arange(n_classes))
        kw = dict(seed=1, cfg_scale=cfg.sampler.cfg_scale, null_label=null,
                  shape=input_shape(cfg.model, len(labels)))
        run = lambda plan: np.asarray(sample(apply_fn, p, s, labels, share_cfg=plan, **kw))  # noqa
        everything = {"unshared": False, **plans}
        outputs = {k: run(v) for k, v in everything.items()}  # compiles every plan
        times = {k: [] for k in everything}
        for _ in range(reps):  # interleaved: machine noise hits every plan alike
            for k, v in everything.items():
                t = time.perf_counter()
                jax.block_until_ready(sample(apply_fn, p, s, labels, share_cfg=v, **kw))
                times[k].append(time.perf_counter() - t)
        ref = np.clip(outputs["unshared"], -1, 1)
        base_time = float(np.median(times["unshared"]))
        base_flops = step_flops(apply_fn, p, cfg.model, len(labels), False, s.num_steps)
        for k, v in everything.items():
            out = np.clip(outputs[k], -1, 1)
            flops = step_flops(apply_fn, p, cfg.model, len(labels), v, s.num_steps)
            judged = judge(outputs[k], labels, test_images)
            rows.append({
                "setting": setting, "plan": k,
                "speedup": base_time / float(np.median(times[k])),
                "seconds": float(np.median(times[k])),
                "flops_ratio": flops / base_flops,
                "psnr": float("inf") if k == "unshared" else psnr(ref, out)[1],
                "ssim": 1.0 if k == "unshared" else float(ssim(ref, out)[1]),
                "class_match": judged["class_match"], "fid": judged["digits_fid"],
                "shared": ("-" if isinstance(v, bool) and not v else "all" if v is True
                           else f"{v.shared_cells()}/{v.num_steps * len(v.layers)}"),
                "uncond_steps": (s.num_steps if isinstance(v, bool)
                                 else sum(m == "full" for m in v.uncond)),
            })
            print(f"{name} {setting} {k}: x{rows[-1]['speedup']:.2f} flops "
                  f"{rows[-1]['flops_ratio']:.3f} psnr {rows[-1]['psnr']:.2f}", flush=True)
    return {"model": name, "rows": rows, "analysis_s": analysis_s, "num_samples": len(labels),
            "steps": sampler.num_steps, "solver": cfg.sampler.solver,
            "layers": len(analysis["layers"]),
            "share_error_range": (float(np.min(analysis["share_error"])),
                                  float(np.max(analysis["share_error"])))}


def _match(cm: dict) -> str:
    """Class match; videos: ``frames f / videos v`` (a video matches when all frames do)."""
    if "frame_accuracy" in cm:
        return f"frames {cm['frame_accuracy']:.3f} / videos {cm['video_accuracy']:.3f}"
    return f"{cm['accuracy']:.3f}"


LEGEND = ("Speed-up: median wall time of unshared / plan, interleaved repetitions of the "
          "compiled sampler (CPU: noisy; a run sharing the 2 cores with other jobs more so). "
          "FLOPs: XLA cost analysis of each step's denoiser call, summed, relative to unshared. "
          "PSNR / SSIM: against the unshared samples of the same setting from the same noise. "
          "Shared: (layer, step) cells that share; uncond steps: steps where the uncond branch "
          "runs. Plans are derived from the float model's analysis, also for the quantized "
          "settings.")


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench_cfg_sharing:model:{name} -->", f"<!-- /bench_cfg_sharing:model:{name} -->"


def model_block(res: dict, command: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lo, hi = res["share_error_range"]
    begin, end = _markers(res["model"])
    lines = [begin, f"### {res['model']}", "", f"Command: `{command}`  ",
             f"Date: {now}; machine: {platform.machine()} CPU, 2 cores, jax {jax.__version__}.  ",
             f"{res['num_samples']} samples, {res['solver']} {res['steps']} steps, "
             f"{res['layers']} attention layers; analysis {res['analysis_s']:.1f} s, "
             f"sharing error {lo:.4f} .. {hi:.4f}.", "",
             "| setting | plan | speed-up | FLOPs x | PSNR dB | SSIM | class match | "
             "digits-FID | shared | uncond steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        db = "ref" if r["plan"] == "unshared" else f"{r['psnr']:.2f}"
        lines.append(f"| {r['setting']} | {r['plan']} | {r['speedup']:.2f} | "
                     f"{r['flops_ratio']:.3f} | {db} | {r['ssim']:.4f} | "
                     f"{_match(r['class_match'])} | {r['fid']:.2f} | {r['shared']} | "
                     f"{r['uncond_steps']} |")
    lines.append(end)
    return "\n".join(lines)


def to_markdown(blocks: dict[str, str], previous: str = "") -> str:
    """The marked section: the legend, then one block per model (``MODELS`` order) from
    ``blocks`` or else kept from the ``previous`` section's text."""
    parts = [BEGIN, "## bench_cfg_sharing: CFG sharing plans vs unshared sampling", "", LEGEND,
             ""]
    for name in MODELS:
        begin, end = _markers(name)
        if name in blocks:
            parts += [blocks[name], ""]
        elif begin in previous and end in previous:
            parts += [begin + previous.split(begin, 1)[1].split(end, 1)[0] + end, ""]
    parts.append(END)
    return "\n".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--settings", default="float,W8A8,W4A8",
                        help="float and/or trdq bit widths WxAy")
    parser.add_argument("--per-class", type=int, default=3, help="judged samples per class")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per plan")
    parser.add_argument("--analysis-seed", type=int, default=100)
    parser.add_argument("--write", default=None, help="markdown file whose section to replace")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    settings = [s for s in args.settings.split(",") if s]
    for m in models:
        if m not in MODELS:
            parser.error(f"--models: expected names from {MODELS}, got {m!r}")
    for s in settings:
        if s != "float" and not (len(s) == 4 and s[0] == "W" and s[2] == "A"
                                 and s[1].isdigit() and s[3].isdigit()):
            parser.error(f"--settings: expected float or WxAy, got {s!r}")
    if args.per_class < 1 or args.reps < 1:
        parser.error("--per-class / --reps: expected positive ints")
    results = [bench_model(m, settings, args.per_class, args.reps, args.analysis_seed)
               for m in models]
    command = "PYTHONPATH=. python benchmarks/bench_cfg_sharing.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    blocks = {res["model"]: model_block(res, command) for res in results}
    path = pathlib.Path(args.write) if args.write else None
    previous = path.read_text() if path is not None and path.exists() else ""
    section = to_markdown(blocks, previous.split(BEGIN, 1)[1] if BEGIN in previous else "")
    print(section)
    if path is not None:
        write_section(path, section, BEGIN, END)


if __name__ == "__main__":
    main()
