"""Reproducible randomness for augmentations inside a compiled, distributed train step.

Every random draw is stateless: keyed on a seed pair (a run seed and the step counter) and
a named stream, so a resumed run and a re-traced function draw the same values. Per-example
draws are made for the whole *global* batch and each replica keeps its own rows, so the
example with global index g gets the same numbers whether the batch runs on one replica or
is split over several (MirroredStrategy splits a global batch into consecutive slices of
equal size, replica r holding rows [r * b, (r + 1) * b)). The cost is drawing R times
as many numbers as a replica needs, which is negligible for per-example parameters.
"""

from __future__ import annotations

import tensorflow as tf


def step_seed(seed, step, stream: int) -> tf.Tensor:
    """A stateless seed pair for one named random stream at one step.

    Args:
      seed: the run's integer seed.
      step: the 0-based optimizer step (int tensor or Python int).
      stream: a small integer naming the use (mask choice, jitter, blur, ...), so different
        uses within one step draw independent numbers.
    Returns:
      An int64 tensor of shape [2] for `tf.random.stateless_*`.
    """
    base = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
    return tf.random.experimental.stateless_fold_in(base, stream)


def replica_position():
    """(replica index, number of replicas in sync); (0, 1) outside a strategy."""
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context: the caller sees the whole batch
        return 0, 1
    return context.replica_id_in_sync_group, context.num_replicas_in_sync


def global_batch_index(batch_size) -> tf.Tensor:
    """Global indices [b] of this replica's examples (assumes equal per-replica batches)."""
    replica, _ = replica_position()
    return tf.cast(replica, tf.int32) * tf.cast(batch_size, tf.int32) + tf.range(batch_size)


def per_example_uniform(seed, batch_size, shape=(), minval=0.0, maxval=1.0,
                        dtype=tf.float32) -> tf.Tensor:
    """Uniform draws [b, *shape] for this replica's examples, keyed by global index.

    The values for global example g do not depend on how the batch is split over replicas.
    `dtype` float64 gives 52-bit draws, for a choice among millions of pixels.
    """
    _, replicas = replica_position()
    values = tf.random.stateless_uniform(
        tf.concat([[tf.cast(batch_size, tf.int32) * replicas], tf.constant(shape, tf.int32)],
                  0), seed, minval=minval, maxval=maxval, dtype=dtype)
    return tf.gather(values, global_batch_index(batch_size))


def batch_uniform(seed, shape=(), minval=0.0, maxval=1.0) -> tf.Tensor:
    """Uniform draws shared by the whole global batch (identical on every replica)."""
    return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval)
