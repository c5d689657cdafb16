"""``trdq eval``: class match / digits-FID of bundled generators, accuracy of the classifiers."""
from __future__ import annotations

from trdq_jax.cli._common import (add_debug, add_overwrite, cfg_scale, positive_int, print_json,
                                  seed_int)

def _eval(args) -> int:
    from trdq_jax import files
    from trdq_jax.eval.judge import evaluate_bundled, save_report
    from trdq_jax.models import zoo
    if args.out:
        if not str(args.out).lower().endswith(".json"):
            raise ValueError(f"--out: expected a .json file name, got {args.out!r}")
        files.resolve_target(args.out, kind="report", overwrite=args.overwrite, is_dir=False,
                             arg="--out")
    names = args.model or zoo.available()
    for name in names:
        zoo.path_of(name)  # unknown or absent names fail before any work
    results = []
    for name in names:
        results.append(evaluate_bundled(name, args.per_class, args.seed, args.cfg_scale))
        print_json(results[-1])
    if args.out:
        save_report(args.out, results, overwrite=args.overwrite, arg="--out")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval",
                       help="class match / digits-FID of bundled models, classifier accuracy")
    p.add_argument("--model", action="append",
                   help="bundled model (repeatable; default: all present)")
    p.add_argument("--per-class", type=positive_int, default=30, help="samples per class")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--cfg-scale", type=cfg_scale, default=None,
                   help="guidance scale in [0, 100] (default: the model's config)")
    p.add_argument("--out", metavar="FILE.json", help="write all results as JSON here")
    add_overwrite(p, "report file")
    add_debug(p)
    p.set_defaults(func=_eval)
