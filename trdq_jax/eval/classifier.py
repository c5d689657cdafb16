"""Small CNN digit classifier: the feature extractor of digits-FID and the judge of class match.

Architecture (``ClassifierConfig`` names in brackets)::

    x [B, S, S, C] in [-1, 1]
    conv3x3(width)   - GroupNorm - relu      \
    conv3x3(width)   - GroupNorm - relu       | stage 1 at S x S
    avg-pool 2x2 (stride 2, only while the side is >= 4)
    conv3x3(2 width) - GroupNorm - relu      \
    conv3x3(2 width) - GroupNorm - relu       | stage 2
    global mean pool -> dense(feature_dim) - relu      <- ``features`` (FID features)
    dropout(dropout) -> dense(num_classes)              <- logits

GroupNorm (no batch statistics) keeps the model a pure function of ``params``: there is no
mutable state to thread through training or evaluation.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from trdq_jax.config import ClassifierConfig


class DigitsClassifier(nn.Module):
    """``__call__(x, train=False) -> logits [B, num_classes]`` float32;
    ``features(x) -> [B, feature_dim]`` float32 (penultimate activations, no dropout)."""

    config: ClassifierConfig

    def setup(self):
        cfg = self.config
        widths = (cfg.width, cfg.width, 2 * cfg.width, 2 * cfg.width)
        self.convs = [nn.Conv(w, (3, 3), padding="SAME", name=f"conv_{i}")
                      for i, w in enumerate(widths)]
        self.norms = [nn.GroupNorm(num_groups=math.gcd(8, w), name=f"norm_{i}")
                      for i, w in enumerate(widths)]
        self.feature_dense = nn.Dense(cfg.feature_dim, name="feature_dense")
        self.dropout_layer = nn.Dropout(cfg.dropout)
        self.head = nn.Dense(cfg.num_classes, name="head")

    def features(self, x: jax.Array) -> jax.Array:
        """``[B, S, S, C]`` images in [-1, 1] -> ``[B, feature_dim]`` penultimate activations."""
        self._check_input(x)
        h = jnp.asarray(x, jnp.float32)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = nn.relu(norm(conv(h)))
            if i == 1 and h.shape[1] >= 4:
                h = nn.avg_pool(h, (2, 2), strides=(2, 2), padding="SAME")
        h = jnp.mean(h, axis=(1, 2))
        return nn.relu(self.feature_dense(h))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``[B, num_classes]``; ``train=True`` enables dropout (needs a 'dropout' rng)."""
        h = self.features(x)
        h = self.dropout_layer(h, deterministic=not train)
        return self.head(h)

    def _check_input(self, x) -> None:
        cfg = self.config
        expected = (cfg.input_size, cfg.input_size, cfg.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x: expected [B, {cfg.input_size}, {cfg.input_size}, "
                             f"{cfg.in_channels}] images, got shape {tuple(x.shape)}")


def classifier_loss(params, batch, rng: jax.Array, model: DigitsClassifier):
    """Mean softmax cross-entropy of one batch, with dropout on.

    Args:
      params: the classifier's ``'params'`` collection.
      batch: ``(images [B, S, S, C] float, labels [B] int)``.
      rng: PRNG key for dropout.
      model: the ``DigitsClassifier``.
    Returns:
      ``(loss, {"loss": loss, "accuracy": acc})``, float32 scalars.
    """
    images, labels = batch
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, {"loss": loss, "accuracy": accuracy}


def make_classifier_loss(model: DigitsClassifier) -> Callable:
    """``loss_fn(params, batch, rng) -> (loss, metrics)`` for a generic optax training loop."""
    def loss_fn(params, batch, rng):
        return classifier_loss(params, batch, rng, model)
    return loss_fn


def make_feature_fn(model: DigitsClassifier, params) -> Callable:
    """Jitted ``images [B, S, S, C] -> features [B, feature_dim]`` for ``digits_fid``."""
    return jax.jit(lambda x: model.apply({"params": params}, x, method=DigitsClassifier.features))


def make_classify_fn(model: DigitsClassifier, params) -> Callable:
    """Jitted ``images [B, S, S, C] -> predicted labels [B] int32`` for ``class_match_accuracy``."""
    return jax.jit(lambda x: jnp.argmax(model.apply({"params": params}, x), -1).astype(jnp.int32))
