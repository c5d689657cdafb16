"""``trdq cfg-analysis``: where CFG attention sharing is safe, as tables, a heat map and plans."""
from __future__ import annotations

from trdq_jax.cli._common import (add_debug, add_overwrite, add_seed, add_source, blame,
                                  float_model, positive_int, print_json)


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(v >= 0 for v in values):
        raise ValueError(f"--thresholds: expected comma-separated share errors >= 0, e.g. "
                         f"0.03,0.06, got {text!r}")
    return values


def _cfg_analysis(args) -> int:
    import numpy as np

    from trdq_jax.eval.cfg_analysis import analyze_cfg, save_cfg_analysis
    from trdq_jax.files import resolve_target
    from trdq_jax.sampling import Sampler
    from trdq_jax.sampling.cfg_plan import plan_from_analysis, preset_plan
    from trdq_jax.sampling.generate import null_label
    thresholds = _thresholds(args.thresholds)
    resolve_target(args.out, kind="cfg_analysis", overwrite=args.overwrite, is_dir=True,
                   arg="--out")
    model, params, cfg, source = float_model(args)
    sampler = Sampler.from_config(cfg.sampler)
    from trdq_jax.cli._prompts import is_text_model
    if is_text_model(cfg):  # prompts (--per-class samples of each): the self-attentions
        from trdq_jax.cli._prompts import prompt_conditioning, prompt_list
        prompts = prompt_list(args, cfg)
        cond, null_cond, _ = prompt_conditioning(
            args, cfg, prompts, np.repeat(np.arange(len(prompts)), args.per_class))
        labels, given = cond["mask"], {"cond": cond, "null_cond": null_cond}
    else:
        if args.prompt or args.prompts:
            raise ValueError(f"--prompt: the model ({cfg.model.family}) is not conditioned on "
                             "text")
        with blame("--model" if not args.checkpoint else "--checkpoint"):
            null = null_label(cfg.model)
        labels = np.repeat(np.arange(cfg.model.num_classes), args.per_class)
        given = {"labels": labels, "null_label": null}
    analysis = analyze_cfg(model, params, cfg.model, sampler, seed=args.seed,
                           cfg_scale=cfg.sampler.cfg_scale, progress=True, **given)
    n = sampler.num_steps
    plans = {"trdq_release": preset_plan("trdq_release", cfg.model, n),
             "all": preset_plan("all", cfg.model, n)}
    for th in thresholds:
        plan = plan_from_analysis(analysis, cfg.model, threshold=th, max_phases=args.max_phases)
        plans[plan.name] = plan
    out = save_cfg_analysis(args.out, analysis, plans,
                            title=f"{source}: cond vs uncond attention, "
                                  f"{cfg.sampler.solver} {n} steps, {len(labels)} samples",
                            info={"source": source, "per_class": args.per_class},
                            overwrite=args.overwrite, arg="--out")
    err = np.asarray(analysis["share_error"])
    print_json({"out": str(out), "layers": len(analysis["layers"]), "num_steps": n,
                "share_error_min": round(float(err.min()), 5),
                "share_error_max": round(float(err.max()), 5),
                "plans": {k: {"shared_cells": p.shared_cells(), "phases": len(p.phases())}
                          for k, p in plans.items()}})
    return 0


def register(sub) -> None:
    p = sub.add_parser("cfg-analysis",
                       help="measure cond vs uncond attention per layer and step; write a heat "
                            "map and CFG sharing plans")
    add_source(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory, new or empty (analysis.json, heatmap.png, "
                        "plans/*.json) (required)")
    add_overwrite(p, "analysis directory")
    p.add_argument("--per-class", type=positive_int, default=1,
                   help="analysed samples per class (a text model: per prompt) (default: "
                        "%(default)s)")
    from trdq_jax.cli._prompts import add_prompt_args
    add_prompt_args(p)
    add_seed(p)
    p.add_argument("--thresholds", default="0.03,0.06",
                   help="share-error thresholds of the derived plans, comma-separated "
                        "(plans/threshold_T.json) (default: %(default)s)")
    p.add_argument("--max-phases", type=positive_int, default=4,
                   help="step windows of a derived plan (one compiled scan body each) "
                        "(default: %(default)s)")
    add_debug(p)
    p.set_defaults(func=_cfg_analysis)
