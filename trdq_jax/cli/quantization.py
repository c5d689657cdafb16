"""``trdq calibrate | quantize | plot-ranges``: statistics, quantized checkpoints, range figure."""
from __future__ import annotations

import argparse
import re
import sys
import time

from trdq_jax.cli._common import (add_debug, add_overwrite, add_seed, add_source, bits, blame,
                                  float_model, nonnegative_float, positive_int, print_json,
                                  rank_int, source_of, stored_vae)

DEFAULT_CHOOSE_SAMPLES = 100  # 30 misjudged cells by over 1 dB (BENCHMARKS.md, issue #24)
# a change that wins on the held-out samples must win again on these many more, pooled
DEFAULT_CONFIRM_SAMPLES = 100
# the method's own recipes choose their components end to end unless --no-choose; the baselines
# and ablations are fixed combinations and quantize as named (--choose to choose from them)
CHOSEN_BY_DEFAULT = ("trdq", "trdq_lowrank")
DEFAULT_CALIB_SEED = 1000  # trdq_jax.quant.pipeline.DEFAULT_CALIB_SEED (a test keeps them equal)
RECIPE_NAMES = ("minmax", "quarot", "quarot_rtn", "smoothquant", "svdquant", "trdq",
                "trdq_lowrank", "trdq_lowrank_no_rotation", "trdq_lowrank_no_segments",
                "trdq_no_clip", "trdq_no_gptq", "trdq_no_rotation", "trdq_no_segments",
                "trdq_release", "trdq_smoothing", "trdq_static", "trdq_static_norot", "viditq")


def _recipe(name: str, w_bits: int, a_bits: int, segments: int | None = None):
    from trdq_jax.quant.pipeline import named_recipe
    try:
        return named_recipe(name, w_bits, a_bits, segments)
    except ValueError as e:  # name the flag, not the library argument
        message = str(e)
        for arg, flag in (("recipe:", "--recipe:"), ("w_bits:", "--w-bits:"),
                          ("a_bits:", "--a-bits:"), ("segments:", "--segments:")):
            if message.startswith(arg):
                message = flag + message[len(arg):]
        raise ValueError(message) from None


def _with_format_flags(recipe, args):
    """``recipe`` with ``--low-rank`` / ``--fp8`` / ``--group-size`` applied (errors name the
    flag)."""
    import dataclasses
    from trdq_jax.config import ConfigError
    changes = {}
    if args.low_rank is not None:
        changes["low_rank"] = args.low_rank
    if args.fp8:
        changes["fp8"] = True
    if args.group_size is not None:
        changes["w_group_size"] = changes["a_group_size"] = args.group_size
    try:
        return dataclasses.replace(recipe, **changes)
    except ConfigError as e:
        message = str(e)
        for field, flag in (("Recipe.low_rank:", "--low-rank:"), ("Recipe.fp8:", "--fp8:"),
                            ("Recipe.w_group_size:", "--group-size:"),
                            ("Recipe.a_group_size:", "--group-size:")):
            message = message.replace(field, flag)
        raise ValueError(message) from None


def _calibrate_from_args(args, recipe, loaded=None):
    """(model, params, cfg, calib, seconds) for --model/--checkpoint and the calibration flags
    (``loaded``: ``float_model(args)`` when the caller already has it)."""
    from trdq_jax.quant.pipeline import run_calibration
    model, params, cfg, _ = loaded or float_model(args)
    if recipe.num_segments > cfg.sampler.num_steps:
        raise ValueError(f"--segments: {recipe.num_segments} segments but the sampler has only "
                         f"{cfg.sampler.num_steps} steps")
    t0 = time.perf_counter()
    text = {}
    if getattr(cfg.model, "family", None) == "pixart":
        from trdq_jax.cli._prompts import prompt_list
        given = args.prompt or args.prompts
        text = {"prompts": prompt_list(args, cfg) if given else None,
                "text_encoder": args.text_encoder, "prompt_cache": args.prompt_cache}
    elif args.prompt or args.prompts or args.text_encoder or args.prompt_cache:
        raise ValueError(f"--prompts: the model ({cfg.model.family}) is not conditioned on text")
    with blame(None, text_encoder="--text-encoder", prompts="--prompts",
               cache_dir="--prompt-cache"):
        calib = run_calibration(model, params, cfg, recipe, per_class=args.per_class,
                                seed=args.seed, rows_per_step=args.rows_per_step,
                                num_samples=args.num_samples, progress=True, **text)
    return model, params, cfg, calib, time.perf_counter() - t0


