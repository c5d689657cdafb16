"""Where the kernels run: backend / chip generation, interpret mode, and the block-size table.

Block sizes ``(bm, bn, bk)`` tile the ``[M, K] @ [K, N]`` product. They come from
``BLOCK_SIZE_TABLE`` keyed by ``(backend, generation)`` and are then fitted to the problem: a
small axis becomes one whole block, a large one gets the largest aligned block dividing it, so
DiT widths (1152 = 9 * 128, 4608 = 36 * 128) need no padding of the weights on each call.
The TPU and GPU entries are chosen from on-chip memory arithmetic (double-buffered int8 tiles
and an int32 accumulator well inside the default scoped VMEM / shared memory), NOT measured:
they were written on a CPU-only machine and want tuning with ``benchmarks/bench_matmul.py``.
"""
from __future__ import annotations

import jax
import numpy as np

# (backend, generation) -> (bm, bn, bk). "default" rows are the fallback for unknown chips.
BLOCK_SIZE_TABLE: dict[tuple[str, str], tuple[int, int, int]] = {
    # ~5 MiB of VMEM double-buffered: fits v5e's 16 MiB default scoped VMEM.
    ("tpu", "v5e"): (512, 512, 1024),
    ("tpu", "v5p"): (512, 512, 1024),
    # v6e: 256x256 MXU and 32 MiB default scoped VMEM -> a wider N tile (~9 MiB).
    ("tpu", "v6e"): (512, 1024, 1024),
    # v4 and older have no int8 MXU fast path; the kernel should still lower.
    ("tpu", "v4"): (512, 512, 512),
    ("tpu", "default"): (256, 256, 512),
    # Triton: powers of two; the K loop runs inside the kernel, bk is its step.
    ("gpu", "sm90"): (128, 128, 128),
    ("gpu", "sm80"): (128, 128, 64),
    ("gpu", "default"): (64, 64, 64),
    # Interpret mode (CPU): cost is per grid step, so fewer, larger steps.
    ("cpu", "interpret"): (256, 256, 512),
}


def backend_name() -> str:
    """``"tpu"``, ``"gpu"`` or ``"cpu"`` (the default JAX backend; ROCm and CUDA are ``"gpu"``)."""
    name = jax.default_backend()
    return name if name in ("tpu", "gpu") else "cpu"


def chip_generation(device=None) -> str:
    """A ``BLOCK_SIZE_TABLE`` generation key for ``device`` (default: the first device)."""
    device = jax.devices()[0] if device is None else device
    platform = device.platform
    if platform == "tpu":
        kind = device.device_kind.lower()
        for needle, gen in (("v6", "v6e"), ("trillium", "v6e"), ("v5 lite", "v5e"),
                            ("v5e", "v5e"), ("v5", "v5p"), ("v4", "v4")):
            if needle in kind:
                return gen
        return "default"
    if platform in ("gpu", "cuda", "rocm"):
        capability = getattr(device, "compute_capability", None)
        try:
            major = int(str(capability).split(".")[0])
        except ValueError:
            return "default"
        return "sm90" if major >= 9 else "sm80" if major == 8 else "default"
    return "interpret"


def resolve_interpret(interpret) -> bool:
    """``None`` -> interpret exactly when running on CPU (Pallas has no compiled CPU backend)."""
    if interpret is None:
        return backend_name() == "cpu"
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret: expected None, True or False, got {interpret!r}")
    return interpret


def check_block_sizes(block_sizes, *, even_k: bool) -> tuple[int, int, int]:
    """Validate a user ``(bm, bn, bk)``; ``even_k`` for int4 (two K rows per packed byte)."""
    ok = isinstance(block_sizes, (tuple, list)) and len(block_sizes) == 3 and all(
        isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b > 0
        for b in block_sizes)
    if not ok:
        raise ValueError(f"block_sizes: expected a tuple (bm, bn, bk) of positive ints, "
                         f"got {block_sizes!r}")
    bm, bn, bk = (int(b) for b in block_sizes)
    if even_k and bk % 2:
        raise ValueError(f"block_sizes: bk must be even for packed int4 weights, got {bk}")
    return bm, bn, bk


def _fit(target: int, dim: int, align: int, pow2: bool) -> int:
    """Block for one axis of length ``dim``: the whole axis when it is no longer than ``target``
    (Triton: its next power of two); else the largest block <= target dividing ``dim`` (a
    multiple of ``align``, or a power of two >= 16 on Triton), so the weight is never padded on
    the call; else (no such divisor) the whole axis up to 2x the target, else ``target``
    (padding)."""
    if pow2:
        if dim <= target:
            return max(16, 1 << (dim - 1).bit_length())
        block = target
        while block >= 16 and dim % block:
            block //= 2
        return block if block >= 16 else target
    if dim <= target:
        return dim
    for block in range(target - target % align, 0, -align):
        if dim % block == 0:
            return block
    return dim if dim <= 2 * target else target


def default_block_sizes(m: int, n: int, k: int, *, packed: bool = False,
                        backend: str | None = None,
                        generation: str | None = None) -> tuple[int, int, int]:
    """``(bm, bn, bk)`` for ``[m, k] @ [k, n]``: the table row fitted to the problem by ``_fit``.

    TPU (and interpret): a block is a multiple of the int8 tile (32 rows, 128 lanes) or the
    whole axis, as Mosaic requires. For packed int4 the K block is fitted on the packed rows
    (``bk / 2``), so ``bk`` is even. Triton: powers of two of at least 16.
    """
    backend = backend_name() if backend is None else backend
    generation = (chip_generation() if backend != "cpu" else "interpret") \
        if generation is None else generation
    bm, bn, bk = BLOCK_SIZE_TABLE.get((backend, generation),
                                      BLOCK_SIZE_TABLE.get((backend, "default"),
                                                           BLOCK_SIZE_TABLE[("cpu", "interpret")]))
    pow2 = backend == "gpu"
    bm, bn = _fit(bm, m, 32, pow2), _fit(bn, n, 128, pow2)
    if packed:
        return bm, bn, 2 * _fit(bk // 2, -(-k // 2), 128, pow2)
    return bm, bn, _fit(bk, k, 128, pow2)


# Below one lane tile (128) of K or N, padding dominates and XLA's own int8 dot is the better bet.
MIN_PALLAS_WIDTH = 128


def auto_backend(in_features: int, out_features: int, w_bits: int, a_bits: int) -> str:
    """The ``qlinear_apply`` backend for ``backend="auto"``: ``"pallas"`` on TPU / GPU when the
    layer is an integer matmul (weights and activations both quantized, <= 8 bits) and both
    widths are at least ``MIN_PALLAS_WIDTH``; ``"xla"`` otherwise (always on CPU, where Pallas
    could only run interpreted)."""
    integer = w_bits <= 8 and a_bits <= 8
    wide = min(in_features, out_features) >= MIN_PALLAS_WIDTH
    return "pallas" if backend_name() in ("tpu", "gpu") and integer and wide else "xla"
