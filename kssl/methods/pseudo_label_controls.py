"""Counters to confirmation bias, shared by the methods that train on pseudo-labels.

A teacher's confident mistakes become the student's targets, and a class the teacher
favours absorbs its neighbours. Each control here is an option of the methods (off by
default, so a paper config keeps its paper behaviour):

- `ClassConfidence` + `adaptive_thresholds`: class-adaptive thresholds. A per-class
  exponential average of the teacher's confidence on the pixels it assigns to that class
  (AEL's confidence bank, Hu et al. 2021) scales a base threshold, normalised by the most
  confident class as FreeMatch's self-adaptive thresholds (Wang et al. 2023): the most
  confident (usually dominant) class keeps the base bar, a class the teacher is unsure of
  gets a proportionally lower one and is not starved.
- `DistributionAlignment`: the teacher's probabilities are multiplied by the labelled
  class prior over a running average of the teacher's own class distribution, and
  renormalised, before the argmax (ReMixMatch, Berthelot et al. 2020; DARS, He et al. 2021,
  aligns segmentation pseudo-labels to the labelled distribution): a class the teacher
  over-predicts is damped, one it under-predicts is lifted.
- `class_aware_scores`, `draw_present_class`: ClassMix's class choice and similar draws
  favour the classes the teacher is least confident on (AEL's adaptive copy-paste and
  CutMix), as a weighted draw without replacement; UniMatch centres its CutMix boxes on a
  class drawn so.
- `unlabelled_class_weights`: the unlabelled loss weighs each pixel by the supervised
  loss's class weight of its pseudo-label. With a class-weighted supervised loss (SegNet's
  median frequency) and an unweighted unlabelled loss the two terms pull the network to
  different class priors: the rare classes the weighted term lifts, the unweighted term
  damps again.
- `stability_scores`, `reliable_order`, `select_reliable`: ST++'s reliable-image selection
  (Yang et al. 2022): an unlabelled image whose predictions agree across training
  checkpoints is reliable (`ThreeStage.reliable_share`).

Every running state is updated from sums over the global batch (all-reduced) and written
with `replicated_state.assign_identical`, so it is the same on every replica; it lives in
Keras weights of the method, so checkpoints and the resume backup carry it.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from kssl import losses
from kssl.augment import mixing
from kssl.methods import replicated_state

_EPSILON = 1e-6


def _per_class_sums(values, labels, valid, num_classes):
    """(sum of `values` [C], pixel count [C]) per label over the global batch."""
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    keep = tf.reshape(tf.cast(valid, tf.float32), [-1])
    segments = tf.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    values = tf.reshape(tf.cast(values, tf.float32), [-1]) * keep
    total = tf.math.unsorted_segment_sum(values, segments, num_classes + 1)[:num_classes]
    count = tf.math.unsorted_segment_sum(keep, segments, num_classes + 1)[:num_classes]
    return losses.replica_sum(total), losses.replica_sum(count)


class ClassConfidence(keras.layers.Layer):
    """Exponential average, per class, of the teacher's confidence on its own argmax.

    After each batch, for every class c the teacher assigned to at least one counted pixel
    of the global batch: conf_c <- decay * conf_c + (1 - decay) * mean confidence of those
    pixels. Classes absent from the batch keep their value. Starts at 1 for every class,
    so the thresholds start at the base threshold.
    """

    def __init__(self, num_classes: int, decay: float = 0.99, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(trainable=False, **kwargs)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"class confidence decay must be in [0, 1), got {decay}")
        self.num_classes = int(num_classes)
        self.decay = float(decay)
        self.confidence = self.add_weight(shape=(self.num_classes,), name="confidence",
                                          initializer="ones", trainable=False,
                                          dtype="float32", autocast=False)
        self.built = True

    def updated(self, probs, valid=None) -> tf.Tensor:
        """The new per-class confidence [C] after the batch `probs` [B, H, W, C] (pixels
        where `valid` [B, H, W] is false are left out); also stored."""
        probs = tf.cast(probs, tf.float32)
        labels = tf.argmax(probs, -1, output_type=tf.int32)
        valid = tf.ones_like(labels, tf.bool) if valid is None else valid
        total, count = _per_class_sums(tf.reduce_max(probs, -1), labels, valid,
                                       self.num_classes)
        batch_mean = total / tf.maximum(count, 1.0)
        old = tf.convert_to_tensor(self.confidence)
        new = tf.where(count > 0, self.decay * old + (1.0 - self.decay) * batch_mean, old)
        replicated_state.assign_identical([self.confidence], [new])
        return new


def control_layers(method: str, num_classes: int, class_prior, class_confidence: bool,
                   distribution_alignment: bool, decay: float, prefix: str = "") -> tuple:
    """The state layers a method's options ask for: (a `ClassConfidence` or None, a
    `DistributionAlignment` or None), named `prefix` + "class_confidence" and
    `prefix` + "distribution_alignment". Alignment needs the labelled `class_prior`
    (which the driver passes); `method` names the method in that error."""
    confidence = alignment = None
    if class_confidence:
        confidence = ClassConfidence(num_classes, decay, name=f"{prefix}class_confidence")
    if distribution_alignment:
        if class_prior is None:
            raise ValueError(f"{method} distribution_alignment needs the labelled class "
                             "prior (class_prior)")
        alignment = DistributionAlignment(class_prior, decay,
                                          name=f"{prefix}distribution_alignment")
    return confidence, alignment


def unlabelled_class_weights(method: str, enabled: bool, class_weights):
    """The [C] class weights of a method's unlabelled loss: the supervised loss's
    `class_weights` when `enabled`, else None (unweighted, as every paper). `method` names
    the method in the error raised when they are asked for but the supervised loss has
    none."""
    if not enabled:
        return None
    if class_weights is None:
        raise ValueError(f"{method} unsup_class_weights needs the supervised loss's class "
                         "weights (set supervised_loss.class_weights, e.g. "
                         "'median_frequency')")
    return class_weights


def adaptive_thresholds(class_confidence, base_threshold: float) -> tf.Tensor:
    """Per-class thresholds [C]: base * conf_c / max_c conf_c."""
    confidence = tf.cast(class_confidence, tf.float32)
    return base_threshold * confidence / tf.maximum(tf.reduce_max(confidence), _EPSILON)


class DistributionAlignment(keras.layers.Layer):
    """ReMixMatch's distribution alignment of segmentation probabilities.

    Keeps a running average of the teacher's mean class distribution over the global
    batch's counted pixels (starting at the prior); `align` first folds the batch into
    it, then returns probs * prior / running, renormalised over classes.

    Args:
      prior: [C] the labelled masks' class distribution (the target).
      decay: weight of the old running average per batch.
    """

    def __init__(self, prior: Sequence[float], decay: float = 0.99, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(trainable=False, **kwargs)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"distribution alignment decay must be in [0, 1), got {decay}")
        prior = np.asarray(prior, np.float32)
        if prior.ndim != 1 or (prior < 0).any() or prior.sum() <= 0:
            raise ValueError(f"the class prior must be non-negative with a positive sum, "
                             f"got {prior.tolist()}")
        prior = prior / prior.sum()
        self.decay = float(decay)
        common = dict(shape=prior.shape, trainable=False, dtype="float32", autocast=False)
        self.prior = self.add_weight(name="prior",
                                     initializer=keras.initializers.Constant(prior), **common)
        self.running = self.add_weight(name="running",
                                       initializer=keras.initializers.Constant(prior),
                                       **common)
        self.built = True

    def align(self, probs, valid=None) -> tf.Tensor:
        """Aligned probabilities [B, H, W, C]; folds the batch into the running
        distribution first (and stores it)."""
        return self.rescale(probs, self.updated(probs, valid))

    def updated(self, probs, valid=None) -> tf.Tensor:
        """The new running distribution [C] after the batch `probs` [B, H, W, C] (pixels
        where `valid` [B, H, W] is false are left out); also stored. A method that aligns
        several tensors by one batch's statistics folds that batch in here, then
        `rescale`s each tensor with the value returned."""
        probs = tf.cast(probs, tf.float32)
        keep = (tf.ones(tf.shape(probs)[:-1]) if valid is None
                else tf.cast(valid, tf.float32))[..., None]
        batch_sum = losses.replica_sum(tf.reduce_sum(probs * keep, axis=[0, 1, 2]))
        count = losses.replica_sum(tf.reduce_sum(keep))
        old = tf.convert_to_tensor(self.running)
        running = tf.where(count > 0, self.decay * old + (1.0 - self.decay) * batch_sum
                           / tf.maximum(count, 1.0), old)
        replicated_state.assign_identical([self.running], [running])
        return running

    def rescale(self, probs, running=None) -> tf.Tensor:
        """probs * prior / running, renormalised; `running` defaults to the stored one
        (nothing is updated: the pseudo-label monitor's view)."""
        running = tf.convert_to_tensor(self.running) if running is None else running
        ratio = tf.convert_to_tensor(self.prior) / tf.maximum(running, _EPSILON)
        aligned = tf.cast(probs, tf.float32) * ratio
        return aligned / tf.maximum(tf.reduce_sum(aligned, -1, keepdims=True), _EPSILON)


def pixel_thresholds(pseudo_labels, class_confidence, base_threshold: float):
    """The threshold each pixel's confidence is held to: `base_threshold` when
    `class_confidence` is None (fixed thresholds), else the class-adaptive threshold of
    the pixel's pseudo-label ([B, H, W])."""
    if class_confidence is None:
        return base_threshold
    return tf.gather(adaptive_thresholds(class_confidence, base_threshold), pseudo_labels)


def class_aware_scores(uniform, class_weights) -> tf.Tensor:
    """Scores [B, C] in [0, 1) whose smallest k among an image's classes are a weighted
    draw without replacement, class c with weight w_c (Efraimidis and Spirakis: the k
    largest v^(1/w) of uniform v are such a draw; with v = 1 - u, the score
    1 - v^(1/w) turns it into "smallest", the order `mixing.class_mix_masks` takes).
    Weights of 1 give back `uniform` itself, so the draw is the unweighted one.

    Args:
      uniform: [B, C] i.i.d. uniform in [0, 1).
      class_weights: [C] positive weights.
    """
    weights = tf.maximum(tf.cast(class_weights, tf.float32), _EPSILON)
    v = 1.0 - tf.cast(uniform, tf.float32)  # in (0, 1]
    return 1.0 - tf.pow(v, 1.0 / weights[None, :])


def draw_present_class(labels, num_classes: int, uniform, class_weights) -> tf.Tensor:
    """One class per image, drawn among the classes present in its label map, class c with
    probability w_c / (sum of w over the image's present classes).

    The one-class case of `class_aware_scores`' weighted draw, restricted to the present
    classes: the present class with the smallest score.

    Args:
      labels: int [B, H, W]; values outside [0, num_classes) (e.g. padding) count for no
        class.
      uniform: [B, C] i.i.d. uniform in [0, 1) (e.g. `seeds.per_example_uniform`).
      class_weights: [C] positive weights (e.g. `mixing_weights`).
    Returns:
      int32 [B]: the drawn class, or -1 for an image with no class present.
    """
    present = mixing.present_classes(labels, num_classes)
    # Scores are < 1, so an absent class (key 2) never has the smallest key of an image
    # that holds any class.
    keys = tf.where(present, class_aware_scores(uniform, class_weights), 2.0)
    drawn = tf.argmin(keys, axis=1, output_type=tf.int32)
    return tf.where(tf.reduce_any(present, axis=1), drawn, -1)


def mixing_weights(class_confidence) -> tf.Tensor:
    """Class weights of class-aware mixing: 1 - confidence (plus a floor), so the classes
    the teacher is least sure of are pasted most often. A class the teacher has not yet
    assigned to any pixel keeps the starting confidence 1 and the floor weight; the draws
    are among the classes a label map holds, so such a class is rarely a candidate, and
    its confidence follows the teacher's from the first batch that predicts it (at the
    control decay's pace)."""
    return 1.0 - tf.cast(class_confidence, tf.float32) + 0.05


# -- reliable images (ST++) ------------------------------------------------------------
def mean_iou_between(a: np.ndarray, b: np.ndarray, num_classes: int,
                     ignore_label: int = 255) -> float:
    """Mean IoU of two label maps, over the classes present in either (ST++'s measure)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    keep = (a != ignore_label) & (b != ignore_label)
    a, b = a[keep], b[keep]
    ious = []
    for c in range(num_classes):
        union = np.sum((a == c) | (b == c))
        if union:
            ious.append(np.sum((a == c) & (b == c)) / union)
    return float(np.mean(ious)) if ious else 1.0


def stability_scores(final, earlier: Sequence, num_classes: int) -> np.ndarray:
    """Per image, the mean over earlier checkpoints of the mean IoU between that
    checkpoint's prediction and the final one's (ST++'s reliability score).

    Args:
      final: [N, H, W] the final checkpoint's predictions.
      earlier: K arrays [N, H, W], earlier checkpoints' predictions.
    """
    final = np.asarray(final)
    scores = np.zeros(len(final))
    for other in earlier:
        other = np.asarray(other)
        scores += [mean_iou_between(f, o, num_classes) for f, o in zip(final, other)]
    return scores / max(len(earlier), 1)


def reliable_order(ids: Sequence[str], scores: Sequence[float]) -> list:
    """`ids` from most to least reliable (ties kept in the given order)."""
    order = sorted(range(len(ids)), key=lambda k: -scores[k])
    return [ids[k] for k in order]


def select_reliable(ids: Sequence[str], scores: Sequence[float], share: float) -> tuple:
    """(kept, dropped): the first floor(share * N) of `ids` in `reliable_order`, then the
    rest (ST++ keeps the first N // 2 for a share of one half)."""
    order = reliable_order(ids, scores)
    count = int(np.floor(share * len(order) + 1e-9))  # 0.29 * 100 is 28.999...
    return order[:count], order[count:]
