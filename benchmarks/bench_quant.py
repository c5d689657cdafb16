"""Quality, size and cost of every quantization recipe on the bundled diffusion models.

For each model x bit width x recipe in ``trdq_jax.quant.RECIPES``: PSNR / SSIM of the quantized
samples against the float model's samples drawn from the SAME noise and labels, digits-FID
against held-out data, class match, bytes of the quantized layers and their ratio to the same
layers stored as bf16, and calibration + quantize seconds. Statistics are collected once per
model and every recipe's calibration is derived from them (``derive_calibration``).

    PYTHONPATH=. python benchmarks/bench_quant.py [--models digits-dit,...] \\
        [--bits W8A8,W6A6,W4A8,W4A4] [--recipes trdq,quarot,...] [--per-class 10] \\
        [--write BENCHMARKS.md]

A recipe may carry field overrides for ablations: ``--recipes "trdq,trdq[gptq=False;alpha=0.5]"``.

``--write`` replaces the text between ``<!-- bench_quant:begin -->`` and
``<!-- bench_quant:end -->`` in that file (appending the markers if absent).
"""
from __future__ import annotations

import os

# Small numpy matmuls (DuQuant's rotation products) thrash with a multi-threaded OpenBLAS on a
# busy 2-core machine (8x slower measured); XLA does the heavy work on its own threads anyway.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import ast  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from trdq_jax import files, quant as Q  # noqa: E402
from trdq_jax.eval import psnr, ssim  # noqa: E402
from trdq_jax.eval.judge import heldout_data, judge  # noqa: E402
from trdq_jax.sampling.generate import null_label  # noqa: E402
from trdq_jax.models import input_shape, zoo  # noqa: E402
from trdq_jax.quant import duquant  # noqa: E402
from trdq_jax.quant.calibrate import derive_calibration  # noqa: E402
from trdq_jax.sampling import Sampler, conditioning, denoise_fn_for, sample  # noqa: E402

DIFFUSION_MODELS = ("digits-dit", "digits-unet", "moving-digits-vdit", "digits-pixart")
SECTION = "bench_quant"  # --section: another name keeps its own marked section


def _markers(section: str = SECTION) -> tuple[str, str]:
    return f"<!-- {section}:begin -->", f"<!-- {section}:end -->"


BEGIN, END = _markers()
TIE_DB = 0.5  # recipes closer than this in PSNR are reported as tied


def memoise_duquant() -> dict:
    """Make ``duquant.calibrate_duquant`` remember its results by input digest for this process.

    DuQuant rotations depend on the (smoothed) activation rows, not on the bit width, so the
    ``trdq_release`` rows of the 2nd, 3rd... bit width reuse the rotations of the first: the
    results are identical, only their quantize seconds drop. Returns the memo (clear per model).
    """
    original = getattr(duquant.calibrate_duquant, "__wrapped__", duquant.calibrate_duquant)
    memo: dict = {}

    @functools.wraps(original)
    def calibrate(x, block=128, **kwargs):
        x = np.ascontiguousarray(x, np.float32)
        key = (hashlib.sha1(x.tobytes()).hexdigest(), x.shape, block, tuple(sorted(kwargs.items())))
        if key not in memo:
            memo[key] = original(x, block, **kwargs)
        return memo[key]

    duquant.calibrate_duquant = calibrate
    return memo


