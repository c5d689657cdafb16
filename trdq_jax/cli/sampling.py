"""``trdq sample | demo``: sample grids of a float or quantized model, and the main job."""
from __future__ import annotations

import pathlib
import sys
import time

import numpy as np

from trdq_jax.cli._common import (add_debug, add_overwrite, add_seed, add_set, blame, cfg_scale,
                                  float_model, positive_int, print_json, seed_int, stored_vae)
from trdq_jax.cli._prompts import (add_prompt_args, check_prompt_flags, is_text_model,
                                   prompt_conditioning, prompt_list)

BACKENDS = ("xla", "fake", "pallas", "auto")  # trdq_jax.quant.BACKENDS, without importing quant


def _denoiser(args):
    """``(model, params, cfg, source, sampler, apply_fn)`` of ``--quantized`` (its stored
    sampler and a ``QuantizedDenoiser``) or of ``--model`` / ``--checkpoint`` (None, None:
    the config's sampler and the float model)."""
    if args.quantized:
        from trdq_jax.quant.io import load_quantized_model
        with blame("--quantized"):
            return load_quantized_model(args.quantized, args.backend, args.set, arg="--set")
    if args.backend != "xla":
        raise ValueError("--backend: only applies to --quantized checkpoints")
    return (*float_model(args), None, None)


def _vae(args):
    """``(VAEConfig, params)`` stored with ``--checkpoint`` / ``--quantized`` (a latent model's
    decoder), or None: bundled models sample pixels directly."""
    if args.quantized:
        return stored_vae(args.quantized, "--quantized")
    return stored_vae(args.checkpoint, "--checkpoint")


def _class_list(text: str | None, num_classes: int, flag: str = "--labels") -> np.ndarray:
    """The classes of ``--labels`` (comma-separated ints in [0, num_classes)); all by default."""
    if text is None:
        return np.arange(num_classes)
    values = _int_list(text, flag)
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"{flag}: expected classes in [0, {num_classes - 1}], got {bad[:5]}")
    return np.asarray(list(dict.fromkeys(values)))


def _sample(args) -> int:
    from trdq_jax.files import resolve_target
    from trdq_jax.sampling.generate import generate, grid_rows
    from trdq_jax.sampling.sample_dir import save_sample_dir
    resolve_target(args.out, kind="samples", overwrite=args.overwrite, is_dir=True, arg="--out")
    model, params, cfg, source, sampler, apply_fn = _denoiser(args)
    check_prompt_flags(args, cfg)
    vae = _vae(args)
    share = _share_cfg(args, cfg)
    null, text_info = None, {}
    if is_text_model(cfg):  # rows are prompts; "labels" holds each sample's prompt index
        prompts = prompt_list(args, cfg)
        classes = np.arange(len(prompts))
        labels = np.repeat(classes, args.per_class)
        cond, null, text_info = prompt_conditioning(args, cfg, prompts, labels)
        row_names = [p if len(p) <= 40 else p[:37] + "..." for p in prompts]
    else:
        classes = _class_list(args.labels, cfg.model.num_classes)
        labels = cond = np.repeat(classes, args.per_class)
        row_names = [f"class {c}" for c in classes]
    if vae is not None:
        from trdq_jax.sampling.decode import check_vae_for
        with blame("--checkpoint" if args.checkpoint else "--quantized"):
            check_vae_for(cfg.model, vae[0])
    t0 = time.perf_counter()
    samples = generate(model, params, cfg, cond, null_cond=null, seed=args.seed,
                       cfg_scale=args.cfg_scale, share_cfg=share, progress=True,
                       sampler=sampler, apply_fn=apply_fn)
    seconds = time.perf_counter() - t0
    pixels, shown = None, samples
    if vae is not None:  # the grid shows the decoded pictures; samples.npz keeps the latents
        from trdq_jax.sampling.decode import make_decoder
        pixels = np.asarray(make_decoder(*vae)(samples))
        shown = pixels.astype(np.float32) / 127.5 - 1.0
    num_rows = len(classes) if is_text_model(cfg) else cfg.model.num_classes
    rows = [r for c, r in enumerate(grid_rows(shown, labels, num_rows))
            if c in set(classes.tolist())]
    out = save_sample_dir(
        args.out, samples, labels, cfg=cfg, source=source, grid_rows=rows, pixels=pixels,
        row_labels=row_names,
        title=f"{source} | {cfg.sampler.solver} {cfg.sampler.num_steps} steps",
        info={"seed": args.seed, "share_cfg": share if isinstance(share, bool) else share.name,
              "cfg_scale": cfg.sampler.cfg_scale if args.cfg_scale is None else args.cfg_scale,
              **text_info},
        overwrite=args.overwrite, arg="--out")
    print_json({"out": str(out), "num_samples": int(len(labels)), "seconds": round(seconds, 2)})
    return 0


