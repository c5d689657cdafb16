"""Evaluation: the digits classifier (features + class match) and sample-quality metrics.

::

    feature_fn = make_feature_fn(classifier, clf_params)
    score = digits_fid(real_images, generated_images, feature_fn)       # report as "digits-FID"
    match = class_match_accuracy(generated_images, labels, make_classify_fn(classifier, clf_params))
    values, mean_db = psnr(float_samples, quantized_samples)

What ``trdq eval`` computes, as library calls (``trdq_jax.eval.judge``)::

    labels = eval_labels(num_classes, per_class)        # sample i: class i % num_classes
    result = judge.judge(samples, labels, reference_for(samples.shape[1:]))  # + 95% bootstrap
    result = evaluate_model(model, params, cfg, source="mine", per_class=30, seeds=[0, 1, 2])
"""
from trdq_jax.eval.classifier import (DigitsClassifier, classifier_loss, make_classifier_loss,
                                      make_classify_fn, make_feature_fn)
from trdq_jax.eval.judge import (eval_labels, evaluate_checkpoint, evaluate_generation,
                                 evaluate_model, evaluate_quantized, reference_for)
from trdq_jax.eval.metrics import (bootstrap_class_match, bootstrap_fid, class_match_accuracy,
                                   class_match_hits, digits_fid, feature_stats, fid_from_features,
                                   frame_features, frechet_distance, noise_prediction_mse, psnr,
                                   ssim)

__all__ = ["DigitsClassifier", "bootstrap_class_match", "bootstrap_fid", "class_match_accuracy",
           "class_match_hits", "classifier_loss", "digits_fid", "eval_labels",
           "evaluate_checkpoint", "evaluate_generation", "evaluate_model", "evaluate_quantized",
           "feature_stats", "fid_from_features", "frame_features", "frechet_distance",
           "make_classifier_loss", "make_classify_fn", "make_feature_fn", "noise_prediction_mse",
           "psnr", "reference_for", "ssim"]
