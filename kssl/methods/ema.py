"""Exponential-moving-average (mean) teachers.

`EMATeacher` keeps a copy of a student network whose weights follow
`teacher <- decay * teacher + (1 - decay) * student`, with the warm-up
`decay = min(1 - 1 / (step + 1), max_decay)` of the ClassMix and MKD code (step 0 copies
the student; the decay reaches max_decay after 1 / (1 - max_decay) - 1 steps).

Under `tf.distribute` the update is made like an optimizer update: from the replica context
of a train step it enters the cross-replica context (`merge_call`) and updates each
device's copy of every teacher variable from that device's copy of the student variable.
Weight copies are identical (the optimizer has just applied the same summed gradients on
every replica). Batch-norm moving statistics are identical with synchronised batch norm;
with plain batch norm they differ per replica, so the teacher takes their mean. Either way
the teacher stays identical on every replica (and, with synchronised batch norm, equal to
a single-device run).
"""

from __future__ import annotations

from typing import Callable, Optional

import keras
import tensorflow as tf

from kssl.models.segmenter import Block, Segmenter


def ema_decay(step, max_decay: float = 0.99, warmup: bool = True) -> tf.Tensor:
    """The decay after optimizer step `step` (0-based): min(1 - 1/(step+1), max_decay).

    Without warm-up, max_decay from the first step on.
    """
    max_decay = tf.constant(max_decay, tf.float32)
    if not warmup:
        return max_decay
    step = tf.cast(step, tf.float32)
    return tf.minimum(1.0 - 1.0 / (step + 1.0), max_decay)


def stepwise_decay(step, boundaries, values) -> tf.Tensor:
    """A piecewise-constant decay: values[i] for boundaries[i-1] <= step < boundaries[i].

    The three-stage code's schedule by 1000-step epoch is boundaries (20000, 40000, 50000)
    and values (0.99, 0.995, 0.9975, 0.999).
    """
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"a stepwise decay needs one more value than boundaries, got "
                         f"{len(values)} values and {len(boundaries)} boundaries")
    if list(boundaries) != sorted(boundaries):
        raise ValueError(f"decay boundaries must increase, got {list(boundaries)}")
    index = tf.searchsorted(tf.constant(boundaries, tf.int64),
                            tf.reshape(tf.cast(step, tf.int64), [1]), side="right")[0]
    return tf.gather(tf.constant(values, tf.float32), index)


def _clone_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    return layer.__class__.from_config(layer.get_config())


def clone_network(network: keras.Model, name: Optional[str] = None) -> keras.Model:
    """A new network with `network`'s architecture and its own, fresh variables.

    A kssl `Segmenter` is rebuilt from the configs of its preprocessing, blocks and head
    (it takes layers as constructor arguments, so `keras.models.clone_model` cannot
    serialise it); any other model goes through `keras.models.clone_model`
    (functional, sequential, or a subclassed model with `get_config`). The copy is not
    guaranteed to be built, and its weights are not copied: see `EMATeacher`.
    `name` names the copy (default: the original's name + "_ema").
    """
    if isinstance(network, Segmenter):
        blocks = [Block(spec.name, _clone_layer(spec.layer), spec.stride, spec.channels)
                  for spec in network.block_specs]
        return Segmenter(_clone_layer(network.preprocess), blocks,
                         _clone_layer(network.head), align_corners=network.align_corners,
                         name=name or f"{network.name}_ema")
    copy = keras.models.clone_model(network)
    if name:
        copy.name = name
    return copy


