"""digits-dit: class-conditional DiT on the 8x8 scikit-learn digits (bundled model).

Width 192 = 12 * 16 (a K * 2^m width for block Hadamard rotations), 6 heads of 32, depth 6,
patch 2 -> 16 tokens. Sized for CPU training: ~2.3 steps/s on 2 busy cores, 3000 steps in ~20
minutes.
"""
from trdq_jax.config import (DiTConfig, ExperimentConfig, GenerationConfig, SamplerConfig,
                             TrainConfig)


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="digits-dit",
        model=DiTConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=192, depth=6,
                        num_heads=6, mlp_ratio=4.0, num_classes=10, class_dropout_prob=0.1,
                        learn_sigma=False),
        sampler=SamplerConfig(solver="ddim", num_steps=50, schedule="linear",
                              num_train_steps=1000, cfg_scale=5.0),
        generation=GenerationConfig(num_samples=100, batch_size=100, seed=0),
        train=TrainConfig(dataset="digits", num_steps=3000, batch_size=64, learning_rate=5e-4,
                          warmup_steps=200, ema_decay=0.999, checkpoint_every=250,
                          log_every=50, seed=0),
    )
