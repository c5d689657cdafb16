"""Pallas int8 / int4 matmul kernels for trdq_jax.

Not implemented yet: the W8A8 / W4A8 kernels with fused dequantisation and segment-indexed scales
are tracked by the project's kernels issue. Nothing here is importable as a kernel today, on
purpose, so that no code path silently uses a placeholder.
"""
__all__: list[str] = []