def _calibrate(args) -> int:
    from trdq_jax.files import resolve_target
    from trdq_jax.quant.calib_io import save_calibration
    from trdq_jax.manifest import tree_digest
    resolve_target(args.out, kind="calibration", overwrite=args.overwrite, is_dir=True,
                   arg="--out")
    recipe = _recipe(args.recipe, args.w_bits, args.a_bits, args.segments)
    _, params, cfg, calib, seconds = _calibrate_from_args(args, recipe)
    out = save_calibration(args.out, calib, recipe, cfg, source=source_of(args),
                           params_sha256=tree_digest(params), per_class=args.per_class,
                           num_samples=args.num_samples,
                           seed=args.seed, rows_per_step=args.rows_per_step, seconds=seconds,
                           overwrite=args.overwrite, arg="--out")
    print_json({"out": str(out), "layers": len(calib.stats),
                "segment_of_step": calib.segment_of_step.tolist(), "seconds": round(seconds, 2)})
    return 0


def _quantize_recipe(args, stored):
    """The recipe for ``trdq quantize --calib``: the stored one unless flags change it; a
    named recipe keeps its own segment count (its calibration is derived, see
    ``_from_calibration``), so a baseline stays what it says."""
    if args.recipe is None and args.w_bits is None and args.a_bits is None:
        return stored
    name = args.recipe or stored.name
    w_bits = stored.w_bits if args.w_bits is None else args.w_bits
    a_bits = stored.a_bits if args.a_bits is None else args.a_bits
    if name == stored.name:
        _recipe(name, w_bits, a_bits)  # named errors
        return stored.with_bits(w_bits, a_bits)
    return _recipe(name, w_bits, a_bits)


def _from_calibration(args):
    """(params, cfg, calib, recipe, calibration seconds, VAE or None) of ``--calib DIR``, checked
    against the float model it names (whose VAE, if it has one, the quantized model keeps)."""
    from trdq_jax.quant.calib_io import load_calibration_and_model
    if args.segments is not None:
        raise ValueError("--segments: fixed by the calibration given with --calib")
    if args.set:
        raise ValueError("--set: with --calib the config is the calibration's")
    with blame("--calib"):
        calib, stored, cfg, meta, params = load_calibration_and_model(args.calib)
    if "seed" in meta:  # --choose holds out seeds + 1 and + 2 of the calibration's own seed
        if args.seed not in (DEFAULT_CALIB_SEED, meta["seed"]):
            raise ValueError(f"--seed: with --calib the calibration's seed ({meta['seed']}) is "
                             "used (--choose holds out seeds + 1 and + 2 of it); drop --seed")
        args.seed = meta["seed"]
    recipe = _quantize_recipe(args, stored)
    if recipe != stored:  # another recipe's layer choice and segment table, from these stats
        from trdq_jax.quant.calibrate import derive_calibration
        from trdq_jax.sampling import Sampler
        with blame("--calib"):
            calib = derive_calibration(calib, recipe, Sampler.from_config(cfg.sampler))
    vae = stored_vae(meta["source"].get("checkpoint"), "--calib")
    return params, cfg, calib, recipe, meta.get("seconds", 0.0), vae


