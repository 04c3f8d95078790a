"""ClassMix: the confidence weight, the shared mixing mask, distribution, fit and resume."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kssl import config, losses
from kssl.augment import seeds
from kssl.augment.strong import StrongAugment
from kssl.data.examples import IGNORE_LABEL
from kssl.methods import ClassMix, classmix
from tiny import (NUM_CLASSES, crash_and_resume, pixel_model, random_batches,
                  run_method_test, tiny_run_config, tiny_segmenter)

def test_confidence_weight_matches_a_hand_computation():
    confidence = np.array([[[0.99, 0.5], [0.97, 0.2]],     # 2 of 4 pixels above 0.968
                           [[0.1, 0.3], [0.968, 0.999]]],  # 1 of 4 (0.968 is not above)
                          np.float32)
    batch = losses.confidence_weights(confidence, 0.968, "batch").numpy()
    np.testing.assert_allclose(batch, np.full((2, 2, 2), 3 / 8))
    image = losses.confidence_weights(confidence, 0.968, "image").numpy()
    np.testing.assert_allclose(image[0], 2 / 4)
    np.testing.assert_allclose(image[1], 1 / 4)
    pixel = losses.confidence_weights(confidence, 0.968, "pixel").numpy()
    np.testing.assert_array_equal(pixel, confidence > 0.968)

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 2, 2, NUM_CLASSES)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (2, 2, 2)).astype(np.int32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    got = losses.confidence_weighted_cross_entropy(logits, labels, confidence, 0.968, "batch")
    np.testing.assert_allclose(got.numpy(), 3 / 8 * ce.mean(), rtol=1e-5)
    got = losses.confidence_weighted_cross_entropy(logits, labels, confidence, 0.968, "image")
    np.testing.assert_allclose(got.numpy(), (ce[0].sum() / 2 + ce[1].sum() / 4) / 8, rtol=1e-5)
    # With class weights: each pixel also weighs w[its pseudo-label]; the mean divides by
    # the sum of those weights over every pixel, admitted or not.
    class_weights = np.array([0.5, 2.0, 4.0], np.float32)
    w = class_weights[labels]
    got = losses.confidence_weighted_cross_entropy(logits, labels, confidence, 0.968, "pixel",
                                                   class_weights=class_weights)
    np.testing.assert_allclose(got.numpy(), (w * (confidence > 0.968) * ce).sum() / w.sum(),
                               rtol=1e-5)


def test_unsup_class_weights_need_class_weights_and_weigh_the_step_loss():
    with pytest.raises(ValueError, match="class weights"):
        ClassMix(tiny_segmenter(0), NUM_CLASSES, unsup_class_weights=True)
    weights = [0.5, 2.0, 4.0]
    model = ClassMix(tiny_segmenter(0), NUM_CLASSES, class_weights=weights,
                     unsup_class_weights=True)
    np.testing.assert_array_equal(model.unsup_class_weights.numpy(), weights)
    assert ClassMix(tiny_segmenter(0), NUM_CLASSES, class_weights=weights
                    ).unsup_class_weights is None

    def unsupervised_loss(class_weights, weighted):
        # The pixel model's argmax follows each pixel's brightest channel, so the random
        # images give pseudo-labels of every class; with lr 0 the reported loss is the
        # first step's.
        model = ClassMix(pixel_model([[3, 0, 0], [0, 3, 0], [0, 0, 3]]), NUM_CLASSES,
                         weighting="none", class_weights=class_weights,
                         unsup_class_weights=weighted, seed=0)
        model.compile(optimizer=keras.optimizers.SGD(0.0))
        rng = np.random.default_rng(0)
        labelled = {"image": rng.uniform(0, 1, (2, 4, 4, 3)).astype(np.float32),
                    "mask": rng.integers(0, 3, (2, 4, 4)).astype(np.int32)}
        unlabelled = {"image": rng.uniform(0, 1, (2, 4, 4, 3)).astype(np.float32)}
        history = model.fit(tf.data.Dataset.from_tensors((labelled, unlabelled)), epochs=1,
                            steps_per_epoch=1, verbose=0)
        return history.history["unsupervised_loss"][0]

    plain = unsupervised_loss(weights, False)
    # Equal class weights leave a weighted mean unchanged; unequal ones move it.
    assert unsupervised_loss([2.0, 2.0, 2.0], True) == pytest.approx(plain, rel=1e-6)
    assert unsupervised_loss(weights, True) != pytest.approx(plain, rel=1e-3)


def test_images_and_teacher_probabilities_are_mixed_with_the_same_mask():
    model = ClassMix(tiny_segmenter(0), NUM_CLASSES, seed=0)
    rng = np.random.default_rng(0)
    batch, height, width = 4, 8, 10
    # Every pixel of image i has value i, so a mixed pixel tells which image it came from.
    images = np.broadcast_to(np.arange(batch, dtype=np.float32)[:, None, None, None],
                             (batch, height, width, 3))
    probs = rng.dirichlet(np.ones(NUM_CLASSES), (batch, height, width)).astype(np.float32)
    mixed_images, mixed_probs = model.mix_pairs(tf.constant(images), tf.constant(probs), 0)
    source = mixed_images.numpy()[..., 0].astype(int)
    rows, cols = np.indices((height, width))
    for i in range(batch):
        assert set(np.unique(source[i])) <= {i, (i + 1) % batch}
        np.testing.assert_array_equal(mixed_probs.numpy()[i], probs[source[i], rows, cols])
        # Image i keeps exactly the pixels of floor(n/2) of its predicted classes.
        predicted = probs[i].argmax(-1)
        kept_classes = np.unique(predicted[source[i] == i])
        assert len(kept_classes) == len(np.unique(predicted)) // 2
        np.testing.assert_array_equal(source[i] == i, np.isin(predicted, kept_classes))


@pytest.mark.parametrize("mix_mask", ["class", "cut"])
def test_mix_probability_leaves_the_unchosen_images_whole(mix_mask):
    batch, height, width = 64, 6, 8
    images = np.broadcast_to(np.arange(batch, dtype=np.float32)[:, None, None, None],
                             (batch, height, width, 3))
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(NUM_CLASSES), (batch, height, width)).astype(np.float32)
    with pytest.raises(ValueError, match="mix_probability"):
        ClassMix(tiny_segmenter(0), NUM_CLASSES, mix_probability=1.5)
    # Nothing mixed: the images and probabilities come back as they went in.
    model = ClassMix(tiny_segmenter(0), NUM_CLASSES, mix_probability=0.0, mix_mask=mix_mask,
                     seed=0)
    mixed_images, mixed_probs = model.mix_pairs(tf.constant(images), tf.constant(probs), 3)
    np.testing.assert_array_equal(mixed_images.numpy(), images)
    np.testing.assert_array_equal(mixed_probs.numpy(), probs)
    # Half: image i is mixed exactly where its uniform draw on the choice stream is
    # below 0.5 (drawn here independently); an image not drawn is untouched.
    model = ClassMix(tiny_segmenter(0), NUM_CLASSES, mix_probability=0.5, mix_mask=mix_mask,
                     seed=0)
    step = 3
    draws = tf.random.stateless_uniform(
        [batch], seeds.step_seed(0, step, classmix._MIX_CHOICE_STREAM)).numpy()
    mixed_images, _ = model.mix_pairs(tf.constant(images), tf.constant(probs), step)
    source = mixed_images.numpy()[..., 0].astype(int)
    touched = (source != np.arange(batch)[:, None, None]).any(axis=(1, 2))
    assert not touched[draws >= 0.5].any()
    # A chosen image takes some pixels from the next image: with class masks it keeps
    # floor(n/2) of its n predicted classes (none when n = 1), with "cut" a box of half
    # its area comes from the next image.
    assert touched[draws < 0.5].all()
    assert 20 < (draws < 0.5).sum() < 44


# Every pseudo-label control on, with fast-moving running state, and half of the
# images mixed (each replica draws its own images' choices).
CONTROLS = dict(thresholds="class_adaptive", distribution_alignment=True,
                class_aware_mixing=True, control_decay=0.5, class_prior=[0.5, 0.3, 0.2],
                mix_probability=0.5)


# The compiled two-replica path of a method's step is checked here: the other methods'
# tests take eager steps, which run the same replica code.
@pytest.mark.parametrize("teacher_bn, controls", [("ema", False), ("batch", False),
                                                  ("ema", True)])
def test_two_steps_same_student_and_teacher_on_one_and_two_replicas(two_replicas, tmp_path,
                                                                    teacher_bn, controls):
    def make_method():
        # Masks and augmentations are drawn statelessly from (seed, step, global example
        # index), so both runs draw the same ones; a low threshold makes the weight > 0.
        return ClassMix(tiny_segmenter(0), NUM_CLASSES, confidence_threshold=0.4,
                        strong_augment=StrongAugment(1.0, 1.0), teacher_bn=teacher_bn,
                        seed=3, **(CONTROLS if controls else {}))

    labelled, unlabelled = random_batches(4, (20, 20), ignored_columns=12)
    labelled["id"] = np.array([b"a", b"b", b"c", b"d"])  # string ids travel with a batch
    unlabelled["id"] = np.array([b"e", b"f", b"g", b"h"])
    students = {1: [], 2: []}  # the student before and after each step, by replica count
    single, logs, double, _ = run_method_test(
        make_method, [(labelled, unlabelled)] * 2, two_replicas, tmp_path,
        optimizer=lambda: keras.optimizers.SGD(0.1, momentum=0.9), compiled=True,
        on_step=lambda model: students[model.distribute_strategy.num_replicas_in_sync]
        .append(model.segmenter.get_weights()), rtol=1e-5, atol=1e-6, log_rtol=1e-5)
    if controls:  # the controls' running state moved (run_method_test compared it)
        for layer in ("class_confidence", "alignment"):
            for variable in getattr(single, layer).weights:
                assert not np.allclose(variable.numpy(), 1.0)
    # (the adaptive thresholds lower the bar of the less confident classes: all may pass)
    share = np.mean(logs["confident_share"])
    assert 0 < share <= 1 and (controls or share < 1)
    assert np.mean(logs["unsupervised_loss"]) > 0
    assert any(not np.allclose(s, t) for s, t in
               zip(single.segmenter.get_weights(), single.teacher.get_weights()))
    # After step 0 (decay 0) the teacher is the student; after step 1 (decay 0.5) the mean
    # of the two students, moving statistics included when they are averaged.
    _, first, second = students[1]
    for variable, teacher, a, b in zip(single.segmenter.weights,
                                       single.teacher.get_weights(), first, second):
        if variable.trainable or teacher_bn == "ema":
            np.testing.assert_allclose(teacher, 0.5 * a + 0.5 * b, rtol=1e-5, atol=1e-6)
    # The optimizer keeps momentum for the student only.
    momenta = [v for v in single.optimizer.variables if "momentum" in v.path]
    assert len(momenta) == len(single.segmenter.trainable_variables)


TINY_CONFIG = tiny_run_config("ClassMix") + """
ClassMix.strong_augment = True
ClassMix.thresholds = 'class_adaptive'
ClassMix.distribution_alignment = True
ClassMix.class_aware_mixing = True
"""


def saved_state(model):
    """The teacher's weights and the pseudo-label controls' running state."""
    return [w.copy() for w in model.teacher.get_weights()
            + model.class_confidence.get_weights() + model.alignment.get_weights()]


def test_fit_through_the_driver_runs_and_resumes_with_its_teacher(tmp_path, monkeypatch):
    """Two steps through kssl.training.train, killed after the first: the resumed run
    restores the teacher, the controls' running state (class confidence, class
    distribution) and the step counter from the backup."""
    config.parse([], [TINY_CONFIG])
    crashed, resumed, metrics = crash_and_resume(
        str(tmp_path / "run"), monkeypatch, lambda meter, epoch: saved_state(meter.model))
    saved = crashed[-1]  # the teacher after step 0, as backed up
    assert len(resumed) == 1  # only the second epoch ran
    assert not np.allclose(saved[-3], 1.0)  # the class confidence moved from its start
    for got, want in zip(resumed[0], saved):
        np.testing.assert_array_equal(got, want)
    assert metrics["steps"] == 2 and metrics["method"] == "ClassMix"
    assert 0.0 <= metrics["mean_iou"] <= 1.0
    # The pseudo-label monitor measured after each step, its first point kept through the
    # crash; the Shapes pool has ground truth, so the pseudo-labels are scored.
    curve = metrics["pseudo_label_monitor"]["teacher"]
    assert [entry["step"] for entry in curve] == [1, 2]
    assert all(0.0 <= entry["mean_iou"] <= 1.0 for entry in curve)
    # It names the images it scored: the 16 unlabelled of the 24 (every one, in order).
    from kssl.data import splits
    from kssl.data.readers.shapes import Shapes

    _, pool = splits.labelled_split(Shapes(num_train=24).examples("train"), count=8)
    assert metrics["pseudo_label_monitor_ids"] == list(pool.ids) and len(pool) == 16


@pytest.mark.parametrize("bias, confident", [(10.0, True), (2.0, False)])
def test_step_loss_matches_a_hand_computation(bias, confident):
    """A network whose logits are its bias alone: the teacher predicts class 0 everywhere
    with probability p = e^b / (e^b + 2), so every mask is empty and the pseudo-label is 0.
    With lr 0 the reported loss is CE(labelled) + share * (-log p), share = 1 if p > 0.968
    else 0 — computed here by hand, not through kssl."""
    inputs = keras.Input((None, None, 3))
    logits = keras.layers.Conv2D(3, 1, kernel_initializer="zeros",
                                 bias_initializer=keras.initializers.Constant([bias, 0, 0]))(
        inputs)
    model = ClassMix(keras.Model(inputs, logits), num_classes=3, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 3, (2, 4, 4)).astype(np.int32)
    masks[0, 0, 0] = IGNORE_LABEL
    labelled = {"image": rng.uniform(0, 255, (2, 4, 4, 3)).astype(np.float32), "mask": masks}
    unlabelled = {"image": rng.uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)}
    history = model.fit(tf.data.Dataset.from_tensors((labelled, unlabelled)), epochs=1,
                        steps_per_epoch=1, verbose=0)

    log_probs = np.log(np.exp([bias, 0.0, 0.0]) / np.exp([bias, 0.0, 0.0]).sum())
    valid = masks != IGNORE_LABEL
    supervised = -log_probs[masks[valid]].mean()
    p = np.exp(log_probs[0])
    share = 1.0 if p > 0.968 else 0.0
    assert (share == 1.0) == confident
    np.testing.assert_allclose(history.history["supervised_loss"][0], supervised, rtol=1e-5)
    np.testing.assert_allclose(history.history["unsupervised_loss"][0],
                               share * -log_probs[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(history.history["loss"][0], supervised + share * -log_probs[0],
                               rtol=1e-5)
    np.testing.assert_allclose(history.history["confident_share"][0], share)
