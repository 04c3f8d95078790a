"""The EMA teacher: decay schedule with warm-up, the update formula, cloning a Segmenter."""

import keras
import tensorflow as tf
import numpy as np
import pytest

from kssl import models
from kssl.methods.ema import EMATeacher, clone_network, ema_decay


def tiny_network(seed=0):
    """conv -> batch norm -> 1x1 classifier (trainable weights and moving statistics)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Conv2D(3, 1)(keras.layers.ReLU()(x))
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("step, want", [(0, 0.0), (1, 0.5), (3, 0.75), (98, 0.98990),
                                        (99, 0.99), (5000, 0.99)])
def test_decay_warms_up_as_min_of_one_minus_inverse_step_and_the_maximum(step, want):
    assert float(ema_decay(step, 0.99)) == pytest.approx(want, abs=1e-5)


def test_decay_without_warm_up_is_the_maximum():
    assert float(ema_decay(0, 0.99, warmup=False)) == pytest.approx(0.99)


def random_weights(network, rng):
    return [rng.normal(size=w.shape).astype(np.float32) + (2.0 if "variance" in w.path else 0)
            for w in network.weights]


@pytest.mark.parametrize("include_statistics", [True, False])
def test_update_matches_the_formula_including_the_warm_up(include_statistics):
    student = tiny_network()
    ema = EMATeacher(student, max_decay=0.99, include_statistics=include_statistics)
    np.testing.assert_array_equal(ema.teacher.get_weights()[0], student.get_weights()[0])
    rng = np.random.default_rng(0)
    is_statistic = ["moving" in w.path for w in student.weights]
    assert any(is_statistic)
    for step in (0, 1, 7, 150):
        before = random_weights(ema.teacher, rng)
        ema.teacher.set_weights(before)
        student_weights = random_weights(student, rng)
        student.set_weights(student_weights)
        ema.update(step)
        decay = min(1 - 1 / (step + 1), 0.99)
        for got, old, new, statistic in zip(ema.teacher.get_weights(), before,
                                            student_weights, is_statistic):
            want = old if statistic and not include_statistics else decay * old + (1 - decay) * new
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_segmenter_is_cloned_with_its_own_variables():
    student = models.build_segmenter("deeplabv3plus", "small", num_classes=4,
                                     aspp_channels=8, decoder_channels=8)
    ema = EMATeacher(student)
    teacher = ema.teacher
    assert teacher is not student and len(teacher.weights) == len(student.weights)
    assert not {id(w) for w in teacher.weights} & {id(w) for w in student.weights}
    x = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(teacher(x).numpy(), student(x).numpy(), rtol=1e-5, atol=1e-5)
    student.weights[0].assign(student.weights[0] + 1.0)  # separate variables
    assert not np.allclose(teacher.weights[0].numpy(), student.weights[0].numpy())
    assert isinstance(clone_network(tiny_network()), keras.Model)


def test_teacher_stays_identical_across_replicas_with_unsynchronised_batch_norm(two_replicas):
    """Plain batch norm gives each replica its own moving statistics; the teacher takes
    their mean, so its copies agree (step 0: decay 0, the teacher becomes that mean)."""
    from kssl.methods.ema import EMATeacher

    with two_replicas.scope():
        inputs = keras.Input((None, None, 3))
        outputs = keras.layers.BatchNormalization(momentum=0.0)(inputs)
        student = keras.Model(inputs, outputs)
        teacher_holder = EMATeacher(student, max_decay=0.99)

    def forward_and_update():
        k = tf.distribute.get_replica_context().replica_id_in_sync_group
        student(tf.fill([1, 2, 2, 3], tf.cast(k, tf.float32) * 10.0), training=True)
        teacher_holder.update(0)

    two_replicas.run(tf.function(forward_and_update))
    moving_mean = [v for v in student.weights if "moving_mean" in v.path][0]
    student_copies = [c.numpy() for c in
                      two_replicas.experimental_local_results(moving_mean.value)]
    assert not np.allclose(student_copies[0], student_copies[1])  # they did diverge
    teacher_mean = [v for v in teacher_holder.teacher.weights if "moving_mean" in v.path][0]
    teacher_copies = [c.numpy() for c in
                      two_replicas.experimental_local_results(teacher_mean.value)]
    np.testing.assert_allclose(teacher_copies[0], teacher_copies[1])
    np.testing.assert_allclose(teacher_copies[0], np.mean(student_copies, axis=0), rtol=1e-6)
