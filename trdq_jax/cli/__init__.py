"""The ``trdq`` command: ``trdq {info,train,convert,sample,generate,export-npz,demo,eval,
calibrate,quantize,plot-ranges,cfg-analysis} --help``.

This package only parses arguments, calls library functions, prints and maps failures to exit
codes; nothing outside it imports it. Expected failures (bad arguments or files, refused
outputs, OSError, a missing optional dependency) print one line ``trdq CMD: error: <cause>``
and exit with status 2; anything else is a bug and says so (exit 1). ``--debug`` (or
``TRDQ_DEBUG=1``) shows the traceback instead.

Every command keeps its compiled XLA programs in a persistent cache
(``$XDG_CACHE_HOME/trdq_jax/xla``, else ``~/.cache/trdq_jax/xla``; ``trdq_jax.compile_cache``),
so a second run skips most compilation; ``--no-compile-cache`` or ``TRDQ_COMPILATION_CACHE=0``
turns it off.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from trdq_jax.cli import cfg, evaluation, models, quantization, sampling
from trdq_jax.cli._common import (Parser, add_no_compile_cache, state_defaults,
                                  use_compilation_cache)

# Failures a user can cause and fix; ValueError covers ConfigError, OutputError, the integrity
# errors (CheckpointError, CalibrationError, ...) and the converter's ConversionError.
EXPECTED = (ValueError, OSError, ImportError, NotImplementedError)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="trdq", description="TR-DQ diffusion quantization toolkit for JAX/Flax.")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks of errors (default: off; also TRDQ_DEBUG=1)")
    add_no_compile_cache(parser, main=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for family in (models, sampling, evaluation, quantization, cfg):
        family.register(sub)
    for command in sub.choices.values():
        add_no_compile_cache(command)
    state_defaults(parser)
    return parser


def _one_line(e: BaseException) -> str:
    message = " ".join(str(e).split())  # one line, whatever the message holds
    if isinstance(e, ImportError):
        missing = getattr(e, "name", None)
        if missing and missing not in message:
            message = f"{message} (missing module {missing!r})"
    return message or type(e).__name__


def _late_loop_callback(unraisable) -> bool:
    """An ``asyncio`` ``call_soon_threadsafe`` onto a closed event loop: what tensorstore's
    threads still deliver after orbax gave up on a failed save (its pending writes finish after
    the first error was raised and reported; they change nothing)."""
    if unraisable.exc_type is not RuntimeError or str(unraisable.exc_value) != \
            "Event loop is closed":
        return False
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "_check_closed" and \
        os.path.basename(os.path.dirname(tb.tb_frame.f_code.co_filename)) == "asyncio"


def _hide_late_loop_callbacks() -> None:
    """Keep the one error line the last line: drop only ``_late_loop_callback`` tracebacks
    from ``sys.unraisablehook`` (where CPython reports exceptions it cannot raise, e.g. in
    tensorstore's threads); every other one still reaches the previous hook. Installed once per
    process and left in place: those callbacks arrive after ``main`` has returned."""
    previous = sys.unraisablehook
    if getattr(previous, "_trdq_hides_late_loop_callbacks", False):
        return

    def hook(unraisable):
        if not _late_loop_callback(unraisable):
            previous(unraisable)
    hook._trdq_hides_late_loop_callbacks = True
    sys.unraisablehook = hook


_UNRETRIEVED = ("Future exception was never retrieved", "Task exception was never retrieved")


def _unretrieved_failed_write(record: logging.LogRecord) -> bool:
    """What ``asyncio`` logs when it collects one of tensorstore's sibling writes that failed
    after orbax had already raised (and the CLI reported) the save's first failure: a
    ``ValueError`` naming the failed write, inside a future nobody awaits any more."""
    if not record.getMessage().startswith(_UNRETRIEVED) or not record.exc_info:
        return False
    exc = record.exc_info[1]
    return isinstance(exc, ValueError) and "Error writing" in str(exc)


class _HideUnretrievedFailedWrites(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _unretrieved_failed_write(record)


def _hide_unretrieved_failed_writes() -> None:
    """Keep the one error line the last line when a save fails part-way (a full disk): drop
    only ``_unretrieved_failed_write`` records from the ``asyncio`` logger; every other record
    is still logged. Installed once per process and left in place: the futures are collected
    whenever the garbage collector gets to them, also after ``main`` has returned."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _HideUnretrievedFailedWrites) for f in logger.filters):
        logger.addFilter(_HideUnretrievedFailedWrites())


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (usage errors and ``--help`` included)."""
    _hide_late_loop_callbacks()
    _hide_unretrieved_failed_writes()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage error or the help
        return e.code if isinstance(e.code, int) else 2
    debug = args.debug or os.environ.get("TRDQ_DEBUG") == "1"
    shown = warnings.showwarning
    if not debug:  # one line each, naming the command, like the errors
        warnings.showwarning = lambda message, category, *a, **k: print(
            f"trdq {args.command}: warning: {_one_line(message)}", file=sys.stderr)
    try:
        args.compile_cache = use_compilation_cache(args.no_compile_cache)
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"trdq {args.command}: interrupted (outputs are written whole or not at all)",
              file=sys.stderr)
        return 130
    except EXPECTED as e:
        if debug:
            raise
        print(f"trdq {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, the traceback is one flag away
        if debug:
            raise
        print(f"trdq {args.command}: internal error: {type(e).__name__}: {_one_line(e)} "
              "(a bug; rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
