"""``trdq`` command line: ``trdq {info,train,convert,sample,demo,eval,calibrate,quantize,
plot-ranges} --help``. Errors print one line ``trdq CMD: error: ...`` and exit with status 2."""
from __future__ import annotations

import argparse
import json
import sys

from trdq_jax.config import ConfigError, apply_overrides, load_config_file


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``trdq sample: error: argument --per-class: ...``), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", required=required, metavar="FILE",
                   help="configs/*.py file defining get_config()")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.depth=4 (repeatable)")


def _load_config(args):
    cfg = load_config_file(args.config)
    return apply_overrides(cfg, args.set)


def _cmd_info(args) -> int:
    import jax

    from trdq_jax import __version__
    from trdq_jax.models import zoo
    print(f"trdq_jax {__version__} | jax {jax.__version__} | backend {jax.default_backend()} "
          f"| devices {jax.devices()}")
    present = set(zoo.available())
    for name, what in zoo.BUNDLED.items():
        print(f"  {'*' if name in present else ' '} {name:26s} {what}")
    print("(* = bundled checkpoint present)")
    return 0


def _cmd_train(args) -> int:
    from trdq_jax.training import train
    cfg = _load_config(args)
    result = train(cfg, args.workdir, resume=not args.no_resume, progress=not args.quiet,
                   export_path=args.export)
    print(json.dumps({"step": int(result.step), "export": str(args.export or "")}))
    return 0


def _cmd_convert(args) -> int:
    from trdq_jax import checkpoint
    from trdq_jax.config import to_dict
    from trdq_jax.models.convert import convert_dit_state_dict, infer_dit_config, load_state_dict
    state_dict = load_state_dict(args.input)
    overrides = {"num_heads": args.num_heads} if args.num_heads else {}
    cfg = infer_dit_config(state_dict, **overrides)
    params = convert_dit_state_dict(state_dict, cfg)
    checkpoint.save(args.out, params, cfg, extra={"converted_from": str(args.input)},
                    overwrite=args.overwrite)
    print(json.dumps({"out": str(args.out), "config": to_dict(cfg)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="trdq", description="TR-DQ diffusion quantization toolkit for JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, backend and bundled models")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("train", help="train a model from a config (resumable)")
    _add_config_args(p, required=True)
    p.add_argument("--workdir", required=True, help="checkpoints and metrics.jsonl go here")
    p.add_argument("--export", help="write the final (EMA) params as a trdq checkpoint here")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("convert", help="convert an official DiT checkpoint to a trdq checkpoint")
    p.add_argument("--input", required=True, help=".safetensors, .npz or .pt (needs torch)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--num-heads", type=int,
                   help="attention heads (inferred for official sizes S/B/L/XL)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_convert)

    from trdq_jax import evaluate, generate, quant_cli
    generate.add_commands(sub)
    evaluate.add_command(sub)
    quant_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from trdq_jax.checkpoint import CheckpointError
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, CheckpointError,
            NotImplementedError) as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"trdq {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
