"""digits-unet: class-conditional ADM-style UNet on the 8x8 digits (bundled model).

Two levels (8x8 at 64 channels, 4x4 at 128), one res block per level, self-attention at 4x4.
Sized for CPU training: ~2.3 steps/s on 2 busy cores, 3000 steps in ~20 minutes.
"""
from trdq_jax.config import ExperimentConfig, SamplerConfig, TrainConfig, UNetConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="digits-unet",
        model=UNetConfig(input_size=8, in_channels=1, base_channels=64, channel_mult=(1, 2),
                         num_res_blocks=1, attention_resolutions=(4,), num_heads=4,
                         num_groups=16, num_classes=10, class_dropout_prob=0.1,
                         learn_sigma=False),
        sampler=SamplerConfig(solver="ddim", num_steps=50, schedule="linear",
                              num_train_steps=1000, cfg_scale=5.0),
        train=TrainConfig(dataset="digits", num_steps=3000, batch_size=64, learning_rate=5e-4,
                          warmup_steps=200, ema_decay=0.999, checkpoint_every=250,
                          log_every=50, seed=0),
    )
