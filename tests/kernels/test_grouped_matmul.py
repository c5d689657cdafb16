"""grouped_matmul in interpret mode against a float64 numpy reference, group by group."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import VARIANTS, grouped_matmul
from tests.kernels import _reference as ref

BLOCKS = (16, 32, 32)  # several blocks per axis on the ragged shapes below, 2 groups of 16 or
# 1 group of 32 per K block


def _case(rng, m, k, n, s, w_bits):
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    lo, hi = (-128, 128) if w_bits == 8 else (-8, 8)
    codes = rng.integers(lo, hi, (s, k, n)).astype(np.int8)
    w_arg = codes if w_bits == 8 else ref.pack_int4(codes)
    return x, codes, w_arg


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("w_bits", [8, 4])
def test_groups_on_both_sides_match_float64(variant, w_bits):
    """Per token-and-group activations, per-group weights, one weight copy per segment."""
    rng = np.random.default_rng(w_bits)
    m, k, n, s, g = 37, 96, 70, 2, 16
    x, codes, w_arg = _case(rng, m, k, n, s, w_bits)
    x_scale = rng.uniform(0.01, 0.1, (m, k // g)).astype(np.float32)
    x_zero = rng.integers(-30, 30, (m, k // g)).astype(np.int32)
    w_scale = rng.uniform(0.001, 0.01, (s, k // g, n)).astype(np.float32)
    colsum = codes.astype(np.int32).reshape(s, k // g, g, n).sum(axis=2)
    bias = rng.standard_normal(n).astype(np.float32)
    for seg in (0, 1):
        got = np.asarray(grouped_matmul(x, w_arg, x_scale, x_zero, w_scale, colsum, bias, seg,
                                        group_size=g, w_bits=w_bits, block_sizes=BLOCKS,
                                        variant=variant))
        want = ref.grouped_dequant_matmul(x, codes[seg], g, x_scale, x_zero, w_scale[seg], bias)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_side_per_channel(variant):
    """Per-token activations with per-group weights (GPTQ-g128 style), and per-group
    activations with per-channel weights sharing one weight copy across segments."""
    rng = np.random.default_rng(3)
    m, k, n, g = 9, 64, 40, 32
    x, codes, w_arg = _case(rng, m, k, n, 1, 8)
    tok_scale = rng.uniform(0.01, 0.1, (m, 1)).astype(np.float32)
    tok_zero = rng.integers(-30, 30, (m,)).astype(np.int32)
    w_group_scale = rng.uniform(0.001, 0.01, (1, k // g, n)).astype(np.float32)
    colsum = codes.astype(np.int32).reshape(1, k // g, g, n).sum(axis=2)
    got = grouped_matmul(x, w_arg, tok_scale, tok_zero, w_group_scale, colsum, group_size=g,
                         block_sizes=BLOCKS, variant=variant)
    want = ref.grouped_dequant_matmul(x, codes[0], g, tok_scale, tok_zero[:, None],
                                      w_group_scale[0], None)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    grp_scale = rng.uniform(0.01, 0.1, (m, k // g)).astype(np.float32)
    channel_scale = rng.uniform(0.001, 0.01, (3, n)).astype(np.float32)  # 3 segments
    for seg in (0, 2):
        got = grouped_matmul(x, w_arg, grp_scale, None, channel_scale, None, segment=seg,
                             group_size=g, block_sizes=BLOCKS, variant=variant,
                             out_dtype=jnp.bfloat16)
        assert got.dtype == jnp.bfloat16
        want = ref.grouped_dequant_matmul(x, codes[0], g, grp_scale, None, channel_scale[seg],
                                          None)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2,
                                   atol=1e-2 * np.abs(want).max())


def test_one_group_is_the_per_channel_kernel():
    """group_size = K: the grouped kernel computes what w8a8_matmul does."""
    from pallas_kernels import w8a8_matmul
    rng = np.random.default_rng(4)
    x, codes, w_arg = _case(rng, 12, 48, 20, 1, 4)
    xs = rng.uniform(0.01, 0.1, (12, 1)).astype(np.float32)
    xz = rng.integers(-9, 9, (12, 1)).astype(np.int32)
    ws = rng.uniform(0.001, 0.01, (1, 20)).astype(np.float32)
    colsum = codes.astype(np.int32).sum(axis=1)
    got = grouped_matmul(x, w_arg, xs, xz, ws, colsum[:, None], group_size=48, w_bits=4)
    want = w8a8_matmul(x, w_arg, xs, xz, ws, colsum, w_bits=4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_k_blocks_fill_lane_tiles_with_whole_groups():
    from pallas_kernels.grouped_matmul import group_block_k
    assert group_block_k(1152, 64, packed=False) == 128      # 2 groups of 64 columns
    assert group_block_k(1024, 128, packed=True) == 256      # 2 groups of 64 packed columns
    assert group_block_k(1152, 64, packed=True) == 1152      # 4 groups do not divide 18: all K
    assert group_block_k(96, 16, packed=False) == 96


def test_supported_group_sizes_per_backend():
    from pallas_kernels.grouped_matmul import supports
    assert supports(64, packed=True, backend="gpu") and supports(16, packed=False, backend="gpu")
    assert not supports(16, packed=True, backend="gpu")    # 8 packed rows: below Triton's 16
    assert not supports(96, packed=False, backend="gpu")   # not a power of two
    assert supports(96, packed=False, backend="tpu") and supports(6, packed=True, backend="tpu")
    assert not supports(3, packed=True, backend="tpu")     # half a byte per group


def test_bad_inputs_name_the_argument():
    rng = np.random.default_rng(5)
    x, codes, w_arg = _case(rng, 4, 32, 8, 1, 8)
    xs, ws = np.ones((4, 2), np.float32), np.ones((1, 2, 8), np.float32)
    cases = [
        ({"group_size": 12}, r"^group_size: expected a positive int dividing K=32, got 12"),
        ({"group_size": True}, r"^group_size: expected a positive int dividing K=32, got True"),
        ({"x_scale": np.ones((4, 3))}, r"^x_scale: expected a scalar, \[M\], \[M, 1\] or "
                                       r"\[M, G\] with M=4, G=2, got \(4, 3\)"),
        ({"w_scale": np.ones((1, 4, 8))}, r"^w_scale: expected \[N\], \[S, N\] or \[S, G, N\] "
                                          r"with G=2, N=8, got \(1, 4, 8\)"),
        ({"x_zero": np.zeros((4, 2), np.int32)}, r"^w_colsum: required when x_zero is given"),
        ({"x_zero": np.zeros((4, 2), np.int32), "w_colsum": np.zeros((1, 8), np.int32)},
         r"^w_colsum: expected \[S, G, N\] with G=2, N=8, got \(1, 8\)"),
        ({"block_sizes": (16, 32, 24)}, r"^block_sizes: bk must hold whole groups \(16 rows\) "
                                        r"and divide K=32, got 24"),
        ({"block_sizes": (16, 32)}, r"^block_sizes: expected a tuple \(bm, bn, bk\)"),
    ]
    for change, message in cases:
        args = {"x_scale": xs, "x_zero": None, "w_scale": ws, "w_colsum": None,
                "group_size": 16, **change}
        with pytest.raises(ValueError, match=message):
            grouped_matmul(x, w_arg, **args)
    with pytest.raises(ValueError, match=r"^group_size: must be even for packed int4"):
        grouped_matmul(np.zeros((4, 30), np.int8), ref.pack_int4(np.zeros((30, 8), np.int8)),
                       1.0, None, np.ones(8, np.float32), None, group_size=15, w_bits=4)
