"""Class weights for the supervised loss, computed from the labelled masks.

Street scenes are dominated by a few classes (road, sky, building cover most pixels of a
CamVid image while pole, sign, pedestrian and bicyclist cover about 1 % each), so an
unweighted cross-entropy can reach a low loss while never predicting the rare classes.
SegNet's CamVid protocol (Badrinarayanan et al., 2017) weights each class by *median
frequency balancing* (Eigen and Fergus, 2015):

    freq(c)   = pixels of class c / pixels of the images in which c appears
    weight(c) = median over classes of freq / freq(c)

so a class as frequent as the median class weighs 1, rarer classes more, commoner ones
less. Only labelled (non-ignored) pixels count. The weights depend only on the labelled
set, so every replica and every resumed run computes the same values.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import tensorflow as tf

from kssl.data.examples import Examples

CLASS_WEIGHTINGS = ("median_frequency",)


def class_pixel_counts(reader, examples: Examples, num_classes: int):
    """Counts the labelled pixels of each class over `examples` in one tf.data pass.

    Returns:
      (class_pixels, image_pixels): int64 arrays [num_classes]. `class_pixels[c]` is the
      number of pixels labelled c; `image_pixels[c]` the number of labelled (non-ignored)
      pixels of the images that contain at least one pixel of c.
    """
    def histogram(row):
        mask = tf.cast(tf.reshape(row["mask"], [-1]), tf.int32)
        return tf.math.bincount(mask, minlength=256, maxlength=256, dtype=tf.int64)

    class_pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    ds = reader.load(examples, with_masks=True).map(
        histogram, num_parallel_calls=tf.data.AUTOTUNE).batch(64)
    for batch in ds.as_numpy_iterator():
        counts = batch[:, :num_classes]
        labelled = counts.sum(axis=1, keepdims=True)  # ignore (255) and stray values excluded
        class_pixels += counts.sum(axis=0)
        image_pixels += np.where(counts > 0, labelled, 0).sum(axis=0)
    return class_pixels, image_pixels


def median_frequency_weights(class_pixels, image_pixels) -> np.ndarray:
    """Median frequency balancing weights (see the module docstring).

    A class absent from every mask gets weight 1: no labelled pixel uses it, so the value
    only matters if the same weights are applied elsewhere. The median is taken over the
    classes that are present.
    """
    class_pixels = np.asarray(class_pixels, np.float64)
    image_pixels = np.asarray(image_pixels, np.float64)
    present = class_pixels > 0
    if not present.any():
        raise ValueError("median frequency weights need at least one labelled pixel")
    frequency = np.where(present, class_pixels / np.maximum(image_pixels, 1.0), 0.0)
    median = np.median(frequency[present])
    return np.where(present, median / np.where(present, frequency, 1.0), 1.0).astype(
        np.float32)


def resolve_class_weights(setting: Union[None, str, Sequence[float]], reader,
                          examples: Examples, num_classes: int, counts=None):
    """The class weights a run trains with, or None.

    Args:
      setting: None (unweighted), "median_frequency" (computed from `examples`' masks), or
        one non-negative weight per class.
      counts: `class_pixel_counts(reader, examples, num_classes)` when the caller has
        already counted (the masks are then not read again).
    Returns:
      float32 numpy array [num_classes], or None.
    Raises:
      ValueError: an unknown name, a list of the wrong length, or a negative weight.
    """
    if setting is None:
        return None
    if isinstance(setting, str):
        if setting not in CLASS_WEIGHTINGS:
            raise ValueError(f"supervised_loss.class_weights must be None, one of "
                             f"{CLASS_WEIGHTINGS} or {num_classes} numbers; got {setting!r}")
        if counts is None:
            counts = class_pixel_counts(reader, examples, num_classes)
        return median_frequency_weights(*counts)
    try:
        weights = np.asarray([float(w) for w in setting], np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"supervised_loss.class_weights must be None, one of "
                         f"{CLASS_WEIGHTINGS} or {num_classes} numbers; got {setting!r}"
                         ) from None
    if weights.shape != (num_classes,) or (weights < 0).any() or not np.isfinite(weights).all():
        raise ValueError(f"supervised_loss.class_weights must hold {num_classes} finite, "
                         f"non-negative numbers (one per class); got {list(setting)}")
    return weights


def format_weights(weights, class_names) -> str:
    """One line `name weight, ...` for the run's log."""
    return ", ".join(f"{name} {w:.2f}" for name, w in zip(class_names, weights))


__all__ = ["CLASS_WEIGHTINGS", "class_pixel_counts", "median_frequency_weights",
           "resolve_class_weights", "format_weights"]
