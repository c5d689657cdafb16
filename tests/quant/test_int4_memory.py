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