def _share_cfg(args, cfg):
    """``share_cfg`` for ``sample``: --share-cfg, --cfg-plan (a preset or a plan file), or the
    plan stored with a --quantized checkpoint; False without any of them."""
    from trdq_jax.sampling.cfg_plan import resolve_plan
    if args.cfg_plan is not None:
        if args.share_cfg:
            raise ValueError("--cfg-plan: give either --share-cfg (every layer, every step) or "
                             "--cfg-plan")
        return resolve_plan(args.cfg_plan, cfg.model, cfg.sampler.num_steps, arg="--cfg-plan")
    if args.quantized and not args.share_cfg:
        from trdq_jax.quant.io import stored_cfg_plan
        with blame("--quantized"):
            return stored_cfg_plan(args.quantized) or False
    return args.share_cfg


def _demo(args) -> int:
    from trdq_jax.demo import run_demo
    with blame(None, cfg_plan="--cfg-plan", model="--model", per_class="--per-class",
               quant_per_class="--quant-per-class", seed="--seed"):
        report = run_demo(args.out, args.model, args.per_class, args.seed, args.quant_per_class,
                          cfg_plan=args.cfg_plan, overwrite=args.overwrite, arg="--out")
    print_json({k: report[k] for k in ("model", "num_samples", "timings_s")})
    for name, e in report["quantized"]["settings"].items():
        print_json({"setting": name, "psnr_db_vs_float": round(e["psnr_db_vs_float"], 2),
                    "ssim_vs_float": round(e["ssim_vs_float"], 4),
                    "ratio_to_bf16": e["ratio_to_bf16"]})
    out = pathlib.Path(args.out)
    print(f"wrote {out / 'grid.png'}, grid_quantized.png and report.json / .md")
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    """``"3,1,4"`` -> ``[3, 1, 4]``; a one-line error naming ``flag`` otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{flag}: expected comma-separated class ints, got {text!r}")
    return values


def _labels_arg(text: str, num_samples: int):
    values = _int_list(text, "--labels")
    return np.resize(np.asarray(values), num_samples)  # repeated in turn up to --num-samples


def _join_processes(args) -> None:
    """``jax.distributed.initialize`` from --distributed / --coordinator (before any JAX work)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in explicit):
        return
    if args.distributed and any(v is not None for v in explicit):
        raise ValueError("--distributed: detects the cluster itself; give it alone, or "
                         "--coordinator with --num-processes and --process-id")
    import jax
    if args.distributed:
        try:  # TPU slices, SLURM, Open MPI... set up by their runtime
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as e:
            detail = " ".join(str(e).split())[:120]
            raise ValueError(f"--distributed: found no cluster to join ({detail}): it works "
                             "where JAX detects the cluster from its "
                             "environment (a TPU pod slice, SLURM, Open MPI); elsewhere give "
                             "--coordinator HOST:PORT --num-processes P --process-id p on every "
                             "process") from None
        return
    if any(v is None for v in explicit):
        raise ValueError("--coordinator: needs all of --coordinator HOST:PORT, --num-processes "
                         "P and --process-id p")
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator: expected HOST:PORT, got {args.coordinator!r}")
    if args.process_id >= args.num_processes:
        raise ValueError(f"--process-id: expected 0 .. {args.num_processes - 1} "
                         f"(--num-processes {args.num_processes}), got {args.process_id}")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)


