"""Evaluation: the digits classifier (features + class match) and sample-quality metrics.

::

    feature_fn = make_feature_fn(classifier, clf_params)
    score = digits_fid(real_images, generated_images, feature_fn)       # report as "digits-FID"
    match = class_match_accuracy(generated_images, labels, make_classify_fn(classifier, clf_params))
    values, mean_db = psnr(float_samples, quantized_samples)
"""
from trdq_jax.eval.classifier import (DigitsClassifier, classifier_loss, make_classifier_loss,
                                      make_classify_fn, make_feature_fn)
from trdq_jax.eval.metrics import (class_match_accuracy, digits_fid, feature_stats,
                                   frechet_distance, noise_prediction_mse, psnr, ssim)

__all__ = ["DigitsClassifier", "class_match_accuracy", "classifier_loss", "digits_fid",
           "feature_stats", "frechet_distance", "make_classifier_loss", "make_classify_fn",
           "make_feature_fn", "noise_prediction_mse", "psnr", "ssim"]