def _tf_variable(variable):
    """The tf.Variable (a MirroredVariable under a strategy) behind a Keras variable."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def _is_float(variable) -> bool:
    return tf.as_dtype(variable.dtype).is_floating


class EMATeacher:
    """A teacher network that is an exponential moving average of a student.

    Args:
      student: the trained network (built, or buildable on a [1, 32, 32, 3] batch).
      teacher: the network to hold the average; default a `clone_network(student)`.
        Its weights are set to the student's here.
      max_decay: the decay once warmed up (0.99 for ClassMix).
      warmup: use min(1 - 1/(step+1), max_decay) (the released code) rather than
        max_decay from the start.
      include_statistics: also average the non-trainable float weights, i.e. batch-norm
        moving means and variances (frozen weights are constant, so averaging them is a
        no-op). kssl's ClassMix does this by default (the paper's EMA of the network read
        as an average of all of it), and the teacher then predicts in inference mode with
        its averaged statistics. False averages trainable weights only,
        as the released ClassMix and MKD code (whose teachers run in training mode, on the
        statistics of the batch they see, so their own moving statistics are never used).
      schedule: optional `step -> decay` replacing `ema_decay(step, max_decay, warmup)`.
    Create it in the strategy scope the student was created in. The caller keeps
    `teacher` as an attribute of its model, so the teacher is saved and restored with it.
    """

    def __init__(self, student: keras.Model, teacher: Optional[keras.Model] = None,
                 max_decay: float = 0.99, warmup: bool = True,
                 include_statistics: bool = True,
                 schedule: Optional[Callable] = None, dummy_size=(32, 32)):
        self.student = student
        self.teacher = teacher if teacher is not None else clone_network(student)
        self.max_decay = max_decay
        self.warmup = warmup
        self.include_statistics = include_statistics
        self.schedule = schedule
        dummy = tf.zeros((1, dummy_size[0], dummy_size[1], 3), tf.float32)
        for network in (self.student, self.teacher):
            if not network.built or not network.weights:
                network(dummy, training=False)
        if len(self.student.weights) != len(self.teacher.weights) or any(
                tuple(s.shape) != tuple(t.shape)
                for s, t in zip(self.student.weights, self.teacher.weights)):
            raise ValueError("the teacher's weights do not match the student's: build the "
                             "teacher with the student's architecture")
        for s, t in zip(self.student.weights, self.teacher.weights):
            t.assign(s)
        self.pairs = [(s, t) for s, t in zip(self.student.weights, self.teacher.weights)
                      if _is_float(s) and (s.trainable or include_statistics)]

    def __call__(self, images, training=False):
        """The teacher's prediction (no gradient is meant to flow: wrap in stop_gradient)."""
        return self.teacher(images, training=training)

    def decay(self, step) -> tf.Tensor:
        """The decay of the update made at 0-based optimizer step `step` (see `update`)."""
        if self.schedule is not None:
            return tf.cast(self.schedule(step), tf.float32)
        return ema_decay(step, self.max_decay, self.warmup)

    def update(self, step) -> None:
        """teacher <- decay * teacher + (1 - decay) * student, with the decay of `step`.

        Call in a train step (replica context) or eagerly: after the optimizer step with
        its 0-based index (mean teachers), or before it with the index of the step about
        to run (MKD, whose released code averages before the forward pass; the decay
        schedule then reads the step counter the way that code counts).
        """
        decay = self.decay(step)

        def assign(teacher_var, student_var, decay):
            decay = tf.cast(decay, teacher_var.dtype)
            return teacher_var.assign(decay * teacher_var + (1.0 - decay) * student_var)

        def update_all(strategy, decay):
            for student_var, teacher_var in self.pairs:
                # Each device's teacher copy from the same device's student copy, ...
                source = _tf_variable(student_var)
                if not student_var.trainable:
                    # ... except statistics: unsynchronised batch norm leaves each
                    # replica's moving statistics different, and their mean keeps the
                    # teacher identical on every replica.
                    copies = strategy.experimental_local_results(source)
                    if len(copies) > 1:
                        source = tf.add_n([tf.convert_to_tensor(c) for c in copies]) / len(
                            copies)
                strategy.extended.update(_tf_variable(teacher_var), assign,
                                         args=(source, decay), group=False)

        context = tf.distribute.get_replica_context()
        if context is None:  # already in the cross-replica context
            update_all(tf.distribute.get_strategy(), decay)
        else:
            context.merge_call(update_all, args=(decay,))
