"""``trdq eval``: class match / digits-FID (with bootstrap intervals) of a bundled model, a float
or quantized checkpoint, or a generation directory; accuracy of the bundled classifiers."""
from __future__ import annotations

import argparse
import pathlib

import numpy as np

from trdq_jax.cli._common import (add_debug, add_overwrite, blame, cfg_scale, positive_int,
                                  print_json, seed_int)

BACKENDS = ("xla", "fake", "pallas", "auto")  # trdq_jax.quant.BACKENDS, without importing quant
DEFAULT_PER_CLASS = 30
MAX_SEED = 2 ** 32 - 1


def _seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2``: distinct ints in [0, 2**32 - 1]."""
    parts = [p.strip() for p in text.split(",")]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ints in [0, 2**32 - 1], got {text!r}") from None
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise argparse.ArgumentTypeError(f"seed {bad[0]} is outside [0, 2**32 - 1]")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"seed {twice[0]} is given twice")
    return seeds


def _seeds(args) -> list[int]:
    """The seeds of ``--seeds`` or ``--seed S --num-seeds K``: S .. S+K-1 (S = 0, K = 1 when
    not given)."""
    if args.seeds is not None:
        if args.seed is not None or args.num_seeds is not None:
            raise ValueError("--seeds: give either --seeds LIST or --seed/--num-seeds, not both")
        return args.seeds
    first, count = args.seed or 0, args.num_seeds or 1
    if first + count - 1 > MAX_SEED:
        raise ValueError(f"--num-seeds: seeds {first} .. {first + count - 1} run past "
                         "2**32 - 1")
    return list(range(first, first + count))


def _check_flags(args) -> None:
    """Flags that do not fit the chosen source, before any work."""
    if args.generation:
        for flag, value in (("--seeds", args.seeds), ("--seed", args.seed),
                            ("--num-seeds", args.num_seeds), ("--per-class", args.per_class),
                            ("--cfg-scale", args.cfg_scale), ("--backend", args.backend)):
            if value is not None:
                raise ValueError(f"{flag}: --generation scores the samples already in the "
                                 "directory (their seed, labels and guidance); give no "
                                 f"{flag}")
    if args.backend is not None and not args.quantized:
        raise ValueError("--backend: only applies to --quantized checkpoints")
    if args.reference and not args.quantized:
        raise ValueError("--reference: compares a --quantized checkpoint with its float source; "
                         "give --quantized QDIR too")
    if args.labels and not args.reference:
        raise ValueError("--labels: only with --reference (class match and digits-FID use "
                         "every class)")


def _against_float(args, seeds) -> dict:
    """``trdq eval --quantized QDIR --reference DIR``: PSNR in latents and decoded pixels."""
    from trdq_jax.eval.fidelity import compare_to_float
    from trdq_jax.models.zoo import load_float_model
    if len(seeds) > 1:
        raise ValueError("--num-seeds: --reference compares one seed's samples; give one seed")
    labels = None
    if args.labels:
        from trdq_jax.cli.sampling import _class_list
        with blame("--reference"):
            cfg = load_float_model(None, args.reference)[2]
        labels = np.repeat(_class_list(args.labels, cfg.model.num_classes),
                           args.per_class or 1)
    with blame(None, float_dir="--reference", quantized_dir="--quantized"):
        _check_dir(args.reference)
        return compare_to_float(args.reference, args.quantized, labels=labels,
                                per_class=args.per_class or 1, seed=seeds[0],
                                backend=args.backend or "xla", cfg_scale=args.cfg_scale)


def _eval(args) -> int:
    from trdq_jax import files
    from trdq_jax.eval import judge
    _check_flags(args)
    seeds = None if args.generation else _seeds(args)
    per_class = args.per_class or DEFAULT_PER_CLASS
    if args.out:
        if not str(args.out).lower().endswith(".json"):
            raise ValueError(f"--out: expected a .json file name, got {args.out!r}")
        files.resolve_target(args.out, kind="report", overwrite=args.overwrite, is_dir=False,
                             arg="--out")
    if args.reference:
        results = [_against_float(args, seeds)]
        print_json(results[0])
    elif args.checkpoint or args.quantized or args.generation:
        flag, path = next((f, v) for f, v in (("--checkpoint", args.checkpoint),
                                              ("--quantized", args.quantized),
                                              ("--generation", args.generation)) if v)
        kw = dict(per_class=per_class, seeds=seeds, cfg_scale=args.cfg_scale)
        with blame(flag, out=flag):
            _check_dir(path)
            if args.checkpoint:
                result = judge.evaluate_checkpoint(path, **kw)
            elif args.quantized:
                result = judge.evaluate_quantized(path, backend=args.backend or "xla", **kw)
            else:
                result = judge.evaluate_generation(path)
        print_json(result)
        results = [result]
    else:
        from trdq_jax.models import zoo
        names = args.model or zoo.available()
        with blame("--model" if args.model else None, model="--model"):
            for name in names:
                zoo.path_of(name)  # unknown or absent names fail before any work
            results = []
            for name in names:
                results.append(judge.evaluate_bundled(name, per_class, seeds[0],
                                                      args.cfg_scale, seeds=seeds))
                print_json(results[-1])
    if args.out:
        judge.save_report(args.out, results, overwrite=args.overwrite, arg="--out")
    return 0


def _check_dir(path) -> None:
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no such directory {str(path)!r}")
    if not p.is_dir():
        raise ValueError(f"{str(path)!r} is a file, not a directory")


def register(sub) -> None:
    p = sub.add_parser("eval", help="class match / digits-FID with 95%% bootstrap intervals of a "
                                    "bundled model, a checkpoint, a quantized checkpoint or a "
                                    "generation directory; classifier accuracy",
                       description="Judge samples with the bundled digits classifiers: class "
                                   "match (how often the classifier sees the class a sample "
                                   "was made for) and digits-FID (Frechet distance of its "
                                   "features to the 300 held-out digits), each with a 95% "
                                   "percentile-bootstrap interval (1000 resamples of the "
                                   "samples, bootstrap seed 0). Sample i is made for class "
                                   "i % num_classes. With several seeds the headline pools "
                                   "all their samples; each seed's own numbers follow.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", action="append", metavar="NAME",
                     help="bundled model (repeatable; default: every bundled model present)")
    src.add_argument("--checkpoint", metavar="DIR",
                     help="a float trdq checkpoint directory (trdq train --export, trdq convert)")
    src.add_argument("--quantized", metavar="QDIR",
                     help="a quantized checkpoint (trdq quantize --out QDIR), sampled with its "
                          "stored sampler, time-segment table and CFG plan")
    src.add_argument("--generation", metavar="DIR",
                     help="a finished trdq generate directory: scores the samples already "
                          "there (their own seed, labels and guidance)")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="quantized execution for --quantized (default: xla)")
    p.add_argument("--reference", metavar="DIR",
                   help="with --quantized: the float checkpoint it was made from; instead of "
                        "class match / digits-FID, report the PSNR of the quantized samples "
                        "against the float ones (same labels, seed and noise) in latents and, "
                        "for a model with a VAE, in decoded pixels (PSNR, SSIM); default: none")
    p.add_argument("--labels", default=None, metavar="LIST",
                   help="with --reference: the classes to sample, comma-separated, each "
                        "--per-class times (default: every class, --per-class default 1)")
    p.add_argument("--per-class", type=positive_int, default=None,
                   help=f"samples per class and seed (default: {DEFAULT_PER_CLASS})")
    p.add_argument("--seed", type=seed_int, default=None,
                   help="first sampling seed (default: 0)")
    p.add_argument("--num-seeds", type=positive_int, default=None, metavar="K",
                   help="sample with K seeds: --seed .. --seed + K - 1 (default: 1)")
    p.add_argument("--seeds", type=_seed_list, default=None, metavar="LIST",
                   help="comma-separated sampling seeds, e.g. 0,1,2 (instead of --seed / "
                        "--num-seeds; default: 0)")
    p.add_argument("--cfg-scale", type=cfg_scale, default=None,
                   help="guidance scale in [0, 100] (default: the model's config)")
    p.add_argument("--out", metavar="FILE.json",
                   help="also write all results as JSON here (default: print only)")
    add_overwrite(p, "report file")
    add_debug(p)
    p.set_defaults(func=_eval)
