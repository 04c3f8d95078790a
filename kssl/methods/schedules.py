"""Weight schedules of unsupervised losses, as functions of the optimizer step."""

from __future__ import annotations

import tensorflow as tf


def sigmoid_rampup(step, steps: int) -> tf.Tensor:
    """exp(-5 (1 - t)^2) with t = min(step / steps, 1): Laine and Aila's ramp-up from
    about 0.007 to 1 over `steps` optimizer steps (1 from the start when steps is 0)."""
    if steps <= 0:
        return tf.constant(1.0)
    t = tf.clip_by_value(tf.cast(step, tf.float32) / float(steps), 0.0, 1.0)
    return tf.exp(-5.0 * tf.square(1.0 - t))
