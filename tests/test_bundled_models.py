"""The bundled checkpoints load, and meet the quality bars they were trained for.

Class match is judged by the bundled classifiers on fixed seeds; the thresholds are the
project's acceptance bars (classifier >= 97% held-out, conditional samples >= 90% at the
model's default CFG scale). FID values are reported by ``trdq eval``, not asserted.
"""
import numpy as np
import pytest

from trdq_jax.models import zoo

pytestmark = pytest.mark.slow


def _need(name):
    if name not in zoo.available():
        pytest.fail(f"bundled model {name!r} is missing from trdq_jax/assets/models")


SHIPPED = ["digits-classifier", "moving-digits-classifier", "digits-dit", "digits-unet",
           "moving-digits-vdit", "digits-pixart"]


def test_every_shipped_model_is_present_and_restores():
    for name in SHIPPED:
        _need(name)
        model, params, cfg = zoo.load(name)
        assert cfg.name == name


@pytest.mark.parametrize("name", ["digits-classifier", "moving-digits-classifier"])
def test_classifier_heldout_accuracy(name):
    from trdq_jax.eval.judge import evaluate_classifier
    _need(name)
    result = evaluate_classifier(name)["heldout"]
    assert result.get("frame_accuracy", result["accuracy"]) >= 0.97


# Videos are judged frame by frame (the acceptance bar: every frame classified); 30 videos are
# 150 frames. The sample counts are sized to the suite's time budget (a 0.9 bar on 100 images
# or 150 frames still fails a model that lost a class). The text model is asked for each digit
# in phrasings held out of its training (each digit in all four held-out templates, twice).
@pytest.mark.parametrize("name, per_class", [("digits-dit", 10), ("digits-unet", 10),
                                             ("moving-digits-vdit", 3), ("digits-pixart", 8)])
def test_conditional_samples_match_their_class(name, per_class):
    from trdq_jax.eval.judge import evaluate_generator
    _need(name)
    result = evaluate_generator(name, per_class=per_class, seed=123)
    match = result["class_match"]
    assert match.get("frame_accuracy", match["accuracy"]) >= 0.90, match
    assert np.isfinite(result["digits_fid"])
