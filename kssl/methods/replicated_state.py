"""Writing method state (statistics, running averages) identically on every replica.

A method's non-trained state, such as class statistics or a running class distribution, is
computed inside the replica step from all-reduced batch sums, so every replica holds the
same new value. Storing it needs a cross-replica write: each device's copy is assigned
from its own replica's value, like an optimizer update, so no replica's value is taken on
trust and the copies stay equal (the tests check it on two logical CPUs).
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf


def assign_identical(variables: Sequence[tf.Variable], values: Sequence[tf.Tensor]) -> None:
    """Assigns `values` (computed identically on every replica) to `variables`, from the
    replica context of a train step or from the cross-replica context."""
    variables, values = tuple(variables), tuple(values)

    def assign_all(strategy, new_values):
        for variable, value in zip(variables, new_values):
            strategy.extended.update(variable.value, lambda v, x: v.assign(x),
                                     args=(value,), group=False)

    context = tf.distribute.get_replica_context()
    if context is None:  # already in the cross-replica context
        assign_all(tf.distribute.get_strategy(), values)
    else:
        context.merge_call(assign_all, args=(values,))
