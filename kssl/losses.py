"""Segmentation losses that stay correct when gradients are summed over replicas.

Under `tf.distribute`, each replica computes its loss on its share of the global batch
and the optimizer sums the replicas' gradients. A per-pixel mean is therefore taken as
(sum over this replica's pixels) / (number of counted pixels in the *global* batch): the
denominator is all-reduced, so the summed gradient equals the single-device gradient even
when replicas hold different numbers of ignored pixels. Outside a strategy the all-reduce
is the identity and these are plain means.
"""

from __future__ import annotations

import tensorflow as tf

from kssl.constants import IGNORE_LABEL


def replica_sum(value: tf.Tensor) -> tf.Tensor:
    """Sums `value` over the replicas in sync (identity outside a strategy)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def global_mean(total: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """This replica's share of the global mean: local total / global count (0 when
    nothing counts). `count` may be a sum of weights below 1 (a class-weighted mean)."""
    count = replica_sum(tf.cast(count, tf.float32))
    return tf.cast(total, tf.float32) / tf.where(count > 0.0, count, 1.0)


def pixel_cross_entropy(logits: tf.Tensor, labels: tf.Tensor,
                        ignore_label: int = IGNORE_LABEL) -> tuple:
    """Per-pixel cross-entropy and the validity mask.

    Args:
      logits: [B, H, W, C] (cast to float32).
      labels: [B, H, W] integer class ids, `ignore_label` where not counted.
    Returns:
      (loss [B, H, W] with 0 at ignored pixels, valid [B, H, W] float32 of 0/1).
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_label)
    safe_labels = tf.where(valid, labels, tf.zeros_like(labels))
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=logits)
    valid = tf.cast(valid, tf.float32)
    return loss * valid, valid


def masked_cross_entropy(logits: tf.Tensor, labels: tf.Tensor,
                         ignore_label: int = IGNORE_LABEL,
                         pixel_weights: tf.Tensor | None = None,
                         class_weights: tf.Tensor | None = None) -> tf.Tensor:
    """Mean cross-entropy over the non-ignored pixels of the global batch.

    Args:
      logits: [B, H, W, C].
      labels: [B, H, W] class ids with `ignore_label` for pixels that do not count.
      pixel_weights: optional [B, H, W] weights multiplying each pixel's loss (the mean
        still divides by the number of non-ignored pixels, as confidence-weighted
        pseudo-label losses do).
      class_weights: optional [C]: each pixel's loss is multiplied by the weight of its
        label, and the mean divides by the global sum of those weights rather than the
        pixel count (the weighted mean of PyTorch's `CrossEntropyLoss(weight=...)`, so the
        loss keeps its scale whatever the weights' average).
    Returns:
      A scalar: this replica's share of the global mean (see the module docstring).
    """
    total, count = weighted_cross_entropy_sums(logits, labels, ignore_label, pixel_weights,
                                               class_weights)
    return global_mean(total, count)


def weighted_cross_entropy_sums(logits: tf.Tensor, labels: tf.Tensor,
                                ignore_label: int = IGNORE_LABEL,
                                pixel_weights: tf.Tensor | None = None,
                                class_weights: tf.Tensor | None = None) -> tuple:
    """(numerator, denominator) of `masked_cross_entropy` on this replica: the sum of the
    [pixel- and class-] weighted losses, and the count of non-ignored pixels or, with
    `class_weights`, the sum of their labels' weights. A loss over several tensors adds
    the sums of each before one `global_mean`."""
    loss, valid = pixel_cross_entropy(logits, labels, ignore_label)
    if pixel_weights is not None:
        loss = loss * tf.cast(pixel_weights, tf.float32)
    if class_weights is None:
        return tf.reduce_sum(loss), tf.reduce_sum(valid)
    safe_labels = tf.where(valid > 0, tf.cast(labels, tf.int32), tf.zeros_like(labels, tf.int32))
    weights = tf.gather(tf.cast(class_weights, tf.float32), safe_labels) * valid
    return tf.reduce_sum(loss * weights), tf.reduce_sum(weights)


