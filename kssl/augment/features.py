"""Perturbations of feature maps inside the train step, as batched tensor ops."""

from __future__ import annotations

import tensorflow as tf

from kssl.augment import seeds


def channel_dropout(features: tf.Tensor, rate: float, seed) -> tf.Tensor:
    """Dropout of whole channels, per example (PyTorch's `Dropout2d`, Keras's
    `SpatialDropout2D` in channels-last), drawn statelessly by global example index.

    Each channel of each example is zeroed with probability `rate`; the others are
    multiplied by 1 / (1 - rate), so the expected value is unchanged.

    Args:
      features: [B, H, W, C] (any float dtype).
      rate: the probability of dropping a channel, in [0, 1].
      seed: a stateless seed pair (see `seeds.step_seed`); example g of the global batch
        draws the same channels whatever the number of replicas.
    Returns:
      A tensor like `features`.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"channel dropout rate must be in [0, 1], got {rate!r}")
    if rate == 0.0:
        return features
    if rate == 1.0:
        return tf.zeros_like(features)
    draws = seeds.per_example_uniform(seed, tf.shape(features)[0], (features.shape[-1],))
    scale = tf.where(draws >= rate, 1.0 / (1.0 - rate), 0.0)  # kept with probability 1 - rate
    return features * tf.cast(scale, features.dtype)[:, None, None, :]