def _generate(args) -> int:
    from trdq_jax.sampling.offline import check_out, generate_to_dir
    check_out(args.out, arg="--out")  # before the model loads
    _check_export_flags(args)
    _join_processes(args)
    model, params, cfg, source, sampler, apply_fn = _denoiser(args)
    check_prompt_flags(args, cfg)
    share = _share_cfg(args, cfg)
    if args.per_class is not None:
        args.num_samples = _per_class_count(args, cfg)
    labels = None if args.labels is None else _labels_arg(args.labels, args.num_samples)
    text = {}
    if is_text_model(cfg):  # sample i takes prompt i mod P
        prompts = prompt_list(args, cfg)
        cond, null, info = prompt_conditioning(args, cfg, prompts,
                                               np.arange(args.num_samples) % len(prompts))
        text = {"cond": cond, "null_cond": null, "run_info": {
            k: info[k] for k in ("prompts", "null_branch")}}
    with blame(None, labels="--labels", num_samples="--num-samples",
               batch_per_device="--batch-per-device", batch_size="--batch-size",
               model_parallel="--model-parallel", shard_size="--shard-size", out="--out"):
        summary = generate_to_dir(args.out, model, params, cfg, num_samples=args.num_samples,
                                  vae=_vae(args), decode_chunk=args.decode_batch,
                                  labels=labels, seed=args.seed, cfg_scale=args.cfg_scale,
                                  batch_per_device=args.batch_per_device,
                                  batch_size=args.batch_size,
                                  model_parallel=args.model_parallel, apply_fn=apply_fn,
                                  sampler=sampler, share_cfg=share, source=source,
                                  shard_size=args.shard_size,
                                  allow_nonfinite=args.allow_nonfinite, progress=True,
                                  arg="--out", **text)
    if summary["redone"]:
        print(f"trdq generate: note: redid {len(summary['redone'])} shard(s) whose files or "
              "manifest lines did not verify (see \"redone\")", file=sys.stderr)
    if args.export_npz is not None:
        summary["export"] = _export_after_generate(args)
    print_json(summary)
    return 0


def _per_class_count(args, cfg) -> int:
    """``--per-class K``: ``K x num_classes`` samples, labels ``i % num_classes`` (K of each)."""
    classes = getattr(cfg.model, "num_classes", 0)
    if not classes:
        raise ValueError("--per-class: the model has no classes (unconditional or conditioned "
                         "otherwise); give --num-samples")
    if args.labels is not None:
        raise ValueError("--per-class: gives K samples of every class in turn; to choose "
                         "--labels, give --num-samples")
    return args.per_class * classes


def _check_export_flags(args) -> None:
    """``--export-npz`` and its options, checked before the model loads."""
    if args.export_npz is None:
        for flag, value in (("--export-per-class", args.export_per_class),
                            ("--overwrite", args.overwrite or None)):
            if value is not None:
                raise ValueError(f"{flag}: only applies with --export-npz FILE (a generation "
                                 "directory itself is resumed, never replaced)")
        return
    from trdq_jax.sampling.export import check_target
    target, _ = check_target(args.export_npz, args.overwrite, "--export-npz")
    out = pathlib.Path(args.out).expanduser().resolve()
    if out == target or out in target.parents:
        raise ValueError(f"--export-npz: {str(target)!r} is inside --out {str(out)!r}, the "
                         "generation directory; outputs do not nest: choose a path outside it")


def _export_after_generate(args) -> dict | None:
    """Write ``--export-npz`` once every process has finished its shards (process 0 writes
    it); the export's summary, None on the other processes."""
    import jax
    from trdq_jax.sampling.export import export_npz
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("trdq generate: every shard written")
        if jax.process_index() != 0:
            return None
    with blame(None, generation_dir="--out", out_file="--export-npz",
               per_class="--export-per-class"):
        return export_npz(args.out, args.export_npz, per_class=args.export_per_class,
                          overwrite=args.overwrite, progress=True, arg="out_file")


