"""One training step on a global batch gives the same weights on 1 and on 2 replicas.

The CPU is split into two logical devices (tests/conftest.py). The model has synchronised
batch norm and the batch holds different numbers of ignored pixels per replica, so the
test fails if losses are averaged per replica instead of over the global batch, if the
batch statistics are per replica, or if gradients are not summed.
"""

import keras
import numpy as np
import tensorflow as tf

from kssl import losses
from kssl.data.examples import IGNORE_LABEL
from kssl.methods import Supervised
from tiny import NUM_CLASSES, tiny_segmenter

def global_batch():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 6, 6, 3)).astype(np.float32)
    masks = rng.integers(0, NUM_CLASSES, (4, 6, 6)).astype(np.int32)
    masks[2:, :4] = IGNORE_LABEL  # the second replica's half counts far fewer pixels
    ids = np.array([b"a", b"b", b"c", b"d"])  # string ids travel with every batch
    return {"id": ids, "image": images, "mask": masks}


def train_one_step(strategy, weights):
    batch = global_batch()
    ds = tf.data.Dataset.from_tensors(batch)
    with strategy.scope():
        model = Supervised(tiny_segmenter(0), NUM_CLASSES)
        model.segmenter.set_weights(weights)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)
    return [w.numpy() for w in model.segmenter.weights], model


def test_one_step_same_weights_on_one_and_two_replicas(two_replicas):
    start = tiny_segmenter(0).get_weights()
    single, _ = train_one_step(tf.distribute.get_strategy(), start)
    double, model = train_one_step(two_replicas, start)
    assert model.distribute_strategy.num_replicas_in_sync == 2
    for a, b in zip(single, double):  # weights, BN moving statistics included
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(a, s) for a, s in zip(single, start))  # it did train


def test_single_device_step_matches_a_hand_written_gradient_step():
    """The reference itself: SGD on the mean CE over all non-ignored pixels."""
    start = tiny_segmenter(0).get_weights()
    trained, _ = train_one_step(tf.distribute.get_strategy(), start)
    net = tiny_segmenter(0)
    net.set_weights(start)
    batch = global_batch()
    with tf.GradientTape() as tape:
        logits = net(batch["image"], training=True)
        valid = batch["mask"] != IGNORE_LABEL
        per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(
            np.where(valid, batch["mask"], 0), logits)
        loss = tf.reduce_sum(per_pixel * valid) / valid.sum()
    grads = tape.gradient(loss, net.trainable_variables)
    expected = {id(v): (v - 0.1 * g).numpy() for v, g in zip(net.trainable_variables, grads)}
    trainable = [expected.get(id(v)) for v in net.weights]
    for got, want in zip(trained, trainable):
        if want is not None:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_reported_loss_is_the_global_loss_on_two_replicas(two_replicas):
    start = tiny_segmenter(0).get_weights()
    strategy = two_replicas
    batch = global_batch()
    with strategy.scope():
        model = Supervised(tiny_segmenter(0), NUM_CLASSES)
        model.segmenter.set_weights(start)
        model.compile(optimizer=keras.optimizers.SGD(0.0))
    history = model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, steps_per_epoch=1,
                        verbose=0)
    net = tiny_segmenter(0)
    net.set_weights(start)
    want = losses.masked_cross_entropy(net(batch["image"], training=True), batch["mask"])
    np.testing.assert_allclose(history.history["loss"][0], want.numpy(), rtol=1e-5)


def test_evaluate_on_two_replicas_scores_the_whole_batch(two_replicas):
    """model.evaluate's mean IoU comes from the confusion matrix summed over replicas,
    equal to a numpy computation over the whole global batch."""
    from kssl.evaluation import confusion_from_labels, mean_iou_from_confusion

    batch = global_batch()
    with two_replicas.scope():
        model = Supervised(tiny_segmenter(3), NUM_CLASSES)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    logs = model.evaluate(tf.data.Dataset.from_tensors(batch), verbose=0, return_dict=True)
    predictions = np.argmax(model.segmenter(batch["image"]).numpy(), -1)
    want = mean_iou_from_confusion(confusion_from_labels(batch["mask"], predictions,
                                                         NUM_CLASSES))
    np.testing.assert_allclose(logs["mean_iou"], want, rtol=1e-6)