def _quantize(args) -> int:
    from trdq_jax.files import resolve_target
    from trdq_jax.quant import quantize, save_quantized
    from trdq_jax.quant.pipeline import quantize_summary
    if bool(args.calib) == bool(args.model or args.checkpoint):
        raise ValueError("--calib: give either --calib DIR or --model NAME / --checkpoint DIR "
                         "(to calibrate on the fly)")
    _check_choose_flags(args, args.recipe or (None if args.calib else "trdq"))
    resolve_target(args.out, kind="quantized", overwrite=args.overwrite, is_dir=True,
                   arg="--out")
    from trdq_jax.sampling.cfg_plan import resolve_plan

    def plan_for(cfg, num_steps):  # checked before any calibration runs
        if args.cfg_plan is None:
            return None
        return resolve_plan(args.cfg_plan, cfg.model, num_steps, arg="--cfg-plan") or None

    if args.calib:
        params, cfg, calib, recipe, calib_seconds, vae = _from_calibration(args)
        recipe = _with_format_flags(recipe, args)  # neither changes the layers or segments
        plan = plan_for(cfg, len(calib.segment_of_step))
        choose = _chooses(args, recipe, cfg)
    else:
        recipe = _with_format_flags(_recipe(
            args.recipe or "trdq", 8 if args.w_bits is None else args.w_bits,
            8 if args.a_bits is None else args.a_bits, args.segments), args)
        loaded = float_model(args)
        plan = plan_for(loaded[2], loaded[2].sampler.num_steps)
        choose = _chooses(args, recipe, loaded[2])  # before calibrating: its errors are early
        vae = stored_vae(args.checkpoint, "--checkpoint")
        _, params, cfg, calib, calib_seconds = _calibrate_from_args(args, recipe, loaded)
    args.choose_samples = args.choose_samples or DEFAULT_CHOOSE_SAMPLES
    if args.confirm_samples is None:
        args.confirm_samples = DEFAULT_CONFIRM_SAMPLES
    if choose:
        from trdq_jax.quant.choose import ANCHORS, COMPONENT_STEPS
        print(f"trdq quantize: choosing {recipe.name}'s components by the error of "
              f"{args.choose_samples} held-out samples (+{args.confirm_samples} to confirm a "
              f"change): up to {1 + len(ANCHORS) + len(COMPONENT_STEPS)} quantizations; "
              "--no-choose quantizes the recipe as given", file=sys.stderr)
    t0 = time.perf_counter()
    chosen = None
    with blame(None, **{"Recipe.low_rank": "--low-rank", "Recipe.w_group_size": "--group-size",
                        "Recipe.a_group_size": "--group-size"}):
        if choose:
            choice = _choose(args, params, cfg, calib, recipe)
            recipe, calib, qparams = choice.recipe, choice.calib, choice.qparams
            chosen = {name: float(f"{error:.6g}") for name, error in choice.errors.items()}
            gains = {name: {"gain": _rounded(g), "se": _rounded(se)}  # NaN: a NaN sample
                     for name, (g, se) in choice.gains.items()}
            confirmations = {name: {"gain": _rounded(g), "se": _rounded(se), "taken": taken}
                             for name, (g, se, taken) in choice.confirmations.items()}
        else:
            qparams = quantize(params, calib, recipe, progress=True)
    summary = quantize_summary(params, qparams, recipe, time.perf_counter() - t0)
    if chosen is not None:
        summary["chosen"] = choice.label
        summary["trajectory_errors"] = chosen
        summary["held_out_gain_db"] = gains  # over the base, +- its standard error
        summary["confirmed_gain_db"] = confirmations  # over the choice then, both sets pooled
    conditioning = None
    if getattr(cfg.model, "family", None) == "pixart":  # text: the null branch calibrated with
        conditioning = {"null_branch": "empty_prompt"}
        if not args.calib:
            from trdq_jax.cli._prompts import prompt_list
            conditioning["prompts"] = (prompt_list(args, cfg) if args.prompt or args.prompts
                                       else "the model's training phrasings of every digit")
    out = save_quantized(args.out, qparams, cfg, recipe, calib.segment_of_step, cfg_plan=plan,
                         vae=vae, conditioning=conditioning, overwrite=args.overwrite,
                         arg="--out")
    print_json({"out": str(out), **summary,
                "calibration_seconds": round(float(calib_seconds), 3)})
    return 0


def _choose_flags(args) -> list[tuple[str, object]]:
    return [("--choose-samples", args.choose_samples),
            ("--confirm-samples", args.confirm_samples),
            ("--choose-margin-se", args.choose_margin_se)]


