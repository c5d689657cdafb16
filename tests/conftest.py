"""Shared test set-up: CPU backend, a persistent compilation cache, and small fixtures."""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE = pathlib.Path(os.environ.get("TRDQ_TEST_CACHE", pathlib.Path.home() / ".cache" / "trdq_jax_tests"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE / "xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
