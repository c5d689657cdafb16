"""What every ``trdq`` command shares: the parser class, typed arguments, common flags."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from trdq_jax.config import apply_overrides, load_config_file


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (``trdq sample: error: argument --per-class: ...``), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def state_defaults(parser: argparse.ArgumentParser) -> None:
    """Every flag's help says its default: a help that names neither its default nor
    "required" gets ``(default: ...)`` appended (``off`` for switches, ``none`` for an unset
    value, else the value). The flags of this package state theirs in words; this covers the
    rest."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                state_defaults(sub)
            continue
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        text = action.help or ""
        if "default" in text.lower() or "required" in text.lower():
            continue
        if action.required:
            note = "required"
        elif action.nargs == 0:  # store_true and friends
            note = "default: off"
        elif action.default is None or action.default == []:
            note = "default: none"
        else:
            note = "default: %(default)s"
        action.help = f"{text} ({note})" if text else note


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


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise ValueError(text)
    return value


def _cfg_scale(text: str) -> float:
    from trdq_jax.config import check_cfg_scale
    return check_cfg_scale(float(text))


positive_int = _typed(_positive_int, "a positive int")
rank_int = _typed(lambda text: _nonnegative_int(text), "an int >= 0")
seed_int = _typed(_nonnegative_int, "an int in [0, 2**32 - 1]")
bits = _typed(_bits, "bits in 2..8 (or 16 = float)")
cfg_scale = _typed(_cfg_scale, "a finite number in [0, 100]")
nonnegative_float = _typed(_nonnegative_float, "a finite number >= 0")


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
                   help="show the full traceback of an error (default: off; also TRDQ_DEBUG=1)")


CACHE_SWITCH_HELP = ("do not keep compiled programs in the persistent compilation cache "
                     "($XDG_CACHE_HOME/trdq_jax/xla, else ~/.cache/trdq_jax/xla) (default: the "
                     "cache is on; TRDQ_COMPILATION_CACHE=0 also turns it off)")


def add_no_compile_cache(p: argparse.ArgumentParser, main: bool = False) -> None:
    """``--no-compile-cache``; on the subcommands with SUPPRESS, like ``--debug``."""
    p.add_argument("--no-compile-cache", action="store_true",
                   default=False if main else argparse.SUPPRESS, help=CACHE_SWITCH_HELP)


_OFF, _ON = ("0", "off", "false", "no"), ("", "1", "on", "true", "yes")


def use_compilation_cache(no_compile_cache: bool) -> str:
    """Turn on the persistent compilation cache for this command unless ``--no-compile-cache``
    or ``TRDQ_COMPILATION_CACHE=0`` says not to (then it is off, also a JAX-configured one);
    a directory already configured for JAX (``JAX_COMPILATION_CACHE_DIR``) is kept as it is.
    Returns what ``trdq info`` prints about it. A cache directory that cannot be made is a
    note on stderr, not an error: the command runs without the cache."""
    from trdq_jax import compile_cache
    setting = os.environ.get(compile_cache.ENV_SWITCH, "").strip().lower()
    if setting not in _OFF + _ON:
        raise ValueError(f"{compile_cache.ENV_SWITCH}: expected 0 or 1 (off/on), got "
                         f"{os.environ[compile_cache.ENV_SWITCH]!r}")
    if no_compile_cache or setting in _OFF:
        compile_cache.disable_compilation_cache()
        why = "--no-compile-cache" if no_compile_cache else f"{compile_cache.ENV_SWITCH}=0"
        return f"off ({why})"
    configured = compile_cache.compilation_cache_dir()
    if configured is not None:
        return f"{configured} (configured for JAX)"
    try:
        return str(compile_cache.enable_compilation_cache())
    except OSError as e:
        message = " ".join(str(e).split()).removeprefix("path: ")
        print(f"trdq: note: running without the compilation cache: {message}", file=sys.stderr)
        return f"off ({message})"


def add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", required=required, metavar="FILE",
                   help="configs/*.py file defining get_config()" +
                        (" (required)" if required else " (default: none)"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.depth=4 (repeatable; "
                        "default: none)")


def load_config(args):
    cfg = load_config_file(args.config, arg="--config")
    return apply_overrides(cfg, args.set, arg="--set")


def add_source(p: argparse.ArgumentParser, with_set: bool = True,
               default_help: str = "bundled float model (default: digits-dit unless "
                                   "--checkpoint is given)") -> None:
    """``--model NAME | --checkpoint DIR`` (+ ``--set`` for sampler / generation fields)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help=default_help)
    src.add_argument("--checkpoint", metavar="DIR",
                     help="a float trdq checkpoint directory instead of --model (default: none)")
    if with_set:
        add_set(p, "e.g. sampler.num_steps=20 (model.* is fixed by the checkpoint)")


def add_set(p: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE`` for sampler.* / generation.* fields."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override sampler.*/generation.* fields, {example} (repeatable; "
                        "default: none)")


def add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an existing {what} written by trdq (anything else is refused) "
                        "(default: off)")


def add_seed(p: argparse.ArgumentParser, what: str = "sampling seed: sample i draws its noise "
                                                     "from (seed, i)") -> None:
    p.add_argument("--seed", type=seed_int, default=0, help=f"{what} (default: %(default)s)")


def float_model(args):
    """``(model, params, cfg, source)`` from ``--model`` / ``--checkpoint`` and ``--set``."""
    from trdq_jax.models.zoo import load_float_model
    flag = "--checkpoint" if args.checkpoint else "--model"
    with blame(flag, model=flag, model_name=flag, checkpoint_dir=flag):
        return load_float_model(args.model, args.checkpoint, getattr(args, "set", []),
                                arg="--set")


def stored_vae(checkpoint_dir, flag: str):
    """``(VAEConfig, params)`` stored with a float or quantized checkpoint directory, or None
    (no directory, or one without a VAE)."""
    if checkpoint_dir is None:
        return None
    from trdq_jax.checkpoint import restore_vae
    with blame(flag):
        return restore_vae(checkpoint_dir)


def source_of(args) -> dict:
    """Where the float weights of ``args`` live, as stored in a calibration directory."""
    from trdq_jax.quant.calib_io import source_record
    return source_record(args.model, args.checkpoint)


def print_json(data) -> None:
    print(json.dumps(data, default=float))


