"""``trdq demo``: the main job on the bundled image DiT.

Samples the model with CFG (``per_class`` samples of every class from fixed seeds, labelled
as ``trdq eval`` labels them: ``eval_labels``), writes ``grid.png`` (one labelled row per class)
and ``report.json`` / ``report.md`` with class-match accuracy and digits-FID against the
held-out digits, each with its 95% bootstrap interval (when the bundled classifier is present;
``trdq_jax.eval.judge.judge``), and timings (compile vs steady-state).

Then TR-DQ: calibrates ``get_recipe("trdq", ...)`` (4 labels per class, seed 1000: not the
evaluation seed), quantizes to W8A8 and W4A8, samples the first ``quant_per_class`` labels of
every class from the same noise as the float samples (integer ``xla`` backend) and adds
``grid_quantized.png`` (float | W8A8 | W4A8 per class), ``samples_quantized.npz`` (labels,
float, w8a8, w4a8 samples) and a ``quantized`` report section:
PSNR / SSIM vs float, class match, digits-FID, weight bytes vs bf16, calibration and
quantization time, and which activation clips the per-segment search chose. A ``headline``
section says where ``trdq`` equals ``quarot`` (measured: no clipping chosen in any segment
means the segments hold the same numbers) and where the time segments pay (quoted from
BENCHMARKS.md: ``BENCHMARK_EVIDENCE``).
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np

from trdq_jax import files, manifest
from trdq_jax._version import __version__
from trdq_jax.config import ClassifierConfig, DiTConfig, ExperimentConfig, SamplerConfig
from trdq_jax.eval.judge import classifier_for, eval_labels, heldout_data, judge
from trdq_jax.sampling.generate import generate, grid_rows

FORMAT = "trdq_jax.demo/1"


def _fallback_model():
    """An untrained small DiT, used only when no bundled checkpoint is installed."""
    from trdq_jax.models import build_model, init_params
    cfg = ExperimentConfig(
        name="untrained-dit",
        model=DiTConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=192, depth=6,
                        num_heads=6, num_classes=10, learn_sigma=False),
        sampler=SamplerConfig(solver="ddim", num_steps=50, cfg_scale=3.0))
    return build_model(cfg.model), init_params(cfg.model, jax.random.key(0)), cfg


def run_demo(out: str | pathlib.Path, model_name: str = "digits-dit", per_class: int = 30,
             seed: int = 0, quant_per_class: int = 10, *, cfg_plan: str = "none",
             overwrite: bool = False, arg: str = "out") -> dict:
    """Run the demo and return the report dict; ``out`` (a directory of kind ``"demo"``) gets
    every file at once when all is computed.

    ``cfg_plan``: CFG sharing for every sampling run of the demo, float and quantized alike
    (``none``, a preset or a plan file; ``trdq_jax.sampling.cfg_plan.resolve_plan``).
    Labels are ``trdq_jax.eval.judge.eval_labels`` (sample i is class i % num_classes, as
    ``trdq eval`` lays them out, so the float numbers equal ``evaluate_generator(model_name,
    per_class, seed)``'s), and the first ``quant_per_class * num_classes`` float samples share
    their noise with the quantized ones.
    """
    from trdq_jax.models import zoo
    from trdq_jax.sampling.solvers import Sampler
    from trdq_jax.viz import save_comparison_grid, save_grid

    for name, value in (("per_class", per_class), ("quant_per_class", quant_per_class)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    files.resolve_target(out, kind="demo", overwrite=overwrite, is_dir=True, arg=arg)  # fail early
    if model_name not in zoo.available() and model_name not in zoo.BUNDLED:
        raise ValueError(f"model: unknown bundled model {model_name!r}; known: "
                         f"{sorted(zoo.BUNDLED)}")
    if model_name in zoo.available():
        model, params, cfg = zoo.load(model_name)
        source = f"bundled:{model_name}"
    else:
        model, params, cfg = _fallback_model()
        source = f"UNTRAINED fallback ({model_name} is not bundled in this installation)"
    if isinstance(cfg.model, ClassifierConfig):
        raise ValueError(f"model: {model_name!r} is a classifier; the demo samples a diffusion "
                         "model")
    if cfg.model.family == "pixart":
        raise ValueError(f"model: {model_name!r} is conditioned on text; the demo samples class "
                         "labels (notebook 05_text_to_image shows the text model; or trdq sample "
                         "--model NAME --prompt TEXT)")
    from trdq_jax.sampling.cfg_plan import resolve_plan
    share = resolve_plan(cfg_plan, cfg.model, cfg.sampler.num_steps, arg="cfg_plan")
    num_classes = cfg.model.num_classes
    labels = eval_labels(num_classes, per_class)
    sampler = Sampler.from_config(cfg.sampler)

    # Timings: the first batch includes compilation; a second identical call is steady state.
    t0 = time.perf_counter()
    generate(model, params, cfg, labels[:cfg.generation.batch_size], seed=seed, sampler=sampler,
             share_cfg=share)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = generate(model, params, cfg, labels, seed=seed, sampler=sampler, progress=True,
                       share_cfg=share)
    steady = time.perf_counter() - t0

    test_images, _ = heldout_data(cfg.model)  # digits test images, or moving-digits test videos
    report = {
        "model": source,
        "config": cfg.name,
        "sampler": {"solver": cfg.sampler.solver, "num_steps": cfg.sampler.num_steps,
                    "cfg_scale": cfg.sampler.cfg_scale},
        "num_samples": int(len(labels)),
        "label_layout": f"sample i: class i % {num_classes}",
        "seed": seed,
        "cfg_plan": share.name if share else "none",
        "backend": jax.default_backend(),
        "timings_s": {"first_batch_incl_compile": round(first, 3),
                      "all_samples_steady": round(steady, 3),
                      "per_sample_ms": round(1000 * steady / len(labels), 3)},
    }
    has_classifier = classifier_for(samples) in zoo.available()
    if has_classifier:
        report.update(judge(samples, labels, test_images))
    else:
        report["note"] = f"{classifier_for(samples)} not bundled: no class match / digits-FID"
    n_q = min(quant_per_class, per_class) * num_classes
    report["quantized"], arrays, grid = quantized_comparison(
        model, params, cfg, labels[:n_q], samples[:n_q], seed,
        test_images if has_classifier else None, share_cfg=share)
    report["headline"] = headline(report["quantized"])
    row_labels = [f"digit {c}" for c in range(num_classes)]
    body = {"format": FORMAT, "kind": "demo", "library_version": __version__, "model": source,
            "config": cfg.name, "seed": seed}
    meta = {**body, "manifest": manifest.make_manifest(body, arrays)}

    def write(tmp: pathlib.Path) -> None:
        save_grid(tmp / "grid.png", grid_rows(samples, labels, num_classes), row_labels,
                  title=f"{cfg.name}: {cfg.sampler.solver} {cfg.sampler.num_steps} steps, "
                        f"cfg {cfg.sampler.cfg_scale}")
        save_comparison_grid(tmp / "grid_quantized.png", grid, row_labels,
                             title=f"{cfg.name}: float vs TR-DQ W8A8 vs W4A8 (same noise, "
                                   f"seed {seed})")
        np.savez(tmp / "samples_quantized.npz", **arrays)
        files.crash_point("arrays-written")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=float))
        (tmp / "report.md").write_text(_markdown(report))
        files.write_json(tmp / files.METADATA_FILE, meta)

    files.write_dir(out, write, kind="demo", overwrite=overwrite, arg=arg)
    return report


def quantized_comparison(model, params, cfg, labels, float_samples, seed, reference=None, *,
                         share_cfg=False):
    """Calibrate TR-DQ once, quantize W8A8 and W4A8, sample ``labels`` from ``seed`` (the noise
    of ``float_samples [N, H, W, C]``) and compare.

    ``reference``: held-out images for class match / digits-FID (None: skipped);
    ``share_cfg``: the CFG sharing (bool or ``CFGPlan``) of the quantized sampling runs.
    Returns ``(section, arrays, grid)``: the report's ``quantized`` section, the
    ``samples_quantized.npz`` arrays (labels, float, w8a8, w4a8) and the comparison grid rows
    ``{setting: rows}``.
    """
    from trdq_jax.eval.metrics import psnr, ssim
    from trdq_jax.quant import QuantizedDenoiser, get_recipe, quantize
    from trdq_jax.quant.pipeline import DEFAULT_CALIB_SEED, quantize_summary, run_calibration
    from trdq_jax.sampling.solvers import Sampler

    calib_per_class = 4
    t0 = time.perf_counter()
    calib = run_calibration(model, params, cfg, get_recipe("trdq", 4, 8),
                            per_class=calib_per_class, seed=DEFAULT_CALIB_SEED, progress=True)
    calib_seconds = time.perf_counter() - t0
    sampler = Sampler.from_config(cfg.sampler).with_segments(calib.segment_of_step,
                                                             calib.num_segments)
    clipped_float = np.clip(float_samples, -1.0, 1.0)
    num_classes = cfg.model.num_classes
    section = {"recipe": "trdq", "backend": "xla", "seed": seed,
               "num_samples": int(len(labels)),
               "calibration": {"per_class": calib_per_class, "seed": DEFAULT_CALIB_SEED,
                               "seconds": round(calib_seconds, 3),
                               "segment_of_step": calib.segment_of_step.tolist()},
               "settings": {}}
    if reference is not None:
        section["float_same_samples"] = judge(float_samples, labels, reference)
    grid = {"float": grid_rows(float_samples, labels, num_classes)}
    quantized = {}
    for w_bits, a_bits in ((8, 8), (4, 8)):
        name = f"W{w_bits}A{a_bits}"
        recipe = get_recipe("trdq", w_bits, a_bits)
        t0 = time.perf_counter()
        qparams = quantize(params, calib, recipe, progress=True)
        quant_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        qsamples = generate(model, qparams, cfg, labels, seed=seed, sampler=sampler,
                            apply_fn=QuantizedDenoiser(model, "xla"), progress=True,
                            share_cfg=share_cfg)
        sample_seconds = time.perf_counter() - t0
        clipped = np.clip(qsamples, -1.0, 1.0)
        entry = quantize_summary(params, qparams, recipe, quant_seconds)
        entry["activation_clipping"] = clipping_summary(qparams)
        entry.update({"psnr_db_vs_float": psnr(clipped_float, clipped)[1],
                      "ssim_vs_float": ssim(clipped_float, clipped)[1],
                      "calibration_plus_quantization_s": round(calib_seconds + quant_seconds, 3),
                      "sampling_s_incl_compile": round(sample_seconds, 3)})
        if reference is not None:
            entry.update(judge(qsamples, labels, reference))
        section["settings"][name] = entry
        grid[name] = grid_rows(qsamples, labels, num_classes)
        quantized[name] = qsamples
    arrays = {"labels": np.asarray(labels), "float": np.asarray(float_samples), **{
        name.lower(): np.asarray(q) for name, q in quantized.items()}}
    return section, arrays, grid


def clipping_summary(qparams) -> dict:
    """What TR-DQ's per-segment activation clipping search chose, over the layers with dynamic
    activations: ``{"layers", "segments", "layers_clipped", "smallest_ratio"}`` (a ratio of 1
    is no clipping; with none clipped every segment holds the same numbers)."""
    from trdq_jax.quant import QLinear
    clips = [np.asarray(q.a_clip) for q in jax.tree.leaves(
        qparams["layers"], is_leaf=lambda x: isinstance(x, QLinear))
        if isinstance(q, QLinear) and q.a_clip is not None]
    return {"layers": len(clips), "segments": max((c.size for c in clips), default=0),
            "layers_clipped": int(sum(bool((c < 1).any()) for c in clips)),
            "smallest_ratio": float(min((c.min() for c in clips), default=1.0))}


# Quoted from BENCHMARKS.md (measured on 2 CPU cores, 2026-12-01; not measured by the demo):
# the bench_quant rows of digits-dit and moving-digits-vdit and the hand-written section
# "Whole-model quantization (issue #11)". Keep in step with the README's "What TR-DQ adds".
BENCHMARK_EVIDENCE = [
    "digits-dit W4A8 (BENCHMARKS.md, bench_quant, 30 samples): `trdq` 41.90 dB PSNR vs float, "
    "`quarot` 41.90 dB, `trdq_no_segments` 41.90 dB: the same samples; the per-segment "
    "clipping search picks no clipping, so `trdq` computes `quarot`'s layers.",
    "Where the time segments pay: moving-digits-vdit W4A4 (bench_quant, 20 videos): `trdq` "
    "21.51 dB vs 19.68 dB with one segment (`trdq_no_segments`), +1.83 dB; `quarot`, which "
    "does not clip activations, 21.65 dB. Four segments' clips repair what one pooled clip "
    "breaks; they do not beat no clipping.",
    "With static activations (one scale per segment): digits-unet W4A4 `trdq_static` with "
    "1 / 4 / 8 segments 23.02 / 25.28 / 26.27 dB (+3.2 dB from 1 to 8), still below dynamic "
    "per-token activations (`trdq` 28.60 dB); on moving-digits-vdit static 4 vs 1 segment "
    "is within +-0.8 dB (noise at 20 videos).",
    "This demo quantizes trdq's fixed recipe (`trdq quantize --no-choose`). `trdq quantize` "
    "chooses trdq's components by default, by the error of held-out samples: on digits-dit "
    "W4A8 it dropped the rotation, 42.66 dB vs 41.73 dB for `quarot` (BENCHMARKS.md, issue #24 "
    "seventh pass, 100 samples); on all 16 bundled model x width cells it lands within 0.3 dB "
    "of the best of QuaRot, ViDiT-Q+GPTQ and static segments.",
]


def headline(section: dict) -> dict:
    """Where ``trdq`` equals ``quarot`` and where the time segments pay: what this run's
    quantization chose (measured) beside the ``BENCHMARK_EVIDENCE`` rows (quoted)."""
    measured = []
    for name, entry in section["settings"].items():
        c = entry["activation_clipping"]
        if not c["layers"]:
            continue
        if c["layers_clipped"] == 0:
            measured.append(
                f"{name}: the per-segment clipping search picked no clipping in any of the "
                f"{c['layers']} layers with dynamic activations ({c['segments']} segments "
                "each): every segment holds the same numbers, so these are `quarot`'s layers "
                "(Hadamard rotation, GPTQ weights, dynamic per-token activations) and the time "
                "segments add nothing here.")
        else:
            measured.append(
                f"{name}: the per-segment clipping search clipped activations in "
                f"{c['layers_clipped']} of {c['layers']} layers (smallest ratio "
                f"{c['smallest_ratio']:.2f}): here the segments differ from `quarot`.")
    return {"measured": measured, "from_benchmarks": BENCHMARK_EVIDENCE}


def _quantized_markdown(section: dict) -> list[str]:
    lines = ["", f"## TR-DQ quantized vs float ({section['num_samples']} samples, same noise, "
                 f"backend {section['backend']})", "",
             f"Calibration: {section['calibration']['per_class']} per class, seed "
             f"{section['calibration']['seed']}, {section['calibration']['seconds']} s; "
             f"step -> segment table {section['calibration']['segment_of_step']}.", "",
             "| setting | PSNR vs float (dB) | SSIM vs float | class match | digits-FID "
             "| weight bytes | ratio to bf16 | calib + quant (s) |",
             "|---|---|---|---|---|---|---|---|"]
    float_judged = section.get("float_same_samples")
    if float_judged:
        lines.append(f"| float (same samples) | - | - | {_match(float_judged)} | "
                     f"{_fid(float_judged)} | - | 1 (bf16) | - |")
    for name, e in section["settings"].items():
        match = _match(e) if "class_match" in e else "-"
        fid = _fid(e) if "digits_fid" in e else "-"
        lines.append(f"| {name} | {e['psnr_db_vs_float']:.2f} | {e['ssim_vs_float']:.4f} | "
                     f"{match} | {fid} | {e['weight_bytes']} (bf16 {e['bf16_bytes']}) | "
                     f"{e['ratio_to_bf16']:.3f} | {e['calibration_plus_quantization_s']} |")
    lines += ["", "![float | W8A8 | W4A8](grid_quantized.png)", ""]
    return lines


def _match(judged: dict, key: str = "accuracy") -> str:
    """``0.9833 [0.9667, 0.9967]``: a class match with its 95% interval when there is one."""
    text = f"{judged['class_match'][key]:.4f}"
    if key in judged.get("class_match_ci95", {}):
        lo, hi = judged["class_match_ci95"][key]
        text += f" [{lo:.4f}, {hi:.4f}]"
    return text


def _fid(judged: dict) -> str:
    text = f"{judged['digits_fid']:.3f}"
    if "digits_fid_ci95" in judged:
        lo, hi = judged["digits_fid_ci95"]
        text += f" [{lo:.2f}, {hi:.2f}]"
    return text


def _headline_markdown(headline_: dict) -> list[str]:
    lines = ["", "## Where TR-DQ differs from QuaRot here", "", "Measured in this run:", ""]
    lines += [f"- {line}" for line in headline_["measured"]]
    lines += ["", "Quoted from BENCHMARKS.md (measured on 2 CPU cores, 2026-12-01):", ""]
    lines += [f"- {line}" for line in headline_["from_benchmarks"]]
    return lines + [""]


def _markdown(report: dict) -> str:
    lines = [f"# trdq demo: {report['config']}", "", f"- model: {report['model']}",
             f"- sampler: {report['sampler']}", f"- samples: {report['num_samples']} "
             f"(seed {report['seed']}, backend {report['backend']})", "",
             "| metric | value |", "|---|---|"]
    if report.get("classifier"):
        for key in report["class_match"]:
            lines.append(f"| class match: {key} | {_match(report, key)} |")
        lines.append(f"| digits-FID vs held-out digits | {_fid(report)} |")
    else:
        lines.append(f"| classifier | {report.get('note')} |")
    for key, value in report["timings_s"].items():
        lines.append(f"| {key} | {value} |")
    if "bootstrap" in report:
        b = report["bootstrap"]
        lines += ["", f"[lo, hi]: {100 * b['level']:.0f}% {b['method']} bootstrap intervals, "
                      f"{b['resamples']} resamples of the samples (bootstrap seed {b['seed']}; "
                      "digits-FID's re-centred on the estimate); the held-out digits are "
                      f"fixed. Labels: {report['label_layout']}."]
    lines += ["", "![samples](grid.png)", ""]
    if "headline" in report:
        lines += _headline_markdown(report["headline"])
    if "quantized" in report:
        lines += _quantized_markdown(report["quantized"])
    return "\n".join(lines)
