"""``trdq demo``: the main job on the bundled image DiT.

Samples the model with CFG (``per_class`` samples of every class from fixed seeds), writes
``grid.png`` (one labelled row per class) and ``report.json`` / ``report.md`` with class-match
accuracy and digits-FID against the held-out digits (when the bundled classifier is present)
and timings (compile vs steady-state).

Then TR-DQ: calibrates ``get_recipe("trdq", ...)`` (4 labels per class, seed 1000: not the
evaluation seed), quantizes to W8A8 and W4A8, samples the first ``quant_per_class`` labels of
every class from the same noise as the float samples (integer ``xla`` backend) and adds
``grid_quantized.png`` (float | W8A8 | W4A8 per class), ``samples_quantized.npz`` (labels,
float, w8a8, w4a8 samples) and a ``quantized`` report section:
PSNR / SSIM vs float, class match, digits-FID, weight bytes vs bf16, calibration and
quantization time.
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
from trdq_jax.eval.judge import classifier_for, heldout_data, judge
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
    Labels are class-interleaved (0, 1, ..., 9, 0, 1, ...) so that the first
    ``quant_per_class * num_classes`` float samples share their noise with the quantized ones.
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
    from trdq_jax.sampling.cfg_plan import resolve_plan
    share = resolve_plan(cfg_plan, cfg.model, cfg.sampler.num_steps, arg="cfg_plan")
    num_classes = cfg.model.num_classes
    labels = np.tile(np.arange(num_classes), per_class)
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
        lines.append(f"| float (same samples) | - | - | "
                     f"{float_judged['class_match']['accuracy']:.4f} | "
                     f"{float_judged['digits_fid']:.3f} | - | 1 (bf16) | - |")
    for name, e in section["settings"].items():
        match = f"{e['class_match']['accuracy']:.4f}" if "class_match" in e else "-"
        fid = f"{e['digits_fid']:.3f}" if "digits_fid" in e else "-"
        lines.append(f"| {name} | {e['psnr_db_vs_float']:.2f} | {e['ssim_vs_float']:.4f} | "
                     f"{match} | {fid} | {e['weight_bytes']} (bf16 {e['bf16_bytes']}) | "
                     f"{e['ratio_to_bf16']:.3f} | {e['calibration_plus_quantization_s']} |")
    lines += ["", "![float | W8A8 | W4A8](grid_quantized.png)", ""]
    return lines


def _markdown(report: dict) -> str:
    lines = [f"# trdq demo: {report['config']}", "", f"- model: {report['model']}",
             f"- sampler: {report['sampler']}", f"- samples: {report['num_samples']} "
             f"(seed {report['seed']}, backend {report['backend']})", "",
             "| metric | value |", "|---|---|"]
    if report.get("classifier"):
        match = report["class_match"]
        for key, value in match.items():
            lines.append(f"| class match: {key} | {value:.4f} |" if isinstance(value, float)
                         else f"| class match: {key} | {value} |")
        lines.append(f"| digits-FID vs held-out digits | {report['digits_fid']:.3f} |")
    else:
        lines.append(f"| classifier | {report.get('note')} |")
    for key, value in report["timings_s"].items():
        lines.append(f"| {key} | {value} |")
    lines += ["", "![samples](grid.png)", ""]
    if "quantized" in report:
        lines += _quantized_markdown(report["quantized"])
    return "\n".join(lines)