def _conditional(cfg) -> bool:
    """Whether ``--choose`` can draw held-out samples: class labels or text prompts."""
    return bool(getattr(cfg.model, "num_classes", None)) or getattr(
        cfg.model, "family", None) == "pixart"


def _check_choose_flags(args, name: str | None) -> list[str]:
    """The ``--choose-*`` flags given; an error where recipe ``name`` (None: not known yet) will
    not choose."""
    given = [flag for flag, value in _choose_flags(args) if value is not None]
    if given and args.choose is False:
        raise ValueError(f"{given[0]}: sets how the components are chosen, and --no-choose "
                         "quantizes the recipe as given; drop one of them")
    if given and args.choose is None and name is not None and name not in CHOSEN_BY_DEFAULT:
        raise ValueError(f"{given[0]}: sets how the components are chosen, and the recipe "
                         f"{name!r} quantizes as named (only {' and '.join(CHOSEN_BY_DEFAULT)} "
                         "choose by default); give --choose too")
    return given


def _chooses(args, recipe, cfg) -> bool:
    """Whether ``trdq quantize`` chooses ``recipe``'s components: ``--choose`` / ``--no-choose``
    when given; else the recipes of ``CHOSEN_BY_DEFAULT`` do on a conditional model and every
    other recipe quantizes as named. An unconditional model cannot choose: an error where the
    choice was asked for (``--choose`` or a ``--choose-*`` flag), else a note."""
    given = _check_choose_flags(args, recipe.name)
    if args.choose is False or args.choose is None and recipe.name not in CHOSEN_BY_DEFAULT:
        return False
    if not _conditional(cfg):
        if args.choose or given:  # asked for
            raise ValueError(f"{'--choose' if args.choose else given[0]}: the model is "
                             "unconditional, and the choice draws its held-out samples by "
                             "class or prompt; quantize it with --no-choose (or call "
                             "trdq_jax.quant.choose from Python)")
        print(f"trdq quantize: the model is unconditional, so {recipe.name}'s components are "
              "not chosen (held-out samples need class or text conditioning); quantizing the "
              "recipe as given", file=sys.stderr)
        return False
    return True


def _rounded(value: float) -> float | None:
    """``value`` to 3 decimals for the JSON summary; None where it is not finite."""
    return round(value, 3) if value == value and abs(value) != float("inf") else None


def _choose(args, params, cfg, calib, recipe):
    """``choose_components`` from ``recipe`` on ``--choose-samples`` held-out float samples,
    seed ``--seed + 1`` (not the calibration's), a change confirmed on ``--confirm-samples``
    more (seed ``--seed + 2``): classes spread over all, or for a text model the calibration
    prompts (``--prompt``/``--prompts``; the bundled digits model: its training phrasings of
    every digit) in turn."""
    from trdq_jax.models import build_model, input_shape
    from trdq_jax.quant.choose import choose_components, float_trajectories
    from trdq_jax.quant.pipeline import spread_labels, text_calibration
    from trdq_jax.sampling import Sampler
    model, sampler = build_model(cfg.model), Sampler.from_config(cfg.sampler)
    num_classes = getattr(cfg.model, "num_classes", None)
    text, prompts = getattr(cfg.model, "family", None) == "pixart", None
    if text:  # (an unconditional model never gets here: ``_chooses`` refuses it)
        from trdq_jax.cli._prompts import prompt_list
        prompts = prompt_list(args, cfg) if args.prompt or args.prompts else None

    def held_out(count, offset):  # float samples of seed --seed + offset
        if text:
            with blame(None, text_encoder="--text-encoder", prompts="--prompts",
                       cache_dir="--prompt-cache"):
                cond, null = text_calibration(cfg, 1, count, prompts, args.text_encoder,
                                              args.prompt_cache)
            given = {"cond": cond, "null_cond": null, "shape": input_shape(cfg.model, count)}
        else:
            labels = spread_labels(num_classes, count)
            given = {"labels": labels, "null_label": num_classes,
                     "shape": input_shape(cfg.model, len(labels))}
        return float_trajectories(model, params, sampler, **given,
                                  seed=(args.seed + offset) % 2 ** 32,
                                  cfg_scale=cfg.sampler.cfg_scale)

    traj = held_out(args.choose_samples, 1)
    confirm = held_out(args.confirm_samples, 2) if args.confirm_samples else None
    return choose_components(model, params, calib, recipe, sampler, traj, progress=True,
                             margin_se=1.0 if args.choose_margin_se is None
                             else args.choose_margin_se, confirm=confirm)


