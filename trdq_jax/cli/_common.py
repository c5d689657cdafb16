"""What every ``trdq`` command shares: the parser class, typed arguments, common flags."""
from __future__ import annotations

import argparse
import contextlib
import json

from trdq_jax.config import apply_overrides, load_config_file


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (``trdq sample: error: argument --per-class: ...``), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _typed(convert, expected: str):
    def parse(text: str):
        try:
            value = convert(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        return value
    parse.__name__ = expected  # argparse names the type in some messages
    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0 or value > 2 ** 32 - 1:
        raise ValueError(text)
    return value


def _bits(text: str) -> int:
    value = int(text)
    if not (2 <= value <= 8 or value == 16):
        raise ValueError(text)
    return value


def _cfg_scale(text: str) -> float:
    from trdq_jax.config import check_cfg_scale
    return check_cfg_scale(float(text))


positive_int = _typed(_positive_int, "a positive int")
seed_int = _typed(_nonnegative_int, "an int in [0, 2**32 - 1]")
bits = _typed(_bits, "bits in 2..8 (or 16 = float)")
cfg_scale = _typed(_cfg_scale, "a finite number in [0, 100]")


@contextlib.contextmanager
def blame(flag: str | None, **renames: str):
    """Errors of the library calls inside name the command-line flag they came from: a message
    starting with ``arg:`` for one of ``renames`` (``export_path="--export"``) gets that flag,
    any other one is prefixed with ``flag``. Config errors (which name their field) and messages
    that already name a flag pass unchanged."""
    from trdq_jax.config import ConfigError
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, OSError, ImportError) as e:
        message = " ".join(str(e).split())
        if message.startswith("--"):
            raise
        for arg, renamed in renames.items():
            if message.startswith(f"{arg}:"):
                raise ValueError(renamed + message[len(arg):]) from e  # --debug shows both
        if flag is None:
            raise
        raise ValueError(f"{flag}: {message}") from e


def add_debug(p: argparse.ArgumentParser) -> None:
    """``--debug`` on a subcommand too (SUPPRESS: the subparser must not reset the main flag)."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")


def add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", required=required, metavar="FILE",
                   help="configs/*.py file defining get_config()")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.depth=4 (repeatable)")


def load_config(args):
    cfg = load_config_file(args.config)
    return apply_overrides(cfg, args.set)


def add_source(p: argparse.ArgumentParser, with_set: bool = True,
               default_help: str = "bundled float model (default digits-dit)") -> None:
    """``--model NAME | --checkpoint DIR`` (+ ``--set`` for sampler / generation fields)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help=default_help)
    src.add_argument("--checkpoint", metavar="DIR", help="a float trdq checkpoint directory")
    if with_set:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override sampler.*/generation.* fields, e.g. sampler.num_steps=20 "
                            "(model.* is fixed by the checkpoint)")


def add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an existing {what} written by trdq (anything else is refused)")


def float_model(args):
    """``(model, params, cfg, source)`` from ``--model`` / ``--checkpoint`` and ``--set``."""
    from trdq_jax.models.zoo import load_float_model
    with blame("--checkpoint" if args.checkpoint else "--model"):
        return load_float_model(args.model, args.checkpoint, getattr(args, "set", []))


def source_of(args) -> dict:
    """Where the float weights of ``args`` live, as stored in a calibration directory."""
    from trdq_jax.quant.calib_io import source_record
    return source_record(args.model, args.checkpoint)


def print_json(data) -> None:
    print(json.dumps(data, default=float))


