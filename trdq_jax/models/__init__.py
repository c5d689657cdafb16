"""Plain Flax Linen diffusion models; they know nothing about quantization.

All three families share one call signature::

    model.apply({'params': params}, x, t, y, train=False, share_cfg=False) -> out

with ``x`` channels-last (``[B, H, W, C]`` images or ``[B, F, H, W, C]`` videos), ``t`` ``[B]``
time steps in training units and ``y`` ``[B]`` int labels.

``load(name)`` gives a bundled model, ``load_checkpoint(dir)`` any float checkpoint
(``trdq_jax.models.zoo``).
"""
from trdq_jax.models.dit import DiT, dit_config, pos_embed_size
from trdq_jax.models.factory import (abstract_params, build_model, check_params, dummy_inputs,
                                     init_params, input_shape, param_count)
from trdq_jax.models.zoo import load, load_checkpoint

__all__ = ["DiT", "abstract_params", "build_model", "check_params", "dit_config", "dummy_inputs",
           "init_params", "input_shape", "load", "load_checkpoint", "param_count",
           "pos_embed_size"]
