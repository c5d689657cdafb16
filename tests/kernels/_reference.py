"""Independent numpy references for the kernel tests (int64 / float64; no jax, no trdq_jax)."""
import numpy as np


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """int [..., K, N] codes in [-8, 7] -> uint8 [..., ceil(K/2), N], even row in the low nibble."""
    if codes.shape[-2] % 2:
        pad = [(0, 0)] * codes.ndim
        pad[-2] = (0, 1)
        codes = np.pad(codes, pad)
    nibbles = codes.astype(np.int64) & 0xF
    return (nibbles[..., 0::2, :] | (nibbles[..., 1::2, :] << 4)).astype(np.uint8)


def int_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.astype(np.int64) @ w.astype(np.int64)


def dequant_matmul(x, w, x_scale, x_zero, w_scale, bias):
    """float64 ((x - z) s_x) @ (w s_w) + b for integer codes x [M, K], w [K, N]."""
    xf = (x.astype(np.float64) - (0 if x_zero is None else np.asarray(x_zero, np.float64)))
    wf = w.astype(np.float64) * np.asarray(w_scale, np.float64)
    y = (xf * np.asarray(x_scale, np.float64)) @ wf
    return y if bias is None else y + np.asarray(bias, np.float64)


def per_token_scale_zero(lo, hi, bits: int, symmetric: bool):
    """float64 per-token (scale, zero before rounding | None) of the documented quantizer."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    qmax = 2 ** (bits - 1) - 1
    if symmetric:
        return np.maximum(np.maximum(np.abs(lo), np.abs(hi)), 1e-8) / qmax, None
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = np.maximum(hi - lo, 1e-8) / (2 ** bits - 1)
    return scale, -qmax - 1 - lo / scale


def check_rounding(got, pre_round, lo: int, hi: int, tie_band: float = 1e-3):
    """``got`` == clip(round(pre_round), lo, hi) wherever ``pre_round`` is not within
    ``tie_band`` of a .5 rounding boundary (float32 kernels and a float64 reference may round
    those either way), and within 1 everywhere. Returns the fraction of near-ties."""
    got = np.asarray(got, np.int64)
    want = np.clip(np.round(pre_round), lo, hi).astype(np.int64)
    near_tie = np.abs(np.abs(pre_round - np.floor(pre_round)) - 0.5) < tie_band
    np.testing.assert_array_equal(got[~near_tie], want[~near_tie])
    assert np.abs(got - want).max(initial=0) <= 1
    return float(near_tie.mean())


def grouped_dequant_matmul(x, w, group_size: int, x_scale, x_zero, w_scale, bias):
    """float64 ``sum_g ((x_g - z_g) s_x,g) @ (w_g s_w,g) + b`` for integer codes x [M, K],
    w [K, N] in groups of ``group_size`` rows: x_scale / x_zero [M, G] (or [M, 1]: per token),
    w_scale [G, N] (or [N]: per channel)."""
    m, k = x.shape
    groups = k // group_size
    xs = np.broadcast_to(np.asarray(x_scale, np.float64), (m, groups))
    xz = np.broadcast_to(np.asarray(0 if x_zero is None else x_zero, np.float64), (m, groups))
    ws = np.broadcast_to(np.asarray(w_scale, np.float64), (groups, w.shape[1]))
    y = np.zeros((m, w.shape[1]))
    for g in range(groups):
        rows = slice(g * group_size, (g + 1) * group_size)
        xf = (x[:, rows].astype(np.float64) - xz[:, g:g + 1]) * xs[:, g:g + 1]
        y += xf @ (w[rows].astype(np.float64) * ws[g])
    return y if bias is None else y + np.asarray(bias, np.float64)
