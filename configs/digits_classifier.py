"""digits-classifier: CNN on 8x8 digits, the feature extractor of digits-FID and the judge of
class match for digits-dit / digits-unet samples."""
from trdq_jax.config import ClassifierConfig, ExperimentConfig, TrainConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="digits-classifier",
        model=ClassifierConfig(input_size=8, in_channels=1, num_classes=10, width=32,
                               feature_dim=128, dropout=0.1),
        train=TrainConfig(dataset="digits", num_steps=2000, batch_size=128, learning_rate=1e-3,
                          weight_decay=1e-4, warmup_steps=100, ema_decay=0.99,
                          checkpoint_every=500, log_every=100, seed=0),
    )