def _plot_ranges(args) -> int:
    from trdq_jax import plots
    from trdq_jax.files import resolve_target
    from trdq_jax.quant import calibrated_selection, quantize_layer
    from trdq_jax.quant.ranges import layer_ranges, plot_layers
    if not str(args.out).lower().endswith(".png"):
        raise ValueError(f"--out: expected a .png file name, got {args.out!r}")
    resolve_target(args.out, kind="figure", overwrite=args.overwrite, is_dir=False, arg="--out")
    if args.layers:
        try:
            re.compile(args.layers)
        except re.error as e:  # before the calibration, not after it
            raise ValueError(f"--layers: invalid regex {args.layers!r}: {e}") from None
    recipe = _recipe(args.recipe, args.w_bits, args.a_bits, args.segments)
    model, params, cfg, calib, _ = _calibrate_from_args(args, recipe)
    selection = calibrated_selection(calib, recipe)
    quantized = [p for p in selection.quantized if p not in selection.weight_only]
    try:
        layers = plot_layers(quantized, args.layers)
    except ValueError as e:
        raise ValueError(f"--layers: {str(e).removeprefix('pattern: ')}") from None
    ranges = {}
    for path in layers:
        dense = params
        for name in path.split("/"):
            dense = dense[name]
        q = quantize_layer(dense["kernel"], dense.get("bias"), calib.stats[path],
                           calib.segment_of_step, calib.num_segments, recipe, path)
        ranges[path] = layer_ranges(calib.stats[path], q, calib.segment_of_step)
    title = (f"{cfg.name}: activation range per sampling step, before / after {recipe.name} "
             f"smoothing+rotation ({cfg.sampler.solver} {cfg.sampler.num_steps} steps)")
    with blame(None, path="--out"):
        size = plots.save_range_figure(args.out, ranges, calib.segment_of_step, title=title,
                                       overwrite=args.overwrite)
    print_json({"out": str(args.out), "size": list(size), "layers": {
        p: {"before_absmax": round(before.absmax, 4), "after_absmax": round(after.absmax, 4)}
        for p, (before, after) in ranges.items()}})
    return 0