def parse_recipes(text: str) -> list[tuple[str, str, dict]]:
    """``"trdq,trdq[gptq=False;num_segments=1],trdq+choose"`` -> ``[(label, recipe name,
    overrides)]``; a ``+choose`` suffix sets ``overrides["+choose"] = True``: the row's recipe is
    the one ``trdq_jax.quant.choose.choose_components`` reaches from it; ``+choose<=0.35``
    chooses under that byte budget (``max_ratio``, x bf16), stored as ``overrides["+choose"]
    = 0.35``."""
    out = []
    for spec in re.split(r",(?![^\[]*\])", text):
        m = re.fullmatch(r"\s*(\w+)\s*(?:\[(.*)\])?\s*(\+choose(?:<=([0-9.]+))?)?\s*", spec)
        if not m or m.group(1) not in Q.RECIPES:
            raise ValueError(f"--recipes: expected names from {sorted(Q.RECIPES)} with optional "
                             f"[field=value;...] overrides, got {spec!r}")
        overrides = {}
        for item in filter(None, (m.group(2) or "").split(";")):
            key, _, value = item.partition("=")
            try:
                overrides[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                raise ValueError(f"--recipes: bad override {item!r} in {spec!r}") from None
        if m.group(3):
            overrides["+choose"] = float(m.group(4)) if m.group(4) else True
        out.append((spec.strip(), m.group(1), overrides))
    return out


def parse_bits(text: str) -> list[tuple[int, int]]:
    """``"W8A8,W4A16"`` -> ``[(8, 8), (4, 16)]``."""
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"W(\d+)A(\d+)", item.strip(), re.IGNORECASE)
        if not m:
            raise ValueError(f"--bits: expected comma-separated WxAy like W4A8, got {item!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def _conditions(cfg, labels, templates=None):
    """``(cond, null)`` asking ``cfg``'s model for ``labels``: the labels and the null label,
    or, for a text model, the digits in words (``templates``, default the held-out ones) and
    the empty prompt."""
    if cfg.model.family != "pixart":
        return labels, null_label(cfg.model)
    from trdq_jax.sampling.prompts import digit_prompt_conditioning
    cond, null, _ = digit_prompt_conditioning(labels, cfg.train.text_encoder,
                                              cfg.model.max_tokens, templates=templates)
    return cond, null


def validation_templates(per_class: int) -> tuple[str, ...]:
    """The phrasings a text model's ``+choose`` validates on: the held-out templates that the
    judged prompts (``prompts_for``: template ``k % 4`` for a digit's ``k``-th sample) do not
    use, so the choice sees neither the calibration's phrasings nor the judged ones; with
    ``per_class >= 4`` every held-out template is judged and the training ones are used."""
    from trdq_jax.data.captions import HELDOUT_TEMPLATES, TRAIN_TEMPLATES
    return HELDOUT_TEMPLATES[per_class:] or TRAIN_TEMPLATES


def _sample_all(apply_fn, params, sampler, conds, cfg, seed):
    """Samples of every conditioning in ``conds`` (``_conditions``) in batches of
    ``cfg.generation.batch_size``; sample i depends on ``(seed, i)`` only, so float and
    quantized runs see the same noise."""
    cond, null = conds
    out, batch, n = [], cfg.generation.batch_size, conditioning.batch_size(cond)
    for start in range(0, n, batch):
        chunk = np.arange(start, min(start + batch, n))
        nulls = ({"null_label": null} if isinstance(null, int) else
                 {"null_cond": conditioning.take_null(null, cond, chunk)})
        out.append(np.asarray(sample(apply_fn, params, sampler, conditioning.take(cond, chunk),
                                     seed=seed, cfg_scale=cfg.sampler.cfg_scale, **nulls,
                                     shape=input_shape(cfg.model, len(chunk)),
                                     sample_offset=start)))
    return np.concatenate(out)


def _scores(samples, labels, reference, float_samples=None) -> dict:
    samples = np.clip(samples, -1.0, 1.0)
    judged = judge(samples, labels, reference)
    match = judged["class_match"]
    row = {"fid": judged["digits_fid"], "class_match": match["accuracy"],
           "frame_match": match.get("frame_accuracy")}
    if float_samples is not None:
        # videos: one PSNR per video (its frames stacked into one tall image), since single
        # frames can match exactly (inf dB) where a digit leaves the canvas
        as_image = (lambda v: v.reshape(v.shape[0], -1, *v.shape[-2:])) if samples.ndim == 5 \
            else (lambda v: v)
        values, row["psnr"] = psnr(as_image(samples), as_image(float_samples))
        row["psnr_values"] = values  # per sample: paired differences between rows
        row["ssim"] = ssim(samples, float_samples)[1]
    return row


def bench_model(name: str, bits: list[tuple[int, int]], recipes: list[tuple[str, str, dict]],
                per_class: int,
                calib_per_class: int, seed: int, bar, choose_per_class: int = 10,
                choose_margin_se: float = 1.0, confirm_per_class: int = 10) -> dict:
    """Every (bits, recipe) row of one bundled model (plus its float row); a ``+choose`` row
    judges its candidates on ``choose_per_class`` held-out samples per class, a change winning
    by ``choose_margin_se`` standard errors too (``choose_components``' ``margin_se``), and
    confirmed on ``confirm_per_class`` further samples per class (seed + 3; 0: none)."""
    model, params, cfg = zoo.load(name)
    sampler = Sampler.from_config(cfg.sampler)
    num_classes = getattr(cfg.model, "num_classes", 10)  # a text model: the ten digits
    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    conds = _conditions(cfg, labels)
    reference, _ = heldout_data(cfg.model)
    float_samples = np.clip(_sample_all(denoise_fn_for(model), params, sampler, conds, cfg, seed),
                            -1.0, 1.0)
    result = {"model": name, "float": _scores(float_samples, labels, reference), "rows": [],
              "num_samples": len(labels), "sampler": f"{cfg.sampler.solver} "
              f"{cfg.sampler.num_steps} steps, cfg {cfg.sampler.cfg_scale}"}
    bar.write(f"{name} float: FID {result['float']['fid']:.2f}, "
              f"match {_match(result['float'])}")
    calib_labels = np.repeat(np.arange(num_classes), calib_per_class)
    # a text model calibrates on its training phrasings; it is judged on the held-out ones
    from trdq_jax.data.captions import TRAIN_TEMPLATES
    calib_cond, calib_null = _conditions(cfg, calib_labels, TRAIN_TEMPLATES)
    start = time.perf_counter()
    given = ({"labels": calib_cond, "null_label": calib_null} if isinstance(calib_null, int)
             else {"cond": calib_cond, "null_cond": calib_null})
    shared = Q.calibrate(model, params, Q.get_recipe(recipes[0][1]), sampler, **given,
                         shape=input_shape(cfg.model, len(calib_labels)), seed=seed + 1,
                         cfg_scale=cfg.sampler.cfg_scale)
    result["calib_seconds"] = time.perf_counter() - start
    result["calib_samples"] = len(calib_labels)
    memoise_duquant().clear()
    traj = confirm = None
    if any("+choose" in overrides for _, _, overrides in recipes):
        # held-out samples: seeds neither calibration nor judging uses
        from trdq_jax.quant.choose import float_trajectories

        def held_out(count, held_seed):
            held_labels = np.repeat(np.arange(num_classes), count)
            held_cond, held_null = _conditions(cfg, held_labels, validation_templates(per_class))
            held = ({"labels": held_cond, "null_label": held_null} if isinstance(held_null, int)
                    else {"cond": held_cond, "null_cond": held_null})
            return float_trajectories(model, params, sampler, **held, seed=held_seed,
                                      shape=input_shape(cfg.model, len(held_labels)),
                                      cfg_scale=cfg.sampler.cfg_scale)
        traj = held_out(choose_per_class, seed + 2)
        confirm = held_out(confirm_per_class, seed + 3) if confirm_per_class else None
    for w_bits, a_bits in bits:
        for recipe_name, base, overrides in recipes:
            bar.set_postfix_str(f"{name} W{w_bits}A{a_bits} {recipe_name}")
            overrides = dict(overrides)
            chosen = overrides.pop("+choose", False)
            recipe = Q.get_recipe(base, w_bits, a_bits, **overrides)
            start = time.perf_counter()
            if chosen:
                from trdq_jax.quant.choose import choose_components
                budget = None if chosen is True else chosen
                choice = choose_components(model, params, shared, recipe, sampler, traj,
                                           max_ratio=budget, margin_se=choose_margin_se,
                                           confirm=confirm)
                calib, qparams = choice.calib, choice.qparams
                recipe_label = (f"{recipe_name} ({choice.label}"
                                + (f"; margin {choose_margin_se:g} SE" if choose_margin_se
                                   else "")
                                + ("; confirmed" if confirm is not None else "") + ")")
                bar.write(f"{name} W{w_bits}A{a_bits} {recipe_label}, held-out dB over base "
                          "+- SE: " + ", ".join(f"{k} {g:+.2f} +- {se:.2f}"
                                                for k, (g, se) in choice.gains.items()))
                if choice.confirmations:
                    bar.write("  confirmation, pooled dB over the choice then +- SE: " + ", ".join(
                        f"{k} {g:+.2f} +- {se:.2f} ({'taken' if taken else 'refused'})"
                        for k, (g, se, taken) in choice.confirmations.items()))
            else:
                calib = derive_calibration(shared, recipe, sampler)
                qparams = jax.block_until_ready(Q.quantize(params, calib, recipe))
                recipe_label = recipe_name
            quant_seconds = time.perf_counter() - start
            paths = Q.quantized_layer_paths(qparams)
            held = Q.weight_bytes(qparams)
            qbytes = held["quantized_layers"]
            samples = _sample_all(Q.QuantizedDenoiser(model, "xla"), qparams,
                                  sampler.with_segments(calib.segment_of_step,
                                                        calib.num_segments), conds, cfg, seed)
            result["rows"].append({"bits": f"W{w_bits}A{a_bits}", "recipe": recipe_label,
                                   **_scores(samples, labels, reference, float_samples),
                                   "bytes": qbytes,
                                   "ratio": qbytes / Q.float_bytes_of(params, paths),
                                   "model_ratio": held["total"] / _bf16_bytes(params),
                                   "quant_seconds": quant_seconds})
            r = result["rows"][-1]
            bar.write(f"{name} {r['bits']} {recipe_label}: PSNR {r['psnr']:.2f} dB, SSIM "
                      f"{r['ssim']:.4f}, FID {r['fid']:.2f}, match {_match(r)}, "
                      f"{r['ratio']:.3f}x bf16, quantize {quant_seconds:.1f} s")
            bar.update()
            # each compiled program holds ~7 memory maps until the caches drop it: all widths
            # of the UNet with +choose rows in one process passed vm.max_map_count (65530) and
            # died in LLVM ("Cannot allocate memory")
            jax.clear_caches()
    return result


def _bf16_bytes(params) -> int:
    """Bytes of the whole float model stored as bf16 (2 bytes per parameter)."""
    return 2 * sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))


