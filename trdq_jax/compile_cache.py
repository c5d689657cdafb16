"""A persistent compilation cache: XLA programs compiled once are kept on disk and reused by
later processes (the sampler's ``lax.scan``, calibration, quantized layers...), so the second
``trdq sample`` of a model skips most of its compile time.

Library users turn it on with one call, before or after their first ``jax.jit``::

    import trdq_jax
    trdq_jax.enable_compilation_cache()              # $XDG_CACHE_HOME/trdq_jax/xla or ~/.cache/trdq_jax/xla
    trdq_jax.enable_compilation_cache("/fast/disk")  # or a directory of your choice

Importing the library never turns it on. The ``trdq`` command does, for every command, unless
``TRDQ_COMPILATION_CACHE=0`` or ``--no-compile-cache`` is given; a cache directory configured
for JAX itself (``JAX_COMPILATION_CACHE_DIR``) is then used as it is. The cache only grows:
delete the directory to reclaim its space (nothing else is kept there). As JAX warns, a
compilation cache is trusted code: keep it where only you can write.
"""
from __future__ import annotations

import math
import os
import pathlib

ENV_SWITCH = "TRDQ_COMPILATION_CACHE"
# Programs that compiled faster than this are not written (JAX's default is 1 s; the CLI's
# programs on a CPU are mostly between 0.1 and 1 s, and reading one back costs milliseconds).
MIN_COMPILE_TIME_S = 0.1


def default_cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/trdq_jax/xla`` (an absolute ``XDG_CACHE_HOME`` only, as the XDG spec
    says), else ``~/.cache/trdq_jax/xla``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = pathlib.Path(base) if base and os.path.isabs(base) else \
        pathlib.Path.home() / ".cache"
    return root / "trdq_jax" / "xla"


def compilation_cache_dir() -> pathlib.Path | None:
    """The directory JAX's persistent compilation cache uses now, or None when it is off."""
    import jax
    path = jax.config.jax_compilation_cache_dir
    if not path or not jax.config.jax_enable_compilation_cache:
        return None
    return pathlib.Path(path)


def enable_compilation_cache(path: str | os.PathLike | None = None, *,
                             min_compile_time_s: float = MIN_COMPILE_TIME_S) -> pathlib.Path:
    """Keep compiled XLA programs in ``path`` (default ``default_cache_dir()``, created if
    missing) and reuse them in later processes; returns the directory.

    ``min_compile_time_s``: programs that compiled faster are not written. Calling it again
    with another directory moves the cache there for the programs compiled from then on.
    Raises ValueError naming the argument for a bad value, OSError when the directory cannot be
    created or written.
    """
    if path is not None and (not isinstance(path, (str, os.PathLike)) or not str(path)):
        raise ValueError(f"path: expected a directory path or None, got {path!r}")
    if isinstance(min_compile_time_s, bool) or not isinstance(min_compile_time_s, (int, float)) \
            or not math.isfinite(min_compile_time_s) or min_compile_time_s < 0:
        raise ValueError(f"min_compile_time_s: expected a number of seconds >= 0, got "
                         f"{min_compile_time_s!r}")
    target = (default_cache_dir() if path is None else pathlib.Path(path)).expanduser().absolute()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        error = OSError(f"path: cannot create the compilation cache directory {str(target)!r}: "
                        f"{e.strerror or e}")
        error.errno = e.errno  # without the "[Errno N]" prefix in the message
        raise error from None
    if not os.access(target, os.W_OK | os.X_OK):
        raise OSError(f"path: the compilation cache directory {str(target)!r} is not writable")

    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    if previous != str(target):
        cc.set_cache_dir(str(target))
        cc.reset_cache()  # JAX opens its cache once per process: reopen it at the new place
    return target


def disable_compilation_cache() -> None:
    """Turn the persistent compilation cache off for the rest of this process."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc
    jax.config.update("jax_enable_compilation_cache", False)
    cc.reset_cache()


def memory_maps() -> tuple[int, int] | None:
    """``(memory maps this process holds, the kernel's vm.max_map_count)`` on Linux, else None.

    On the CPU backend every compiled XLA program keeps a few memory maps (its JIT code and
    data) until JAX's caches drop it; a process that compiles thousands of programs (a choice
    of components quantizes and samples about 17 candidates, each ~700 maps on the bundled
    models) can reach the limit, and LLVM then fails with "Cannot allocate memory"."""
    try:
        with open("/proc/self/maps", "rb") as f:
            held = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return held, limit


def release_programs_near_map_limit(fraction: float = 0.5) -> bool:
    """Drop JAX's compiled programs (``jax.clear_caches``) when this process holds more than
    ``fraction`` of ``vm.max_map_count`` memory maps; True when it did. Later calls compile
    again (the persistent cache, when on, makes that a read). A no-op off Linux."""
    counts = memory_maps()
    if counts is None or counts[0] <= fraction * counts[1]:
        return False
    import gc
    import jax
    jax.clear_caches()
    gc.collect()
    return True
