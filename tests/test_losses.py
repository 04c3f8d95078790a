"""Masked cross-entropy against a numpy computation, and its replica-correct reduction."""

import numpy as np
import tensorflow as tf

from kssl import losses
from kssl.data.examples import IGNORE_LABEL


def numpy_masked_ce(logits, labels, weights=None):
    """Mean over non-ignored pixels of -log softmax(logits)[label], computed in numpy."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    valid = labels != IGNORE_LABEL
    picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    per_pixel = -picked * valid
    if weights is not None:
        per_pixel = per_pixel * weights
    return per_pixel.sum() / valid.sum()


def test_masked_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (2, 3, 4))
    labels[0, 0, :] = IGNORE_LABEL
    labels[1, 2, 1] = IGNORE_LABEL
    got = losses.masked_cross_entropy(tf.constant(logits), tf.constant(labels)).numpy()
    np.testing.assert_allclose(got, numpy_masked_ce(logits, labels), rtol=1e-5)


def test_pixel_weights_scale_each_pixel_but_not_the_count():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 2, 2, 3)).astype(np.float32)
    labels = np.array([[[0, 1], [2, IGNORE_LABEL]]])
    weights = np.array([[[0.5, 1.0], [0.0, 1.0]]], np.float32)
    got = losses.masked_cross_entropy(tf.constant(logits), tf.constant(labels),
                                      pixel_weights=tf.constant(weights)).numpy()
    np.testing.assert_allclose(got, numpy_masked_ce(logits, labels, weights), rtol=1e-5)


def test_all_ignored_gives_zero_not_nan():
    labels = tf.fill([1, 2, 2], IGNORE_LABEL)
    assert losses.masked_cross_entropy(tf.zeros([1, 2, 2, 3]), labels).numpy() == 0.0


def test_replica_shares_sum_to_the_global_mean(two_replicas):
    """Two replicas with different numbers of ignored pixels: the shares add up to the
    single-device mean (a per-replica mean averaged over replicas would not)."""
    strategy = two_replicas
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 3, 3))
    labels[1, :2] = IGNORE_LABEL  # replica 1 counts 3 pixels, replica 0 counts 9

    def per_replica(ctx):
        k = ctx.replica_id_in_sync_group
        return losses.masked_cross_entropy(tf.gather(logits, [k]), tf.gather(labels, [k]))

    shares = strategy.run(lambda: per_replica(tf.distribute.get_replica_context()))
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, shares, axis=None).numpy()
    np.testing.assert_allclose(total, numpy_masked_ce(logits, labels), rtol=1e-5)


def numpy_class_weighted_ce(logits, labels, class_weights):
    """sum_i w[y_i] CE_i / sum_i w[y_i] over non-ignored pixels, in numpy."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    valid = labels != IGNORE_LABEL
    safe = np.where(valid, labels, 0)
    picked = np.take_along_axis(log_probs, safe[..., None], -1)[..., 0]
    w = np.asarray(class_weights, np.float64)[safe] * valid
    return (-picked * w).sum() / w.sum()


def test_class_weights_give_the_weighted_mean():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 3, 4))
    labels[0, 1, :2] = IGNORE_LABEL
    class_weights = np.array([0.25, 1.0, 4.0], np.float32)
    got = losses.masked_cross_entropy(tf.constant(logits), tf.constant(labels),
                                      class_weights=tf.constant(class_weights)).numpy()
    np.testing.assert_allclose(got, numpy_class_weighted_ce(logits, labels, class_weights),
                               rtol=1e-5)
    # Equal weights are the plain mean, whatever their value.
    plain = losses.masked_cross_entropy(tf.constant(logits), tf.constant(labels)).numpy()
    scaled = losses.masked_cross_entropy(tf.constant(logits), tf.constant(labels),
                                         class_weights=tf.fill([3], 7.0)).numpy()
    np.testing.assert_allclose(scaled, plain, rtol=1e-5)


def test_class_weighted_replica_shares_sum_to_the_global_mean(two_replicas):
    strategy = two_replicas
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 3, 3))
    labels[1, :2] = IGNORE_LABEL
    labels[0, 0] = 3  # replica 0 holds more of the heavy class
    class_weights = np.array([1.0, 0.5, 2.0, 6.0], np.float32)

    def per_replica(ctx):
        k = ctx.replica_id_in_sync_group
        return losses.masked_cross_entropy(tf.gather(logits, [k]), tf.gather(labels, [k]),
                                           class_weights=tf.constant(class_weights))

    shares = strategy.run(lambda: per_replica(tf.distribute.get_replica_context()))
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, shares, axis=None).numpy()
    np.testing.assert_allclose(total, numpy_class_weighted_ce(logits, labels, class_weights),
                               rtol=1e-5)