def verdict(rows: list[dict]) -> str:
    """One line per bit width: tied within TIE_DB, or the ranking where recipes differ."""
    values = sorted(((r["psnr"], r["recipe"]) for r in rows), reverse=True)
    spread = values[0][0] - values[-1][0]
    if spread < TIE_DB:
        return (f"every recipe lands within {TIE_DB} dB (spread {spread:.2f} dB): "
                f"no ranking is claimed at this width")
    tied = [n for v, n in values if values[0][0] - v < TIE_DB]
    ranking = " > ".join(f"{n} {v:.2f}" for v, n in values)
    best = " and ".join(tied) + (" (tied within 0.5 dB)" if len(tied) > 1 else "")
    return f"recipes differ (spread {spread:.2f} dB); best: {best}; PSNR dB: {ranking}"


LEGEND = ("PSNR / SSIM: quantized vs float samples from the same noise and labels (clipped to "
          "[-1, 1], data range 2); digits-FID vs held-out data (our digits classifier's features, "
          "comparable within this project only); class match: fraction classified as their "
          "label (for the text model `digits-pixart`: prompt match, the digit named by a "
          "prompt phrased in a template held out of training; calibrated on the training "
          "phrasings). Bytes: every array of the quantized layers (codes, scales, rotations, "
          "per-segment copies); x bf16: ratio to the same layers stored as bf16; model x bf16: "
          "every byte the quantized model holds (quantized layers + float remainder, float32) "
          "over the whole float model in bf16. Quantize s: "
          "deriving the recipe's calibration from the shared statistics + `quantize` (add the "
          "shared statistics time for a stand-alone run); DuQuant rotations do not depend on the "
          "bit width and are computed once per model, so only the first bit width's "
          "`trdq_release` row includes their search. Backend `xla` (int8 dot), "
          "`OPENBLAS_NUM_THREADS=1`. dB vs first row: the mean over samples of this row's "
          "PSNR minus the first row's at the same width, +- its standard error (how far two "
          "rows' order is resolved by these samples). A bit width where every recipe lands "
          "within 0.5 dB PSNR is reported as a tie; elsewhere the ranking is given.")


