"""Packed int4 weights are unpacked one layer at a time inside a sampler-style ``lax.scan``.

The weights are loop-invariant in the scan, so without care XLA hoists every layer's
uint8 -> int8 unpacking out of the loop (or runs all of them at the top of the loop body) and
the W4 program holds every layer's unpacked codes at once: more temporaries than the W8 program,
whose int8 codes are its arguments. Measured with XLA's compiled memory analysis.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trdq_jax.quant import quantizers
from trdq_jax.quant.qlinear import QLinear, qlinear_apply

K = 256        # every layer K -> K
LAYERS = 6     # chained, as the blocks of a model
ROWS = 32      # tokens
STEPS = 3      # scan length (sampling steps)


def _layers(bits: int, packed: bool, a_bits: int = 8) -> list[QLinear]:
    """LAYERS QLinear of int ``bits`` codes (uint8 pairs when ``packed``), dynamic ``a_bits``
    activations (16: weight-only)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(LAYERS):
        kernel = jnp.asarray(rng.standard_normal((K, K)) / np.sqrt(K), jnp.float32)
        codes, scale, _ = quantizers.quantize_weight(kernel, bits)
        w_q = quantizers.pack_int4(codes) if packed else codes
        out.append(QLinear(w_q=w_q[None], w_scale=scale[None],
                           w_colsum=codes.astype(jnp.int32).sum(0)[None], in_features=K,
                           w_bits=bits, a_bits=a_bits, a_mode="dynamic"))
    return out


def _sampler_like(layers, x):
    """``STEPS`` scan steps, each running the layers in sequence (the weights are invariant)."""
    def step(h, _):
        for q in layers:
            h = jnp.tanh(qlinear_apply(q, h, 0, "xla"))
        return h, None
    return jax.lax.scan(step, x, None, length=STEPS)[0]


def _compiled(layers, x):
    return jax.jit(_sampler_like).lower(layers, x).compile()


def test_int4_unpacked_per_layer_in_scan():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((ROWS, K)), jnp.float32)
    w8, w4 = _compiled(_layers(8, False), x), _compiled(_layers(4, True), x)
    m8, m4 = w8.memory_analysis(), w4.memory_analysis()
    if m8 is None or m4 is None:
        pytest.skip("this backend reports no compiled memory analysis")
    one_layer = K * K  # the int8 codes of one unpacked layer
    # Every layer unpacked at once would add LAYERS * one_layer; one at a time adds at most one.
    assert m4.temp_size_in_bytes <= m8.temp_size_in_bytes + one_layer, (
        f"W4 temporaries {m4.temp_size_in_bytes} B vs W8 {m8.temp_size_in_bytes} B: the int4 "
        f"codes are unpacked for several layers at once ({one_layer} B each)")
    program = lambda m: (m.argument_size_in_bytes + m.output_size_in_bytes  # noqa: E731
                         + m.temp_size_in_bytes)
    assert program(m4) < program(m8)


@pytest.mark.parametrize("a_bits", [8, 16])
def test_packed_and_unpacked_int4_agree_exactly(a_bits):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((ROWS, K)), jnp.float32)
    packed, unpacked = _layers(4, True, a_bits), _layers(4, False, a_bits)
    assert packed[0].packed and not unpacked[0].packed
    np.testing.assert_array_equal(np.asarray(_compiled(packed, x)(packed, x)),
                                  np.asarray(_compiled(unpacked, x)(unpacked, x)))


def _adaln_like(layers, x, c):
    """``STEPS`` scan steps; every layer reads the same conditioning ``c`` (as each block's adaLN
    modulation does) and modulates the hidden state ``x``."""
    def step(h, _):
        for q in layers:
            mod = qlinear_apply(q, jax.nn.silu(c), 0, "xla")
            h = jnp.tanh(h * mod)
        return h, None
    return jax.lax.scan(step, x, None, length=STEPS)[0]


@pytest.mark.parametrize("bits, packed", [(8, False), (4, True)])
def test_weight_only_layers_hold_no_float_weights(bits, packed):
    """Weight-only layers dot their integer codes (``sliced_dot``): the program never holds a
    float32 copy of a weight (the dequantized float32 weights of every adaLN layer were all
    alive at once, ~880 MiB at DiT-XL/2). Packed int4 codes are still unpacked to int8 (one
    byte per code): layers that share their input (adaLN) are unpacked together on XLA:CPU."""
    rng = np.random.default_rng(3)
    x, c = (jnp.asarray(rng.standard_normal((2, K)), jnp.float32) for _ in range(2))  # 2 samples
    layers = _layers(bits, packed, a_bits=16)
    m = jax.jit(_adaln_like).lower(layers, x, c).compile().memory_analysis()
    if m is None:
        pytest.skip("this backend reports no compiled memory analysis")
    codes = LAYERS * K * K if packed else 0  # every layer's unpacked int8 codes
    float_weight = K * K * 4
    assert m.temp_size_in_bytes < codes + float_weight, (
        f"temporaries {m.temp_size_in_bytes} B hold a float32 weight ({float_weight} B)")


def test_sliced_dot_has_float32_precision():
    from trdq_jax.quant.qlinear import sliced_dot
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 300)).astype(np.float32)
    x[:, 3] *= 1000.0  # an outlier channel
    x[1] = 0.0         # an all-zero token
    x[2, :] *= 1e-30   # a tiny one
    codes = rng.integers(-127, 128, size=(300, 40)).astype(np.int8)
    want = x.astype(np.float64) @ codes.astype(np.float64)
    got = np.asarray(sliced_dot(jnp.asarray(x), jnp.asarray(codes)))
    scale = np.abs(x).max(-1, keepdims=True) * np.abs(codes.astype(np.float64)).sum(0)
    assert np.all(np.abs(got - want) <= 2.0 ** -22 * scale + 1e-37)
    assert np.all(got[1] == 0.0)