def _add_calibration_flags(p, recipe_default: str | None) -> None:
    default = "%(default)s" if recipe_default else "the calibration's, else 8"
    recipe = "%(default)s" if recipe_default else "the calibration's recipe, else trdq"
    p.add_argument("--recipe", default=recipe_default, choices=RECIPE_NAMES,
                   help=f"quantization method (default: {recipe})")
    p.add_argument("--w-bits", type=bits, default=8 if recipe_default else None,
                   help=f"weight bits 2..8, 16 = float (default: {default})")
    p.add_argument("--a-bits", type=bits, default=8 if recipe_default else None,
                   help=f"activation bits 2..8, 16 = float (default: {default})")
    p.add_argument("--segments", type=positive_int,
                   help="time segments (default: the recipe's)")
    p.add_argument("--per-class", type=positive_int, default=4,
                   help="calibration samples per class (default: %(default)s)")
    p.add_argument("--num-samples", type=positive_int, default=None, metavar="N",
                   help="instead of --per-class: N calibration samples of classes spread evenly "
                        "over all (e.g. 32 for ImageNet's 1000 classes) (default: none)")
    add_seed(p, "calibration seed, not an evaluation seed")
    p.set_defaults(seed=DEFAULT_CALIB_SEED)
    p.add_argument("--rows-per-step", type=positive_int, default=64,
                   help="activation rows kept per step and layer (default: %(default)s)")
    from trdq_jax.cli._prompts import add_prompt_args
    add_prompt_args(p)  # a text model's calibration prompts (--per-class samples of each)


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="collect activation statistics + time segments")
    add_source(p)
    _add_calibration_flags(p, "trdq")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="calibration directory to write, new or empty (required)")
    add_overwrite(p, "calibration directory")
    add_debug(p)
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("quantize", help="quantize a float model from a calibration directory "
                                        "(or calibrate on the fly with --model/--checkpoint)")
    p.add_argument("--calib", metavar="DIR",
                   help="a `trdq calibrate` directory (default: none; then --model or "
                        "--checkpoint calibrates on the fly)")
    add_source(p)
    _add_calibration_flags(p, None)
    p.add_argument("--out", required=True, metavar="QDIR",
                   help="quantized checkpoint directory to write, new or empty (required)")
    p.add_argument("--low-rank", type=rank_int, metavar="R",
                   help="rank of a float (bf16) low-rank branch beside each quantized matmul, "
                        "the residual quantized; 0 = none (default: the recipe's: 32 for "
                        "svdquant, 16 for trdq_lowrank*, else 0)")
    p.add_argument("--fp8", action="store_true",
                   help="float8 e4m3 weight and activation codes instead of int8 (needs "
                        "--w-bits 8 --a-bits 8) (default: off)")
    p.add_argument("--group-size", type=rank_int, metavar="G",
                   help="input channels per weight scale and per dynamic activation scale "
                        "(SVDQuant's INT4 format: 64); 0 = per output channel / per token "
                        "(default: the recipe's: 64 for svdquant, else 0)")
    p.add_argument("--choose", action=argparse.BooleanOptionalAction, default=None,
                   help="choose the recipe's components: the best of the recipe and the "
                        "baselines' block combinations (QuaRot, ViDiT-Q+GPTQ, static segments), "
                        "then smoothing, rotation, time segments, clipping one at a time, each "
                        "judged by the error of held-out samples (seed --seed + 1) against the "
                        "float model's; up to 17 quantizations and samplings (7-15 min on 2 CPU "
                        "cores for the bundled digits models); --no-choose: the recipe as named "
                        f"(default: on for {' and '.join(CHOSEN_BY_DEFAULT)} with a class- or "
                        "text-conditional model, off for the baselines and ablations)")
    p.add_argument("--choose-samples", type=positive_int, default=None, metavar="N",
                   help="held-out samples --choose judges on: classes spread evenly, or the "
                        "calibration prompts in turn; fewer are faster and noisier (30 "
                        "misjudged by up to 1.6 dB on the bundled models) (default: "
                        f"{DEFAULT_CHOOSE_SAMPLES})")
    p.add_argument("--confirm-samples", type=rank_int, default=None, metavar="N",
                   help="--choose takes a change that wins on the held-out samples only when it "
                        "also wins with N more (seed --seed + 2) pooled in: the best of a dozen "
                        "noisy comparisons is flattered by its noise; the float model samples "
                        "them once, a candidate only when its change is at stake; 0: no "
                        f"confirmation (default: {DEFAULT_CONFIRM_SAMPLES})")
    p.add_argument("--choose-margin-se", type=nonnegative_float, default=None, metavar="Z",
                   help="--choose keeps a change only when its gain over the current choice "
                        "also exceeds Z standard errors of the per-sample gain on the held-out "
                        "samples (and by 0.1 dB); 0: the 0.1 dB margin alone, which follows "
                        "noise on 30 samples (default: 1)")
    p.add_argument("--cfg-plan", "--share-plan", dest="cfg_plan", metavar="PLAN",
                   help="CFG sharing plan stored with the checkpoint (trdq sample uses it): "
                        "none | all | trdq_release | a plan .json (default: none stored)")
    add_overwrite(p, "quantized checkpoint")
    add_debug(p)
    p.set_defaults(func=_quantize)

    p = sub.add_parser("plot-ranges", help="activation ranges per sampling step before/after "
                                           "the recipe's smoothing+rotation (PNG)")
    add_source(p)
    _add_calibration_flags(p, "trdq")
    p.set_defaults(per_class=2)
    p.add_argument("--layers", metavar="REGEX",
                   help="layers to plot (default: qkv and fc2 of the first and last block)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="output PNG file (required)")
    add_overwrite(p, "figure")
    add_debug(p)
    p.set_defaults(func=_plot_ranges)
