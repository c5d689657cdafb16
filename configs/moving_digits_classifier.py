"""moving-digits-classifier: CNN on 12x12 frames of the moving-digits videos (each frame labelled
with its video's digit); judges moving-digits-vdit samples frame by frame."""
from trdq_jax.config import ClassifierConfig, ExperimentConfig, TrainConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="moving-digits-classifier",
        model=ClassifierConfig(input_size=12, in_channels=1, num_classes=10, width=32,
                               feature_dim=128, dropout=0.1),
        train=TrainConfig(dataset="moving_digits", num_steps=3000, batch_size=128,
                          learning_rate=1e-3, weight_decay=1e-4, warmup_steps=100,
                          ema_decay=0.99, checkpoint_every=500, log_every=100, seed=0),
    )
