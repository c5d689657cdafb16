"""digits-pixart: text-conditioned PixArt (adaLN-single, cross-attention to T5 captions) on the
8x8 scikit-learn digits (bundled model).

Captions come from ``trdq_jax.data.captions.TRAIN_TEMPLATES`` (380 phrasings: "a handwritten
seven", "the number 7, thin strokes", ...; four more are held out for evaluation) encoded by the
bundled frozen ``digits-t5`` encoder (64 channels per token, up to 24 tokens); 10% of the
examples get the empty prompt (the CFG null branch).
Width 192 = 12 * 16 (block Hadamard), 6 heads of 32, depth 6, patch 2 -> 16 tokens, as the
digits-dit. Reproduce with ``bash scripts/train_bundled.sh digits-pixart`` (after
``python scripts/make_text_encoder.py`` has written the encoder).
"""
from trdq_jax.config import (ExperimentConfig, GenerationConfig, PixArtConfig, SamplerConfig,
                             TrainConfig)


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="digits-pixart",
        model=PixArtConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=192, depth=6,
                           num_heads=6, mlp_ratio=4.0, caption_channels=64, max_tokens=24,
                           learn_sigma=False, interpolation_scale=1.0),
        sampler=SamplerConfig(solver="ddim", num_steps=50, schedule="linear",
                              num_train_steps=1000, cfg_scale=4.0),
        generation=GenerationConfig(num_samples=100, batch_size=100, seed=0),
        train=TrainConfig(dataset="captioned_digits", text_encoder="digits-t5",
                          caption_dropout_prob=0.1, num_steps=4000, batch_size=64,
                          learning_rate=5e-4, warmup_steps=200, ema_decay=0.999,
                          checkpoint_every=250, log_every=50, seed=0),
    )
