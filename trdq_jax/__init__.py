"""trdq_jax: TR-DQ (Time-Rotation Diffusion Quantization) for JAX/Flax diffusion models.

Public API tour::

    import trdq_jax as tq
    cfg = tq.config.load_config_file("configs/digits_dit.py")
    model = tq.models.build_model(cfg.model)
    params = tq.models.init_params(cfg.model, jax.random.key(0))
    tq.checkpoint.save("out/ckpt", params, cfg)
    tq.enable_compilation_cache()   # optional: reuse compiled programs across processes

Importing the package never turns the persistent compilation cache on; the ``trdq`` command
does (``trdq_jax.compile_cache``).
"""
from trdq_jax._version import __version__  # noqa: F401
from trdq_jax import checkpoint, config, models, sampling  # noqa: E402,F401
from trdq_jax.compile_cache import enable_compilation_cache  # noqa: E402,F401