def replica_concat(value: tf.Tensor) -> tf.Tensor:
    """`value` of every replica in sync, concatenated along axis 0 in replica order
    (identity outside a strategy)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_gather(value, axis=0)


def ohem_cross_entropy(logits: tf.Tensor, labels: tf.Tensor, threshold: float = 0.7,
                       min_kept=100000, ignore_label: int = IGNORE_LABEL,
                       class_weights: tf.Tensor | None = None) -> tf.Tensor:
    """Cross-entropy over the hard pixels only (online hard example mining), as the
    UniMatch code's `ProbOhemCrossEntropy2d`, but mined over the global batch.

    A labelled pixel is hard when the softmax probability of its label is <= the
    threshold: `threshold`, or the `min_kept`-th smallest label probability when that is
    larger (ignored pixels count as probability 1 in that ranking, as in the code). When
    fewer than `min_kept` pixels are labelled nothing is mined and every labelled pixel
    counts. The loss is the mean over the kept pixels (class-weighted as
    `masked_cross_entropy`). The code mines per GPU; here the ranking runs over the
    pixels of every replica (one all-gather of a float per pixel), so any replica count
    keeps the same pixels as one device.

    Args:
      logits: [B, H, W, C]; labels: [B, H, W] with `ignore_label` where not counted.
      min_kept: pixels kept at least, over the global batch (int or int tensor).
    Returns:
      A scalar: this replica's share of the global mean.
    """
    probs = tf.nn.softmax(tf.stop_gradient(tf.cast(logits, tf.float32)))
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_label)
    safe = tf.where(valid, labels, 0)
    label_probs = tf.where(valid, tf.gather(probs, safe, batch_dims=3), 1.0)
    everyone = tf.sort(tf.reshape(replica_concat(label_probs), [-1]))
    min_kept = tf.cast(min_kept, tf.int32)
    labelled = tf.cast(replica_sum(tf.reduce_sum(tf.cast(valid, tf.float32))), tf.int32)
    kth = everyone[tf.clip_by_value(min_kept, 1, tf.size(everyone)) - 1]
    cut = tf.maximum(tf.cast(threshold, tf.float32), tf.where(min_kept > 0, kth, 0.0))
    mine = (min_kept <= labelled) & (labelled > 0)
    kept = valid & (tf.logical_not(mine) | (label_probs <= cut))
    return masked_cross_entropy(logits, tf.where(kept, labels, ignore_label), ignore_label,
                                class_weights=class_weights)


PSEUDO_LABEL_WEIGHTINGS = ("batch", "image", "pixel", "none")


def confidence_weights(confidence: tf.Tensor, threshold: float,
                       weighting: str = "batch") -> tf.Tensor:
    """Per-pixel weights [B, H, W] of a pseudo-label loss from the target's confidence.

    Args:
      confidence: [B, H, W] probability of each pixel's pseudo-label.
      threshold: a pixel is confident when its confidence exceeds this: one number, or
        a per-pixel tensor [B, H, W] (class-adaptive thresholds of each pixel's label).
      weighting: "batch": every pixel weighs the share of confident pixels in the
        *global* batch (the ClassMix code; the count is all-reduced, so one value on every
        replica); "image": the share within each pixel's own image (the ClassMix paper's
        "for an augmented sample"); "pixel": 1 for confident pixels, 0 otherwise; "none": 1.
    Returns:
      float32 [B, H, W], without gradient.
    """
    confidence = tf.stop_gradient(tf.cast(confidence, tf.float32))
    # Strictly above, as the ClassMix paper words it ("above a predetermined threshold");
    # the released code uses >=, which differs only on exact ties.
    confident = tf.cast(confidence > threshold, tf.float32)
    if weighting == "batch":
        share = (replica_sum(tf.reduce_sum(confident))
                 / tf.maximum(replica_sum(tf.cast(tf.size(confident), tf.float32)), 1.0))
        return tf.ones_like(confident) * share
    if weighting == "image":
        return tf.ones_like(confident) * tf.reduce_mean(confident, axis=[1, 2], keepdims=True)
    if weighting == "pixel":
        return confident
    if weighting == "none":
        return tf.ones_like(confident)
    raise ValueError(f"weighting must be one of {PSEUDO_LABEL_WEIGHTINGS}, got {weighting!r}")


def confidence_weighted_cross_entropy(logits: tf.Tensor, pseudo_labels: tf.Tensor,
                                      confidence: tf.Tensor, threshold: float = 0.968,
                                      weighting: str = "batch",
                                      ignore_label: int = IGNORE_LABEL,
                                      class_weights: tf.Tensor | None = None) -> tf.Tensor:
    """Cross-entropy against hard pseudo-labels, weighted by the target's confidence.

    The weighted per-pixel loss is averaged over every (non-ignored) pixel of the global
    batch, confident or not, as the ClassMix code does (so with "pixel" weighting the
    unconfident pixels dilute the mean rather than being dropped from it).

    Args:
      logits: [B, H, W, C] student logits.
      pseudo_labels: [B, H, W] class ids (e.g. the argmax of mixed teacher probabilities).
      confidence: [B, H, W] the target probability of each pseudo-label.
      threshold, weighting: see `confidence_weights`.
      class_weights: optional [C]: each pixel also weighs the weight of its pseudo-label's
        class, and the mean divides by the global sum of those class weights (the
        supervised loss's weighted mean, see `masked_cross_entropy`).
    Returns:
      A scalar: this replica's share of the global mean (see the module docstring).
    """
    weights = confidence_weights(confidence, threshold, weighting)
    return masked_cross_entropy(logits, pseudo_labels, ignore_label, pixel_weights=weights,
                                class_weights=class_weights)


def squared_error(predictions: tf.Tensor, targets: tf.Tensor,
                  counted: tf.Tensor | None = None) -> tf.Tensor:
    """Mean over the pixels of the global batch of the squared vector difference
    sum_c (predictions - targets)^2 (GuidedMix-Net's Eq. 10 and 12).

    Args:
      predictions, targets: [B, H, W, C] (e.g. softmax probabilities), cast to float32.
      counted: optional [B] of 0/1: only these examples' pixels enter the sum and the
        count (0 when no example counts).
    Returns:
      A scalar: this replica's share of the global mean.
    """
    difference = tf.cast(predictions, tf.float32) - tf.cast(targets, tf.float32)
    per_pixel = tf.reduce_sum(tf.square(difference), axis=-1)
    if counted is None:
        return global_mean(tf.reduce_sum(per_pixel), tf.size(per_pixel))
    counted = tf.cast(counted, tf.float32)
    pixels = tf.cast(tf.reduce_prod(tf.shape(per_pixel)[1:]), tf.float32)
    return global_mean(tf.reduce_sum(per_pixel * counted[:, None, None]),
                       tf.reduce_sum(counted) * pixels)


def sigmoid_focal_loss(logits: tf.Tensor, labels: tf.Tensor, gamma: float = 0.5,
                       alpha: float = 0.5) -> tf.Tensor:
    """One-vs-all sigmoid focal loss against class ids, averaged over pixels x classes.

    With p = sigmoid(logit) per pixel and class: -alpha (1 - p)^gamma log p for the
    labelled class, -(1 - alpha) p^gamma log(1 - p) for every other class (mmcv's
    `sigmoid_focal_loss`, which GuidedMix-Net's released code uses). No ignore label: the
    targets are argmaxes.

    Args:
      logits: [B, H, W, C]; labels: [B, H, W] class ids.
    Returns:
      A scalar: this replica's share of the global mean over B * H * W * C elements.
    """
    logits = tf.cast(logits, tf.float32)
    positive = tf.one_hot(tf.cast(labels, tf.int32), tf.shape(logits)[-1]) > 0.5
    # p and 1 - p each from its own sigmoid (no cancellation), floored so that the power's
    # gradient stays finite where a probability underflows to 0.
    p = tf.maximum(tf.sigmoid(logits), 1e-30)
    q = tf.maximum(tf.sigmoid(-logits), 1e-30)
    loss = tf.where(positive,
                    -alpha * tf.pow(q, gamma) * tf.math.log_sigmoid(logits),
                    -(1.0 - alpha) * tf.pow(p, gamma) * tf.math.log_sigmoid(-logits))
    return global_mean(tf.reduce_sum(loss), tf.size(loss))


def multilabel_cross_entropy(logits: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    """Binary cross-entropy of independent per-class logits [B, C] against 0/1 targets
    [B, C], averaged over the B * C entries of the global batch."""
    loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(targets, tf.float32),
                                                   logits=tf.cast(logits, tf.float32))
    return global_mean(tf.reduce_sum(loss), tf.size(loss))
