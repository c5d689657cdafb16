"""trdq_jax: TR-DQ (Time-Rotation Diffusion Quantization) for JAX/Flax diffusion models.

Public API tour::

    import trdq_jax as tq
    cfg = tq.config.load_config_file("configs/digits_dit.py")
    model = tq.models.build_model(cfg.model)
    params = tq.models.init_params(cfg.model, jax.random.key(0))
    tq.checkpoint.save("out/ckpt", params, cfg)
"""
from trdq_jax._version import __version__  # noqa: F401
from trdq_jax import checkpoint, config, models, sampling  # noqa: E402,F401
