"""w8a8_matmul / int8_matmul_acc in interpret mode against numpy int64 / float64 references."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (BLOCK_SIZE_TABLE, VARIANTS, default_block_sizes, int8_matmul_acc,
                            platform, w8a8_matmul)
from tests.kernels import _reference as ref
from trdq_jax.quant.quantizers import pack_int4

BLOCKS = (16, 32, 32)  # small, so every ragged shape below spans several blocks per axis


def _weights(rng, s, k, n, w_bits):
    """(codes int8 [S, K, N], the kernel's w_q argument)."""
    if w_bits == 8:
        codes = rng.integers(-128, 128, (s, k, n)).astype(np.int8)
        return codes, codes
    codes = rng.integers(-8, 8, (s, k, n)).astype(np.int8)
    return codes, ref.pack_int4(codes)


def test_numpy_packing_is_the_qlinear_format():
    codes = np.random.default_rng(0).integers(-8, 8, (2, 7, 5)).astype(np.int8)
    np.testing.assert_array_equal(ref.pack_int4(codes), np.asarray(pack_int4(jnp.asarray(codes))))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("w_bits", [8, 4])
def test_accumulator_is_exact_on_ragged_shapes(variant, w_bits):
    rng = np.random.default_rng(w_bits)
    for m, k, n in [(37, 101, 70), (5, 32, 3)]:  # odd K: the last packed byte has one code
        x = rng.integers(-128, 128, (m, k)).astype(np.int8)
        codes, w_arg = _weights(rng, 3, k, n, w_bits)
        x[0] = -128  # extreme row x extreme column: the largest products
        codes[:, :, 0] = -128 if w_bits == 8 else -8
        w_arg = codes if w_bits == 8 else ref.pack_int4(codes)
        for seg in (0, 2):
            got = int8_matmul_acc(x, w_arg, seg, w_bits=w_bits, block_sizes=BLOCKS,
                                  variant=variant)
            assert got.dtype == jnp.int32 and got.shape == (m, n)
            np.testing.assert_array_equal(np.asarray(got), ref.int_matmul(x, codes[seg]))


def test_deep_k_accumulates_exactly_with_table_blocks():
    """K = 4608 (DiT-XL fc2) at the extreme codes: |acc| = 128 * 128 * 4608 ~ 7.5e7."""
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (9, 4608)).astype(np.int8)
    w = rng.integers(-128, 128, (4608, 20)).astype(np.int8)
    x[1], w[:, 3] = -128, -128
    got = np.asarray(int8_matmul_acc(x, w))  # block_sizes=None: the table's CPU row
    want = ref.int_matmul(x, w)
    assert want[1, 3] == 128 * 128 * 4608
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("w_bits", [8, 4])
def test_epilogue_matches_float64_reference(variant, w_bits):
    rng = np.random.default_rng(10 + w_bits)
    m, k, n, s = 37, 101, 70, 2
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    codes, w_arg = _weights(rng, s, k, n, w_bits)
    x_scale = rng.uniform(0.01, 0.1, (m, 1)).astype(np.float32)
    x_zero = rng.integers(-30, 30, (m, 1)).astype(np.int32)
    w_scale = rng.uniform(0.001, 0.01, (s, n)).astype(np.float32)
    colsum = codes.astype(np.int32).sum(axis=1)
    bias = rng.standard_normal(n).astype(np.float32)
    for seg in (0, 1):
        got = np.asarray(w8a8_matmul(x, w_arg, x_scale, x_zero, w_scale, colsum, bias, seg,
                                     w_bits=w_bits, block_sizes=BLOCKS, variant=variant))
        want = ref.dequant_matmul(x, codes[seg], x_scale, x_zero, w_scale[seg], bias)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_static_symmetric_scalars_without_bias():
    """Per-tensor scalar scale, no zero point, no bias, one shared weight, bf16 output."""
    rng = np.random.default_rng(3)
    x = rng.integers(-127, 128, (20, 48)).astype(np.int8)
    w = rng.integers(-127, 128, (48, 30)).astype(np.int8)
    w_scale = rng.uniform(0.001, 0.01, 30).astype(np.float32)
    want = ref.dequant_matmul(x, w, 0.05, None, w_scale, None)
    got = w8a8_matmul(x, w, np.float32(0.05), None, w_scale, None, None, block_sizes=BLOCKS)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    got16 = w8a8_matmul(x, w, 0.05, None, w_scale, None, out_dtype=jnp.bfloat16)
    assert got16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got16, np.float64), want, rtol=1e-2,
                               atol=1e-2 * np.abs(want).max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_traced_segment_picks_its_rows_in_one_compile(variant):
    rng = np.random.default_rng(4)
    m, k, n, s = 24, 64, 40, 3
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    codes, _ = _weights(rng, s, k, n, 8)
    x_scale = rng.uniform(0.01, 0.1, (m, 1)).astype(np.float32)
    x_zero = rng.integers(-30, 30, (m, 1)).astype(np.int32)
    # Scales an order of magnitude apart per segment: a wrong row cannot pass the tolerance.
    magnitudes = np.array([[1e-3], [1e-2], [1e-1]])
    w_scale = (rng.uniform(0.5, 1.0, (s, n)) * magnitudes).astype(np.float32)
    colsum = codes.astype(np.int32).sum(axis=1)
    bias = rng.standard_normal(n).astype(np.float32)
    traces = []

    @jax.jit
    def run(segment):
        traces.append(1)
        return w8a8_matmul(x, codes, x_scale, x_zero, w_scale, colsum, bias, segment,
                           block_sizes=BLOCKS, variant=variant)

    outs = {seg: np.asarray(run(jnp.int32(seg))) for seg in (0, 1, 2, 7)}
    assert len(traces) == 1
    for seg in range(s):
        want = ref.dequant_matmul(x, codes[seg], x_scale, x_zero, w_scale[seg], bias)
        np.testing.assert_allclose(outs[seg], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(outs[7], outs[2])  # out-of-range segments clip like jnp.take


def test_shared_weight_with_per_segment_scales():
    rng = np.random.default_rng(5)
    x = rng.integers(-128, 128, (10, 40)).astype(np.int8)
    codes = rng.integers(-8, 8, (40, 33)).astype(np.int8)
    w_scale = rng.uniform(0.1, 1.0, (2, 33)).astype(np.float32) * np.array([[1.0], [50.0]],
                                                                             np.float32)
    for seg in (0, 1):
        got = w8a8_matmul(x, ref.pack_int4(codes), 0.1, 3, w_scale,
                          np.tile(codes.astype(np.int32).sum(0), (2, 1)), None, seg, w_bits=4,
                          block_sizes=BLOCKS)
        want = ref.dequant_matmul(x, codes, 0.1, 3, w_scale[seg], None)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_block_sizes_are_fitted_to_the_problem():
    tpu = lambda *a, **kw: default_block_sizes(*a, backend="tpu", **kw)
    # DiT-XL: the largest 128-multiples dividing 1152 / 3456 / 4608 (no weight padding)
    assert tpu(4096, 1152, 4608, generation="v5e") == (512, 384, 768)
    assert tpu(4096, 4608, 1152, generation="v6e") == (512, 768, 384)
    assert tpu(4096, 3456, 1152, generation="v5p") == (512, 384, 384)
    # int4 packs K=1152 into 576 rows: no 128-multiple divides it, one whole K block instead
    assert tpu(4096, 1152, 1152, packed=True, generation="v5e") == (512, 384, 1152)
    assert tpu(10, 50, 71, packed=True, generation="v5e") == (10, 50, 72)  # small: whole axes
    assert tpu(4096, 1152, 1152, generation="v9x") == (256, 128, 384)  # unknown chip: default
    gpu = lambda *a, **kw: default_block_sizes(*a, backend="gpu", **kw)
    assert gpu(100, 1000, 70, generation="sm80") == (128, 128, 64)  # no pow-2 divisor: pad
    assert gpu(4096, 1152, 4608, generation="sm90") == (128, 128, 128)
    assert gpu(5, 20, 9, generation="sm90") == (16, 32, 16)
    assert gpu(5, 20, 9, packed=True, generation="sm90") == (16, 32, 32)


@pytest.mark.parametrize("platform_name, kind, capability, want", [
    ("tpu", "TPU v5 lite", None, "v5e"), ("tpu", "TPU v5p", None, "v5p"),
    ("tpu", "TPU v6 lite", None, "v6e"), ("tpu", "TPU v4", None, "v4"),
    ("tpu", "TPU7x", None, "default"), ("gpu", "NVIDIA H100", "9.0", "sm90"),
    ("gpu", "NVIDIA A100", "8.0", "sm80"), ("gpu", "Tesla T4", "7.5", "default"),
    ("cpu", "cpu", None, "interpret")])
def test_chip_generation_keys_the_table(platform_name, kind, capability, want):
    device = types.SimpleNamespace(platform=platform_name, device_kind=kind,
                                   compute_capability=capability)
    assert platform.chip_generation(device) == want
    assert want == "interpret" or (("gpu" if platform_name == "gpu" else "tpu"), want) in \
        BLOCK_SIZE_TABLE


def test_bad_inputs_name_the_argument():
    x = np.zeros((4, 10), np.int8)
    w = np.zeros((10, 6), np.int8)
    s = np.ones((1, 6), np.float32)
    c = np.zeros((1, 6), np.int32)
    cases = [
        (dict(x_q=x.astype(np.float32)), "x_q: expected int8"),
        (dict(w_q=np.zeros((9, 6), np.int8)), "w_q: 9 rows do not match"),
        (dict(w_q=np.zeros((4, 6), np.uint8), w_bits=4), r"w_q: 4 rows .*ceil\(K/2\)"),
        (dict(w_q=w, w_bits=4), "w_q: expected uint8"),
        (dict(w_bits=3), "w_bits: expected 8"),
        (dict(x_scale=np.ones((3, 1))), "x_scale: expected a scalar, \\[M\\]"),
        (dict(w_colsum=None), "w_colsum: required"),
        (dict(w_scale=np.ones((2, 5))), "w_scale: expected \\[N\\] or \\[S, N\\]"),
        (dict(w_q=np.zeros((3, 10, 6), np.int8), w_scale=np.ones((2, 6))), "w_q: 3 weight copies"),
        (dict(bias=np.ones(5)), "bias: expected None or \\[N\\]"),
        (dict(segment=1.5), "segment: expected an integer scalar"),
        (dict(block_sizes=(8, 8)), "block_sizes: expected a tuple"),
        (dict(w_q=np.zeros((5, 6), np.uint8), w_bits=4, block_sizes=(8, 8, 7)), "block_sizes: bk"),
        (dict(variant="fast"), "variant: expected None or one of"),
        (dict(interpret="yes"), "interpret: expected None, True or False"),
        (dict(out_dtype=jnp.int32), "out_dtype: expected a floating dtype"),
    ]
    for overrides, message in cases:
        args = dict(x_q=x, w_q=w, x_scale=1.0, x_zero=0, w_scale=s, w_colsum=c)
        args.update(overrides)
        with pytest.raises(ValueError, match=message):
            w8a8_matmul(**args)