def _model_markers(name: str, section: str = SECTION) -> tuple[str, str]:
    return f"<!-- {section}:model:{name} -->", f"<!-- /{section}:model:{name} -->"


def _match(row: dict) -> str:
    """Class match; for videos ``frames f / videos v`` (a video matches when all frames do)."""
    if row.get("frame_match") is None:
        return f"{row['class_match']:.3f}"
    return f"frames {row['frame_match']:.3f} / videos {row['class_match']:.3f}"


def paired_gain(row: dict, first: dict) -> str:
    """``row``'s mean PSNR gain over ``first`` (same samples) +- the standard error of the
    mean of the per-sample differences: how far the ranking of two rows is resolved."""
    if row is first:
        return "(reference)"
    from trdq_jax.quant.choose import mean_and_se
    diff = np.asarray(row["psnr_values"], np.float64) - np.asarray(first["psnr_values"])
    gain, se = mean_and_se(diff[np.isfinite(diff)])  # an exact sample gives inf - inf
    return "n/a" if np.isnan(se) else f"{gain:+.2f} +- {se:.2f}"


def model_block(res: dict, command: str, section: str = SECTION) -> str:
    """Markdown of one model's results, wrapped in its own markers."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    f = res["float"]
    begin, end = _model_markers(res["model"], section)
    lines = [begin, f"### {res['model']}", "", f"Command: `{command}`  ",
             f"Date: {now}; machine: {platform.machine()} {jax.devices()[0].platform.upper()}, "
             f"{_cores()} cores, jax {jax.__version__}.  ",
             f"{res['num_samples']} samples ({res['sampler']}); statistics from "
             f"{res['calib_samples']} calibration samples in {res['calib_seconds']:.1f} s. "
             f"Float: digits-FID {f['fid']:.2f}, class match {_match(f)}.", "",
             "| bits | recipe | PSNR dB | SSIM | digits-FID | class match | bytes | "
             "x bf16 | model x bf16 | quantize s | dB vs first row +- SE |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    first = {}
    for r in res["rows"]:
        first.setdefault(r["bits"], r)
        lines.append(f"| {r['bits']} | {r['recipe']} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                     f"{r['fid']:.2f} | {_match(r)} | {r['bytes']:,} | "
                     f"{r['ratio']:.3f} | {r.get('model_ratio', float('nan')):.3f} | "
                     f"{r['quant_seconds']:.1f} | {paired_gain(r, first[r['bits']])} |")
    lines += [""]
    for bits in dict.fromkeys(r["bits"] for r in res["rows"]):
        lines.append(f"- **{bits}**: {verdict([r for r in res['rows'] if r['bits'] == bits])}")
    lines.append(end)
    return "\n".join(lines)


def to_markdown(blocks: dict[str, str], previous: str = "", section: str = SECTION,
                title: str = "recipes x bit widths") -> str:
    """The whole marked section: the legend, then one block per model in ``DIFFUSION_MODELS``
    order, taken from ``blocks`` or else kept from the ``previous`` section's text."""
    begin_section, end_section = _markers(section)
    parts = [begin_section, f"## {section}: {title}", "", LEGEND, ""]
    for name in DIFFUSION_MODELS:
        begin, end = _model_markers(name, section)
        if name in blocks:
            parts += [blocks[name], ""]
        elif begin in previous and end in previous:
            parts += [begin + previous.split(begin, 1)[1].split(end, 1)[0] + end, ""]
    parts.append(end_section)
    return "\n".join(parts)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def write_section(path: pathlib.Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between the ``begin`` / ``end`` markers of ``path`` by ``section`` (which
    carries the markers); create the file / append the section where they are absent."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    files.replace_file(path, lambda tmp: tmp.write_text(text))  # a kill never truncates it


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None,
                        help="comma-separated bundled diffusion models (default: those present)")
    parser.add_argument("--bits", default="W8A8,W6A6,W4A8,W4A4")
    parser.add_argument("--recipes", default=",".join(Q.RECIPES))
    parser.add_argument("--per-class", type=int, default=10, help="judged samples per class")
    parser.add_argument("--calib-per-class", type=int, default=2,
                        help="calibration samples per class")
    parser.add_argument("--choose-per-class", type=int, default=10,
                        help="held-out samples per class that a +choose row judges its "
                             "candidates on (default: %(default)s)")
    parser.add_argument("--choose-margin-se", type=float, default=1.0,
                        help="a +choose row's change must also win by this many standard "
                             "errors of its per-sample gain, beside the 0.1 dB margin (default: "
                             "%(default)s; 0: the margin alone)")
    parser.add_argument("--confirm-per-class", type=int, default=10,
                        help="further held-out samples per class on which a +choose row's "
                             "change must win again, pooled with the first (default: "
                             "%(default)s; 0: no confirmation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", default=None, help="markdown file whose section to replace")
    parser.add_argument("--section", default=SECTION,
                        help="name of the marked section to write (default: %(default)s; "
                             "another name keeps a study beside the main table)")
    parser.add_argument("--title", default="recipes x bit widths", help="the section's title")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[a-z0-9_]+", args.section):
        parser.error(f"--section: expected lowercase letters, digits and _, got {args.section!r}")
    models = (args.models.split(",") if args.models
              else [m for m in DIFFUSION_MODELS if m in zoo.available()])
    unknown = [m for m in models if m not in DIFFUSION_MODELS]
    if unknown:
        parser.error(f"--models: {unknown} are not bundled diffusion models {DIFFUSION_MODELS}")
    try:
        recipes = parse_recipes(args.recipes)
    except ValueError as e:
        parser.error(str(e))
    if not args.choose_margin_se >= 0:
        parser.error(f"--choose-margin-se: expected a number >= 0, got {args.choose_margin_se}")
    if args.per_class < 1 or args.calib_per_class < 1 or args.choose_per_class < 1:
        parser.error("--per-class / --calib-per-class / --choose-per-class: expected positive "
                     "ints")
    if args.confirm_per_class < 0:
        parser.error(f"--confirm-per-class: expected an int >= 0, got {args.confirm_per_class}")
    bits = parse_bits(args.bits)
    from tqdm import tqdm
    results = []
    with tqdm(total=len(models) * len(bits) * len(recipes), desc="bench_quant", unit="row") as bar:
        for name in models:
            results.append(bench_model(name, bits, recipes, args.per_class, args.calib_per_class,
                                       args.seed, bar, args.choose_per_class,
                                       args.choose_margin_se, args.confirm_per_class))
    command = "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in
                                                 ["benchmarks/bench_quant.py", *sys.argv[1:]])
    blocks = {res["model"]: model_block(res, command, args.section) for res in results}
    path = pathlib.Path(args.write) if args.write else None
    previous = path.read_text() if path is not None and path.exists() else ""
    begin, end = _markers(args.section)
    section = to_markdown(blocks, previous.split(begin, 1)[1] if begin in previous else "",
                          args.section, args.title)
    print(section)
    if path is not None:
        write_section(path, section, begin, end)


if __name__ == "__main__":
    main()
