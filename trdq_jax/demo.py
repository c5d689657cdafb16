"""``trdq demo``: the main job on the bundled image DiT.

Samples the model with CFG (``per_class`` samples of every class from fixed seeds), writes
``grid.png`` (one labelled row per class) and ``report.json`` / ``report.md`` with class-match
accuracy and digits-FID against the held-out digits (when the bundled classifier is present)
and timings (compile vs steady-state).
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np

from trdq_jax.config import DiTConfig, ExperimentConfig, SamplerConfig
from trdq_jax.evaluate import classifier_for, judge
from trdq_jax.generate import class_rows, generate


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
             seed: int = 0) -> dict:
    """Run the demo and return the report dict (also written to ``out``)."""
    from trdq_jax.data import load_digits
    from trdq_jax.models import zoo
    from trdq_jax.sampling import Sampler
    from trdq_jax.viz import save_grid

    if per_class < 1:
        raise ValueError(f"per_class: expected a positive int, got {per_class}")
    out = pathlib.Path(out)
    if model_name in zoo.available():
        model, params, cfg = zoo.load(model_name)
        source = f"bundled:{model_name}"
    else:
        model, params, cfg = _fallback_model()
        source = f"UNTRAINED fallback ({model_name} is not bundled in this installation)"
    num_classes = cfg.model.num_classes
    labels = np.repeat(np.arange(num_classes), per_class)
    sampler = Sampler.from_config(cfg.sampler)

    # Timings: the first batch includes compilation; a second identical call is steady state.
    t0 = time.perf_counter()
    generate(model, params, cfg, labels[:cfg.generation.batch_size], seed=seed, sampler=sampler)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = generate(model, params, cfg, labels, seed=seed, sampler=sampler, progress=True)
    steady = time.perf_counter() - t0

    grid_rows = [r[:10] for r in class_rows(samples, labels, num_classes)]
    save_grid(out / "grid.png", grid_rows, [f"digit {c}" for c in range(num_classes)],
              title=f"{cfg.name}: {cfg.sampler.solver} {cfg.sampler.num_steps} steps, "
                    f"cfg {cfg.sampler.cfg_scale}")
    test_images, _ = load_digits("test", image_size=cfg.model.input_size)
    report = {
        "model": source,
        "config": cfg.name,
        "sampler": {"solver": cfg.sampler.solver, "num_steps": cfg.sampler.num_steps,
                    "cfg_scale": cfg.sampler.cfg_scale},
        "num_samples": int(len(labels)),
        "seed": seed,
        "backend": jax.default_backend(),
        "timings_s": {"first_batch_incl_compile": round(first, 3),
                      "all_samples_steady": round(steady, 3),
                      "per_sample_ms": round(1000 * steady / len(labels), 3)},
    }
    if classifier_for(samples) in zoo.available():
        report.update(judge(samples, labels, test_images))
    else:
        report["note"] = f"{classifier_for(samples)} not bundled: no class match / digits-FID"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.md").write_text(_markdown(report))
    return report


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
    return "\n".join(lines)


def run_demo_command(args) -> int:
    report = run_demo(args.out, args.model, args.per_class, args.seed)
    print(json.dumps({k: report[k] for k in ("model", "num_samples", "timings_s")}, default=float))
    print(f"wrote {pathlib.Path(args.out) / 'grid.png'} and report.json / report.md")
    return 0
