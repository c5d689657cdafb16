"""The kernels lower for TPU (Mosaic) and GPU (Triton) from this CPU-only machine.

``jax.export`` runs Pallas' own lowering (jaxpr -> Mosaic MLIR / Triton IR, with its block-shape
and op-support checks) without the accelerator. What it cannot show: that Mosaic's or Triton's
compiler accepts the result, that it runs correctly, or how fast. Those need a TPU / GPU.
"""
import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import default_block_sizes, per_token_quantize, w8a8_matmul

_TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
_TARGETS = {  # platform: (variant, table row (backend, generation), custom-call marker)
    "tpu": ("grid_k", ("tpu", "v5e"), "tpu_custom_call"),
    "cuda": ("loop_k", ("gpu", "sm90"), "__gpu$xla.gpu.triton"),
}


def _export(fn, platform, *avals):
    exported = jax.export.export(jax.jit(fn), platforms=[platform],
                                 disabled_checks=[_TRITON])(*avals)
    return exported.mlir_module()


@pytest.mark.parametrize("platform", list(_TARGETS))
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("m, k, n", [(200, 999, 300), (512, 1152, 1152), (512, 4608, 1152)])
def test_w8a8_matmul_lowers_with_the_table_blocks(platform, w_bits, m, k, n):
    """Ragged shapes (padding is lowered too) and DiT-XL widths, blocks from the chip's row."""
    variant, (backend, generation), marker = _TARGETS[platform]
    blocks = default_block_sizes(m, n, k, packed=w_bits == 4, backend=backend,
                                 generation=generation)
    s = 2
    w_shape, w_dtype = ((s, k, n), jnp.int8) if w_bits == 8 else ((s, (k + 1) // 2, n), jnp.uint8)

    def fn(x, w, xs, xz, ws, cs, b, seg):
        return w8a8_matmul(x, w, xs, xz, ws, cs, b, seg, w_bits=w_bits, interpret=False,
                           variant=variant, block_sizes=blocks)

    avals = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in [
        ((m, k), jnp.int8), (w_shape, w_dtype), ((m, 1), jnp.float32), ((m, 1), jnp.int32),
        ((s, n), jnp.float32), ((s, n), jnp.int32), ((n,), jnp.float32), ((), jnp.int32)]]
    assert marker in _export(fn, platform, *avals)


@pytest.mark.parametrize("platform", list(_TARGETS))
def test_per_token_quantize_lowers(platform):
    marker = _TARGETS[platform][2]
    target = "tpu" if platform == "tpu" else "gpu"

    def fn(x, lo, hi):
        return per_token_quantize(x, lo, hi, interpret=False, target=target,
                                  block_sizes=(32, 256))

    avals = [jax.ShapeDtypeStruct((100, 1000), jnp.float32),
             jax.ShapeDtypeStruct((100, 1), jnp.float32),
             jax.ShapeDtypeStruct((100, 1), jnp.float32)]
    assert marker in _export(fn, platform, *avals)


@pytest.mark.parametrize("platform", list(_TARGETS))
@pytest.mark.parametrize("w_bits, group_size", [(4, 64), (8, 128)])
def test_grouped_matmul_lowers(platform, w_bits, group_size):
    """SVDQuant's INT4 format (groups of 64 on both sides) and GPTQ-g128 style at DiT-XL
    widths (K = 1152), ragged M; the K block is the group."""
    from pallas_kernels import grouped_matmul
    from pallas_kernels.grouped_matmul import group_block_k
    variant, (backend, generation), marker = _TARGETS[platform]
    m, k, n, s = 200, 1152, 1152, 2
    groups = k // group_size
    blocks = default_block_sizes(m, n, group_size, packed=w_bits == 4, backend=backend,
                                 generation=generation)[:2] + (
        group_block_k(k, group_size, packed=w_bits == 4),)
    w_shape, w_dtype = ((1, k, n), jnp.int8) if w_bits == 8 else ((1, k // 2, n), jnp.uint8)

    def fn(x, w, xs, xz, ws, cs, b, seg):
        return grouped_matmul(x, w, xs, xz, ws, cs, b, seg, group_size=group_size,
                              w_bits=w_bits, interpret=False, variant=variant,
                              block_sizes=blocks)

    avals = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in [
        ((m, k), jnp.int8), (w_shape, w_dtype), ((m, groups), jnp.float32),
        ((m, groups), jnp.int32), ((s, groups, n), jnp.float32), ((s, groups, n), jnp.int32),
        ((n,), jnp.float32), ((), jnp.int32)]]
    assert marker in _export(fn, platform, *avals)
