"""Feature augmentation (MKD's Eq. 3, after ISDA): class-conditional logit offsets.

ISDA bounds the cross-entropy over infinitely many features drawn around each feature f of
class y, N(f, lambda * Sigma_y), by the cross-entropy of augmented logits:

  z_c  ->  z_c + lambda/2 * (w_c - w_y)^T Sigma_y (w_c - w_y)

(w: the classifier weights; Sigma_y: the features' covariance in class y). MKD applies it
per pixel to its networks' logits, with the ground-truth class on labelled pixels and the
network's own argmax on unlabelled ones. Here, as in MKD's released code:

- Sigma_y is diagonal: `ClassStatistics` keeps a running per-class mean and variance of
  the features the classifier reads, pooled over every pixel seen (all-reduced over the
  replicas, so every replica keeps what a single device would; the code keeps per-GPU
  estimates);
- `logit_offsets` turns the variances into the C x C table of offsets for the classifier's
  weights (several taps for a DeepLabV2 head), and `augment_logits` adds row y to each
  pixel of class y (ignore pixels get nothing);
- `augmented_logits` runs the two for a network's consistency parts in order, each part's
  pixels pooled into the statistics just before it is augmented;
- lambda ramps up over training (`feature_augmentation_strength`).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from kssl import losses
from kssl.methods import replicated_state


def feature_augmentation_strength(step, lambda_max: float, steps: int,
                                  schedule: str = "cosine") -> tf.Tensor:
    """lambda at 0-based optimizer step `step`, with t = step + 1 (the MKD code's counter)
    capped at `steps`: "cosine" lambda_max * (1 - cos(pi t / steps)) / 2 (the MKD code),
    "linear" lambda_max * t / steps (ISDA's ramp)."""
    t = tf.minimum(tf.cast(step, tf.float32) + 1.0, float(steps))
    if schedule == "cosine":
        return lambda_max * (1.0 - tf.cos(math.pi * t / steps)) / 2.0
    if schedule == "linear":
        return lambda_max * t / steps
    raise ValueError(f"lambda schedule must be 'cosine' or 'linear', got {schedule!r}")


def logit_offsets(weights, variances, strength) -> tf.Tensor:
    """The C x C table D[y, c] = strength / 2 * sum_t,a (W[t,a,c] - W[t,a,y])^2 var[y,a].

    Args:
      weights: [T, A, C] the classifier as per-position linear maps (T = 1 for a 1x1
        classifier; see `Segmenter.classifier_weights`).
      variances: [C, A] per-class diagonal feature variances.
      strength: lambda.
    Row y is what a pixel of class y adds to its logits: 0 for c = y, >= 0 elsewhere.
    Computed as sums of matrix products, without the [C, C, T * A] difference tensor.
    """
    weights = tf.cast(weights, tf.float32)
    variances = tf.cast(variances, tf.float32)
    classes = tf.shape(weights)[-1]
    flat = tf.reshape(weights, [-1, classes])  # [T * A, C]
    taps = tf.shape(weights)[0]
    spread = tf.tile(variances, [1, taps])  # [C, T * A]: var[y, a] for every tap t
    squares = tf.matmul(spread, tf.square(flat))  # [y, c]: sum var_y W_c^2
    cross = tf.matmul(spread * tf.transpose(flat), flat)  # [y, c]: sum var_y W_y W_c
    own = tf.linalg.diag_part(squares)  # [y]: sum var_y W_y^2
    table = tf.maximum(squares - 2.0 * cross + own[:, None], 0.0)  # >= 0 up to rounding
    table = tf.linalg.set_diag(table, tf.zeros([classes]))
    return 0.5 * tf.cast(strength, tf.float32) * table


def augment_logits(logits, labels, offsets, ignore_label: int) -> tf.Tensor:
    """logits [B, h, w, C] + offsets[label] per pixel; ignore pixels are left as they are.
    The gradient reaches `offsets` unless the caller stops it."""
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_label)
    added = tf.gather(offsets, tf.where(valid, labels, 0))
    return logits + tf.where(valid[..., None], added, 0.0)


class ClassStatistics(keras.layers.Layer):
    """A running per-class mean and diagonal variance of features, over every pixel seen.

    Weights (non-trainable, so they are checkpointed with the method): count [C], mean
    [C, A], variance [C, A] (biased, i.e. the population variance), all starting at 0.
    `merge` pools the stored moments with a batch's: with n_c batch pixels of class c
    (mean m_b, variance v_b) and N_c seen before, w = n_c / (n_c + N_c) and
      var <- (1 - w) var + w v_b + w (1 - w) (mean - m_b)^2,  mean <- (1 - w) mean + w m_b,
    the exact moments of all pixels so far (no forgetting), as the MKD code's estimator.
    Under `tf.distribute` the batch's per-class counts and sums are all-reduced, so the
    moments are those of the global batch and every replica stores the same values (the
    MKD code keeps per-GPU estimates that drift apart).
    """

    def __init__(self, num_classes: int, channels: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(trainable=False, **kwargs)
        self.num_classes = int(num_classes)
        self.channels = int(channels)
        common = dict(initializer="zeros", trainable=False, dtype="float32", autocast=False)
        self.count = self.add_weight(shape=(self.num_classes,), name="count", **common)
        self.mean = self.add_weight(shape=(self.num_classes, self.channels), name="mean",
                                    **common)
        self.variance = self.add_weight(shape=(self.num_classes, self.channels),
                                        name="variance", **common)
        self.built = True

    def read(self) -> tuple:
        """The stored (count, mean, variance) as tensors."""
        return (tf.convert_to_tensor(self.count), tf.convert_to_tensor(self.mean),
                tf.convert_to_tensor(self.variance))

    def batch_moments(self, features, labels) -> tuple:
        """(count [C], mean [C, A], variance [C, A]) of the global batch's pixels per class.

        features: [B, h, w, A]; labels: [B, h, w] class ids, anything outside [0, C)
        (the ignore label) left out.
        """
        features = tf.reshape(tf.cast(features, tf.float32), [-1, self.channels])
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        classes = self.num_classes
        # Pixels of no class go to an extra segment that is dropped.
        segments = tf.where((labels >= 0) & (labels < classes), labels, classes)

        def per_class_sum(values):
            return tf.math.unsorted_segment_sum(values, segments, classes + 1)[:classes]

        # Sums over the global batch (the MKD code keeps per-GPU statistics, which
        # drift apart; here every replica pools the same pixels a single device would).
        count = losses.replica_sum(per_class_sum(tf.ones_like(features[:, 0])))
        mean = losses.replica_sum(per_class_sum(features)) / tf.maximum(count, 1.0)[:, None]
        # Second pass about the global mean: stable where the variance is small.
        deviation = features - tf.gather(tf.concat([mean, tf.zeros([1, self.channels])], 0),
                                         segments)
        variance = (losses.replica_sum(per_class_sum(tf.square(deviation)))
                    / tf.maximum(count, 1.0)[:, None])
        return count, mean, variance

    def merge(self, state: tuple, features, labels) -> tuple:
        """`state` (count, mean, variance) pooled with the global batch's moments."""
        count, mean, variance = state
        batch_count, batch_mean, batch_variance = self.batch_moments(
            tf.stop_gradient(features), labels)
        # A batch with inf/NaN features (a mixed-precision step the optimizer skips) is
        # left out: the moments pool every pixel ever seen, so it would spoil them for good.
        finite = tf.reduce_all(tf.math.is_finite(batch_mean)) & tf.reduce_all(
            tf.math.is_finite(batch_variance))
        batch_count = tf.where(finite, batch_count, 0.0)
        batch_mean = tf.where(finite, batch_mean, 0.0)
        batch_variance = tf.where(finite, batch_variance, 0.0)
        total = count + batch_count
        w = tf.math.divide_no_nan(batch_count, total)[:, None]
        variance = ((1.0 - w) * variance + w * batch_variance
                    + w * (1.0 - w) * tf.square(mean - batch_mean))
        mean = (1.0 - w) * mean + w * batch_mean
        return total, mean, variance

    def assign(self, state: tuple) -> None:
        """Stores `state`, computed identically on every replica, on each replica's copy."""
        replicated_state.assign_identical((self.count, self.mean, self.variance), state)

    def update(self, features, labels) -> tuple:
        """Pools one batch into the stored moments; returns the new state."""
        state = self.merge(self.read(), features, labels)
        self.assign(state)
        return state

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "channels": self.channels}


def augmented_logits(statistics: ClassStatistics, weights, parts, strength,
                     ignore_label: int) -> list:
    """Feature-augmented logits for each (features, logits, labels) part, in order.

    Each part's pixels are pooled into `statistics` just before that part is augmented
    (labelled before unlabelled, as the MKD code); the pooled state is stored once,
    at the end. `weights` is the classifier as `logit_offsets` takes it (the caller stops
    its gradient or not)."""
    state, out = statistics.read(), []
    for features, logits, labels in parts:
        state = statistics.merge(state, features, labels)
        offsets = logit_offsets(weights, state[2], strength)
        out.append(augment_logits(logits, labels, offsets, ignore_label))
    statistics.assign(state)
    return out