def _export_only(args) -> int:
    from trdq_jax.sampling.export import export_npz
    with blame(None, generation_dir="--generation", out_file="--out", per_class="--per-class"):
        summary = export_npz(args.generation, args.out, allow_missing=args.allow_missing,
                             per_class=args.per_class, overwrite=args.overwrite, progress=True,
                             arg="out_file")
    print_json(summary)
    return 0


def _add_denoiser_source(p) -> None:
    """``--model | --checkpoint | --quantized`` and ``--backend``."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="bundled diffusion model name (default: digits-dit unless "
                                     "--checkpoint or --quantized is given)")
    src.add_argument("--checkpoint", metavar="DIR",
                     help="a float trdq checkpoint directory (default: none)")
    src.add_argument("--quantized", metavar="QDIR",
                     help="a quantized checkpoint (trdq quantize --out QDIR); restored without the "
                          "float weights, sampled with its stored time-segment table "
                          "(default: none)")
    p.add_argument("--backend", default="xla", choices=BACKENDS,
                   help="quantized execution: xla (int8 dot), fake (simulated in float), "
                        "pallas (Pallas kernels; interpreted on CPU), auto (pallas on TPU/GPU "
                        "where a layer fits, else xla) (default: %(default)s)")


def _add_guidance(p, plan_default: str) -> None:
    """``--cfg-scale``, ``--share-cfg`` and ``--cfg-plan`` (alias ``--share-plan``)."""
    p.add_argument("--cfg-scale", type=cfg_scale, default=None,
                   help="guidance scale in [0, 100] (default: the config's)")
    p.add_argument("--share-cfg", action="store_true",
                   help="CFG attention sharing in every attention at every step (default: off)")
    p.add_argument("--cfg-plan", "--share-plan", dest="cfg_plan", metavar="PLAN",
                   help="CFG sharing plan: none | all | trdq_release | a plan .json (trdq "
                        f"cfg-analysis writes some) (default: {plan_default})")


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample a bundled model or a checkpoint into a grid")
    _add_denoiser_source(p)
    add_set(p, "e.g. sampler.num_steps=100")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory, new or empty (samples.npz, grid.png, metadata.json), "
                        "written whole (required)")
    add_overwrite(p, "sample directory")
    p.add_argument("--per-class", type=positive_int, default=8,
                   help="samples per class (default: %(default)s)")
    p.add_argument("--labels", default=None, metavar="LIST",
                   help="the classes to sample, comma-separated, e.g. 207,360,387 (default: "
                        "every class)")
    add_prompt_args(p)
    add_seed(p)
    _add_guidance(p, "the plan stored with --quantized, else none")
    add_debug(p)
    p.set_defaults(func=_sample)

    p = sub.add_parser("generate", help="many samples into a resumable directory, sharded over "
                                        "the local devices (and processes)")
    _add_denoiser_source(p)
    add_set(p, "e.g. sampler.num_steps=100")
    count = p.add_mutually_exclusive_group(required=True)
    count.add_argument("--num-samples", type=positive_int,
                       help="samples 0 .. N-1 to generate (default: none; this or "
                            "--per-class is required)")
    count.add_argument("--per-class", type=positive_int, metavar="K",
                       help="K samples of every class of a class-conditional model: "
                            "--num-samples K x classes, labels i %% classes (default: none; "
                            "this or --num-samples is required)")
    p.add_argument("--labels", default=None,
                   help="comma-separated labels used in turn (default: every class in turn)")
    add_prompt_args(p)
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch-per-device", type=positive_int, default=None,
                       help="samples per data-axis device per batch (default: "
                            "generation.batch_size / devices)")
    batch.add_argument("--batch-size", type=positive_int, default=None,
                       help="samples per batch of this process, a multiple of the data axis "
                            "(default: from --batch-per-device)")
    p.add_argument("--model-parallel", type=positive_int, default=1, metavar="M",
                   help="size of the mesh's model axis: parameters are split over M devices "
                        "(a divisor of the local device count) (default: %(default)s, data "
                        "parallel only)")
    p.add_argument("--shard-size", type=positive_int, default=None, metavar="S",
                   help="samples per shard file, fixed when the directory is made (default: 64; "
                        "a resume takes the directory's own)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="write NaN/Inf samples (listed in the summary and the manifest) instead "
                        "of stopping with their indices (default: off)")
    p.add_argument("--decode-batch", type=positive_int, default=None, metavar="K",
                   help="a latent model (a checkpoint with a VAE): samples decoded at once, "
                        "which bounds the decoder's memory (its activations grow with K; see "
                        "BENCHMARKS.md for the SD-VAE at 256x256) (default: 8)")
    add_seed(p)
    _add_guidance(p, "the plan stored with --quantized, else none")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="generation directory: created (or an empty one filled), or resumed "
                        "when it holds this same run (on a file system every process sees) "
                        "(required)")
    export = p.add_argument_group("export for FID tools (trdq export-npz does it alone)")
    export.add_argument("--export-npz", metavar="FILE",
                        help="then write the PNGs to FILE (.npz): arr_0 uint8 [N, H, W, 3] and, "
                             "for class labels, arr_1 int64, in sample order (the ADM "
                             "evaluator's layout); a rerun that would write the same file "
                             "leaves it as it is (default: none)")
    export.add_argument("--export-per-class", type=positive_int, metavar="K",
                        help="with --export-npz: only the first K samples of each class "
                             "(default: all samples)")
    export.add_argument("--overwrite", action="store_true",
                        help="with --export-npz: replace an existing export FILE written by "
                             "trdq (anything else is refused; the generation directory is "
                             "resumed, never replaced) (default: off)")
    hosts = p.add_argument_group("several processes (hosts); each writes only its own batches")
    hosts.add_argument("--distributed", action="store_true",
                       help="jax.distributed.initialize() from the cluster's environment (TPU "
                            "slice, SLURM, Open MPI) (default: off, one process)")
    hosts.add_argument("--coordinator", metavar="HOST:PORT",
                       help="the coordinator's address (the host of --process-id 0) "
                            "(default: none, one process)")
    hosts.add_argument("--num-processes", type=positive_int, metavar="P",
                       help="processes taking part, with --coordinator (default: none)")
    hosts.add_argument("--process-id", type=seed_int, metavar="p",
                       help="this process, 0 .. P-1, with --coordinator (default: none)")
    add_debug(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("export-npz", help="a generation directory's images as one .npz for "
                                          "FID tools (ADM evaluator, torch-fidelity)")
    p.add_argument("--generation", required=True, metavar="DIR",
                   help="generation directory (trdq generate --out DIR), finished or not "
                        "(required)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the .npz: arr_0 uint8 [N, H, W, 3] and, for class labels, arr_1 "
                        "int64, in sample order; written whole or not at all (required)")
    add_overwrite(p, "export")
    p.add_argument("--per-class", type=positive_int, default=None, metavar="K",
                   help="only the first K samples of each class (default: all samples)")
    p.add_argument("--allow-missing", action="store_true",
                   help="export the finished samples of an unfinished directory (their "
                        "indices are stored in the file's \"indices\") instead of refusing "
                        "(default: off)")
    add_debug(p)
    p.set_defaults(func=_export_only)

    p = sub.add_parser("demo", help="the main job: sample the bundled image DiT and report")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory, new or empty (grid.png, grid_quantized.png, "
                        "report.json/.md) (required)")
    add_overwrite(p, "demo directory")
    p.add_argument("--model", default="digits-dit",
                   help="bundled model to demonstrate (default: %(default)s)")
    p.add_argument("--per-class", type=positive_int, default=30,
                   help="samples per class for the metrics (default: %(default)s)")
    add_seed(p)
    p.add_argument("--quant-per-class", type=positive_int, default=10,
                   help="samples per class of the float vs W8A8 vs W4A8 comparison "
                        "(at most --per-class) (default: %(default)s)")
    p.add_argument("--cfg-plan", "--share-plan", dest="cfg_plan", default="none", metavar="PLAN",
                   help="CFG sharing of every sampling run: none | all | trdq_release "
                        "| a plan .json (default: %(default)s)")
    add_debug(p)
    p.set_defaults(func=_demo)
