"""Pallas kernels for quantized linear layers (TPU via Mosaic, GPU via Triton, CPU interpreted).

``w8a8_matmul``      int8 / packed-int4 weights x int8 activations -> int32 accumulate, with the
                     dequantisation epilogue (zero-point correction, scales, bias) fused in and the
                     time segment selecting the scale row through scalar prefetch.
``int8_matmul_acc``  the raw int32 accumulator of the same kernels.
``grouped_matmul``   the same with a scale (and zero point) per group of input channels on
                     either side (GPTQ-g128 / SVDQuant INT4), K blocks aligned to the groups.
``per_token_quantize`` float activations -> int8 codes + per-token scale / zero, in a kernel.
``platform``         backend / chip detection, the block-size table, ``auto_backend``.

Only interpret mode has been run (on CPU); TPU and GPU lowering is checked from CPU with
``jax.export``. See ``int8_matmul`` for what is expected of each accelerator.
"""
from pallas_kernels import platform
from pallas_kernels.fused_quant import per_token_quantize
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.int8_matmul import VARIANTS, int8_matmul_acc, w8a8_matmul
from pallas_kernels.platform import BLOCK_SIZE_TABLE, auto_backend, default_block_sizes

__all__ = ["BLOCK_SIZE_TABLE", "VARIANTS", "auto_backend", "default_block_sizes",
           "grouped_matmul", "int8_matmul_acc", "per_token_quantize", "platform", "w8a8_matmul"]
