"""Shared test set-up: CPU backend, a persistent compilation cache, and small fixtures."""
import os
import pathlib
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

_CACHE = pathlib.Path(os.environ.get("TRDQ_TEST_CACHE", pathlib.Path.home() / ".cache" / "trdq_jax_tests"))
# The tests' own cache, also for the `trdq` subprocesses they start (the command keeps a cache
# configured for JAX and would otherwise use the user's ~/.cache/trdq_jax/xla).
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_CACHE / "xla")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(_CACHE / "xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


_SESSION_START = time.perf_counter()
NOTEBOOK_TIMES: dict[str, list[float]] = {}  # notebook test id -> seconds of each kernel run


def pytest_runtest_logreport(report):
    """Collect ``notebook_seconds`` (tests/test_notebooks.py) from the test reports: in this
    process, or as pytest-xdist passes its workers' reports to the controller."""
    for name, value in getattr(report, "user_properties", ()):
        if name == "notebook_seconds" and report.when == "call":
            NOTEBOOK_TIMES[report.nodeid.split("[")[-1].rstrip("]") + ".ipynb"] = list(value)


def pytest_terminal_summary(terminalreporter):
    """The notebooks' share of the session (issue #14 asks for it to be reported)."""
    if not NOTEBOOK_TIMES:
        return
    total = time.perf_counter() - _SESSION_START
    spent = sum(sum(runs) for runs in NOTEBOOK_TIMES.values())
    terminalreporter.section("notebooks")
    for name, runs in sorted(NOTEBOOK_TIMES.items()):
        terminalreporter.line(f"{name}: " + " + ".join(f"{s:.1f} s" for s in runs))
    terminalreporter.line(f"notebooks: {spent:.0f} s of this session's {total:.0f} s "
                          f"({100 * spent / total:.0f}%)")
