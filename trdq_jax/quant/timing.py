"""Wall-clock seconds per quantization stage, for benchmarks.

``calibrate`` and ``quantize`` mark their stages with ``stage(name)``; nothing is recorded
unless a caller opens ``record()``::

    with timing.record() as seconds:
        calib = calibrate(...); qparams = quantize(...)
    print(seconds)   # {"trajectory": 12.1, "statistics": 30.5, "gptq": 201.7, ...}

Stages block on their JAX results before the clock stops (``jax.block_until_ready`` on what
the block returns is the caller's job; the stages here end with host numpy values).
Stage names: trajectory, statistics, alpha_search, weight_clip_search, gptq, activation_search,
packing, rotation.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter

_local = threading.local()


@contextlib.contextmanager
def record():
    """Collect ``{stage: seconds}`` (summed over repeats) of the stages run inside the block.
    Nested ``record`` blocks each see the stages run while they are open."""
    seconds: Counter = Counter()
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(seconds)
    try:
        yield seconds
    finally:
        stack.remove(seconds)


@contextlib.contextmanager
def stage(name: str):
    """Time the block as stage ``name`` in every open ``record``; free when none is open.
    A stage nested in another stage is counted in both."""
    stack = getattr(_local, "stack", None)
    if not stack:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        for seconds in stack:
            seconds[name] += elapsed
