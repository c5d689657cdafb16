"""Datasets: real 8x8 handwritten digits, moving-digit videos, and a resumable batch iterator.

::

    images, labels = load_digits("train")                       # [1497, 8, 8, 1] in [-1, 1]
    videos, labels = load_moving_digits("test", num_frames=8)   # [300, 8, 16, 16, 1]
    batches = batch_iterator((images, labels), batch_size=128, seed=0, start_step=step)
"""
from trdq_jax.data.digits import (DATASETS, SPLITS, classifier_frames, load_dataset,
                                  load_digits, load_moving_digits)
from trdq_jax.data.iterator import batch_iterator

__all__ = ["DATASETS", "SPLITS", "batch_iterator", "classifier_frames", "load_dataset",
           "load_digits", "load_moving_digits"]
