"""Mixed precision and XLA: one training step under `mixed_float16` (or compiled with XLA)
moves the weights as the float32 step does, with nothing becoming inf or NaN."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kssl import distribution, optimizers
from kssl.data.examples import IGNORE_LABEL
from kssl.methods import ClassMix, Supervised
from kssl.models.layers import resize_bilinear
from tiny import NUM_CLASSES, tiny_segmenter

INITIAL_LOSS_SCALE = 2.0 ** 15  # Keras's LossScaleOptimizer default


@pytest.fixture
def set_policy():
    """`set_policy(name)` sets Keras's global dtype policy; the policy the test found is
    restored afterwards, even when the test fails."""
    previous = keras.mixed_precision.global_policy()
    try:
        yield keras.mixed_precision.set_global_policy
    finally:
        keras.mixed_precision.set_global_policy(previous)


def batches():
    rng = np.random.default_rng(0)
    labelled = {"id": np.array([b"a", b"b", b"c", b"d"]),
                "image": rng.uniform(0, 255, (4, 16, 16, 3)).astype(np.float32),
                "mask": rng.integers(0, NUM_CLASSES, (4, 16, 16)).astype(np.int32)}
    labelled["mask"][:, :3] = IGNORE_LABEL
    unlabelled = {"id": np.array([b"e", b"f", b"g", b"h"]),
                  "image": rng.uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)}
    return labelled, unlabelled


def make_method(name, start):
    segmenter = tiny_segmenter(0)
    segmenter.set_weights(start)
    if name == "Supervised":
        return Supervised(segmenter, NUM_CLASSES)
    # A low threshold makes every pixel confident, so the unsupervised loss counts fully.
    return ClassMix(segmenter, NUM_CLASSES, confidence_threshold=0.4, seed=0)


def one_step(name, start, jit_compile=False):
    """(the method after one fit step from weights `start`, its logs)."""
    labelled, unlabelled = batches()
    element = labelled if name == "Supervised" else (labelled, unlabelled)
    dataset = tf.data.Dataset.from_tensors(element)
    if jit_compile:  # as training.train does: XLA takes no string ids
        dataset = dataset.map(distribution.without_ids)
    model = make_method(name, start)
    # kssl's SGD, as bin/train builds it; compile wraps it for loss scaling if needed.
    model.compile(optimizer=optimizers.SGD(0.1, momentum=0.9), jit_compile=jit_compile)
    history = model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
    return model, {key: values[0] for key, values in history.history.items()}


def update(model, start, trainable):
    """The step's change of the segmenter's trainable weights (or of its other weights,
    the batch-norm moving statistics), as one flat float64 vector."""
    return np.concatenate([
        (variable.numpy().astype(np.float64) - before).ravel()
        for variable, before in zip(model.segmenter.weights, start)
        if variable.trainable == trainable])


def relative_difference(got, want):
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize("name", ["Supervised", "ClassMix"])
def test_mixed_float16_step_updates_like_the_float32_step(set_policy, name):
    start = tiny_segmenter(0).get_weights()
    set_policy("float32")
    reference, reference_logs = one_step(name, start)
    set_policy("mixed_float16")
    model, logs = one_step(name, start)

    # The step really ran in half precision, with a loss-scaled optimizer.
    assert model.segmenter.compute_dtype == "float16"
    assert model.segmenter(batches()[0]["image"]).dtype == tf.float16
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, optimizers.SGD)
    # The scale halves whenever a gradient is inf or NaN (and the step is skipped).
    assert float(model.optimizer.dynamic_scale.numpy()) == INITIAL_LOSS_SCALE
    assert all(np.isfinite(value) for value in logs.values())
    for key, value in reference_logs.items():
        assert logs[key] == pytest.approx(value, rel=1e-2, abs=1e-3)
    weights = model.segmenter.get_weights() + (
        model.teacher.get_weights() if name == "ClassMix" else [])
    assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in weights)

    # float16 keeps ~3 significant digits: the weights' update agrees to 0.1% (Supervised)
    # and 0.3% (ClassMix) as measured, that of the moving statistics, which batch norm
    # computes in float32, to 0.01%. A missing loss scale or unscale, an underflow or a
    # skipped step would be off by far more.
    half, full = update(model, start, True), update(reference, start, True)
    assert half @ full / (np.linalg.norm(half) * np.linalg.norm(full)) > 0.999
    assert relative_difference(half, full) < 2e-2
    statistics = update(model, start, False), update(reference, start, False)
    assert relative_difference(*statistics) < 2e-3


def test_xla_compiled_step_matches_the_plain_step(set_policy):
    set_policy("float32")
    start = tiny_segmenter(0).get_weights()
    plain, plain_logs = one_step("Supervised", start)
    compiled, logs = one_step("Supervised", start, jit_compile=True)
    assert compiled.jit_compile
    assert logs["loss"] == pytest.approx(plain_logs["loss"], rel=1e-5)
    for got, want in zip(compiled.segmenter.get_weights(), plain.segmenter.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_float16_bilinear_resize_has_an_xla_gradient():
    """The gradient of a float16 resize feeding a select (ReLU, dropout) compiles with XLA
    (TF's XLA resize gradient returns float32 for float16 input, which the select then
    rejects) and equals the float32 gradient up to float16 rounding."""
    values = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)

    def gradient(dtype):
        x = tf.constant(values)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.cast(x, dtype)
            y = resize_bilinear(tf.where(y > 0, y, tf.zeros_like(y)), (6, 8))
            loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
        return tape.gradient(loss, x)

    compiled = tf.function(gradient, jit_compile=True)(tf.float16).numpy()
    np.testing.assert_allclose(compiled, gradient(tf.float32).numpy(), rtol=1e-2, atol=1e-2)
    assert np.abs(compiled).max() > 0.1
