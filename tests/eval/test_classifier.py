"""DigitsClassifier: shapes, features method, loss vs numpy cross-entropy, a short real training."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trdq_jax.config import ClassifierConfig
from trdq_jax.data import batch_iterator, load_digits
from trdq_jax.eval import (DigitsClassifier, class_match_accuracy, classifier_loss, digits_fid,
                           make_classifier_loss, make_classify_fn, make_feature_fn)
from trdq_jax.models import build_model, init_params


def test_shapes_features_and_build_model():
    cfg = ClassifierConfig(input_size=16, width=8, feature_dim=24)
    model = build_model(cfg)
    assert isinstance(model, DigitsClassifier)
    params = init_params(cfg, jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 1), minval=-1, maxval=1)
    logits = model.apply({"params": params}, x)
    feats = model.apply({"params": params}, x, method=DigitsClassifier.features)
    assert logits.shape == (3, 10) and feats.shape == (3, 24) and logits.dtype == jnp.float32
    assert np.all(np.asarray(feats) >= 0)  # relu features
    # logits are the head applied to the features (no dropout at eval)
    head = params["head"]
    np.testing.assert_allclose(np.asarray(logits),
                               np.asarray(feats, np.float64) @ np.asarray(head["kernel"], np.float64)
                               + np.asarray(head["bias"], np.float64), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="x:"):
        model.apply({"params": params}, jnp.zeros((3, 8, 8, 1)))


def test_dropout_only_in_training():
    cfg = ClassifierConfig(width=8, feature_dim=16, dropout=0.5)
    model = DigitsClassifier(cfg)
    params = init_params(cfg, jax.random.key(0))
    x = jnp.asarray(load_digits("test")[0][:8])
    eval_a = model.apply({"params": params}, x)
    eval_b = model.apply({"params": params}, x, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(train, eval_a)


def test_loss_matches_numpy_cross_entropy():
    cfg = ClassifierConfig(width=8, feature_dim=16, dropout=0.0)
    model = DigitsClassifier(cfg)
    params = init_params(cfg, jax.random.key(3))
    images, labels = load_digits("test")
    batch = (jnp.asarray(images[:32]), jnp.asarray(labels[:32]))
    loss, metrics = make_classifier_loss(model)(params, batch, jax.random.key(0))
    logits = np.asarray(model.apply({"params": params}, batch[0]), np.float64)
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    expected = -np.mean(log_probs[np.arange(32), labels[:32]])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(logits.argmax(1) == labels[:32]))
    loss2, _ = classifier_loss(params, batch, jax.random.key(0), model)
    assert float(loss2) == pytest.approx(float(loss))


def test_short_adam_training_reaches_90_percent_test_accuracy():
    start = time.perf_counter()
    cfg = ClassifierConfig(width=16, feature_dim=64)
    model = DigitsClassifier(cfg)
    params = init_params(cfg, jax.random.key(0))
    loss_fn = make_classifier_loss(model)
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch, rng):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    train = load_digits("train")
    for k, batch in enumerate(batch_iterator(train, 64, seed=0)):
        if k == 300:
            break
        params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(k))
    test_images, test_labels = load_digits("test")
    predictions = np.asarray(make_classify_fn(model, params)(test_images))
    accuracy = np.mean(predictions == test_labels)  # counted independently of the helpers
    assert accuracy >= 0.90, accuracy
    assert class_match_accuracy(test_images, test_labels, make_classify_fn(model, params),
                                batch_size=128)["accuracy"] == pytest.approx(accuracy)
    # digits-FID: real train vs real test is far smaller than real vs pure noise
    feature_fn = make_feature_fn(model, params)
    noise = np.random.default_rng(0).uniform(-1, 1, size=(300, 8, 8, 1))
    real = digits_fid(train[0], test_images, feature_fn)
    fake = digits_fid(noise, test_images, feature_fn)
    assert 0 <= real < 0.2 * fake, (real, fake)
    assert time.perf_counter() - start < 60
