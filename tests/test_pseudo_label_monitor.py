"""The pseudo-label monitor: its scores against a hand count, its history through a
resume, and what each method hands it."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kssl import pseudo_label_monitor as monitor
from kssl.data.examples import IGNORE_LABEL
from kssl.methods import ClassMix, GuidedMix, MKD, Supervised
from tiny import NUM_CLASSES, softmax, tiny_segmenter

NAMES = ["a", "b", "c"]


def test_scores_equal_a_hand_count():
    labels = np.array([[[0, 0, 1], [2, 2, 2]]])
    truth = np.array([[[0, 1, 1], [2, 2, IGNORE_LABEL]]])
    admitted = np.array([[[True, False, True], [True, True, False]]])
    prior = np.array([0.5, 0.25, 0.25])
    scores = monitor.score_targets(labels, admitted, truth, prior, NAMES)
    # Valid pixels (truth != 255): 5. Confusion (truth, label): (0,0) (1,0) (1,1) (2,2) (2,2)
    # IoU a = 1 / (1 + 1) = 0.5, b = 1 / 2 = 0.5, c = 2 / 2 = 1.0 -> mean 2/3.
    assert scores["mean_iou"] == pytest.approx(2 / 3)
    assert scores["accuracy"] == pytest.approx(4 / 5)
    # Admitted: 4 of 6 pixels; admitted and valid: (0,0) (1,1) (2,2) -> all right.
    assert scores["admitted_share"] == pytest.approx(4 / 6)
    assert scores["admitted_accuracy"] == pytest.approx(1.0)
    # Shares of the admitted labels 0, 1, 2, 2 -> 1/4, 1/4, 1/2.
    assert scores["class_share"] == pytest.approx({"a": 0.25, "b": 0.25, "c": 0.5})
    assert scores["most_gained"] == ["c", pytest.approx(25.0)]
    assert scores["most_lost"] == ["a", pytest.approx(-25.0)]
    p = np.array([0.25, 0.25, 0.5]) + 1e-6
    q = prior + 1e-6
    p, q = p / p.sum(), q / q.sum()
    assert scores["kl_to_prior"] == pytest.approx(np.sum(p * np.log(p / q)), rel=1e-6)
    # All six pixels' labels 0, 0, 1, 2, 2, 2 -> 1/3, 1/6, 1/2, admitted or not.
    p = np.array([1 / 3, 1 / 6, 1 / 2]) + 1e-6
    p = p / p.sum()
    assert scores["prediction_kl_to_prior"] == pytest.approx(np.sum(p * np.log(p / q)),
                                                             rel=1e-6)


def test_without_ground_truth_only_the_distribution_is_scored():
    scores = monitor.score_targets(np.zeros((1, 2, 2), int), np.ones((1, 2, 2), bool), None,
                                   np.array([1 / 3] * 3), NAMES)
    assert scores["mean_iou"] is None and scores["admitted_accuracy"] is None
    assert scores["class_share"]["a"] == 1.0


def test_progress_line_says_when_nothing_is_admitted():
    labels = np.array([[[0, 0, 1], [2, 2, 2]]])
    prior = np.array([0.5, 0.25, 0.25])
    some = monitor.score_targets(labels, labels > 0, labels, prior, NAMES)
    line = monitor.format_line(250, "network", some)
    # Admitted labels 1, 2, 2, 2: c gains 75 - 25 = 50 points, a loses 50.
    assert "admitted 66.7% (accuracy 100.0)" in line and "c +50.0 pts, a -50.0 pts" in line
    none = monitor.score_targets(labels, np.zeros(labels.shape, bool), labels, prior, NAMES)
    line = monitor.format_line(250, "network", none)
    assert "admitted 0.0% | KL to the labelled prior: none admitted;" in line
    assert "pts" not in line and line.endswith(
        f"{none['prediction_kl_to_prior']:.3f} all pixels")


class FakeMethod(keras.Model):
    """Labels every pixel with the optimizer's step count modulo 3."""

    def __init__(self):
        super().__init__()
        self.optimizer = keras.optimizers.SGD()
        self.optimizer.build([])

    def pseudo_label_targets(self, images, labelled_images=None):
        label = int(self.optimizer.iterations.numpy()) % 3
        shape = tf.shape(images)[:3]
        return {"teacher": (tf.fill(shape, label), None)}


def test_history_is_kept_and_reloaded_on_resume(tmp_path, capsys):
    images = np.zeros((3, 2, 2, 3), np.float32)
    truth = np.zeros((3, 2, 2), np.int64)
    make = lambda: monitor.PseudoLabelMonitor(images, truth, None, [1 / 3] * 3, NAMES,
                                              every_steps=2, directory=str(tmp_path),
                                              batch_size=2)
    callback, model = make(), FakeMethod()
    callback.set_model(model)
    for _ in range(3):
        model.optimizer.iterations.assign_add(1)
        callback.on_train_batch_end(0)
    callback.on_epoch_end(0)
    assert "pseudo-labels (teacher) at step 2: mIoU" in capsys.readouterr().out
    saved = json.load(open(tmp_path / monitor.HISTORY_FILE))
    assert [e["step"] for e in saved["teacher"]] == [2]
    assert saved["teacher"][0]["accuracy"] == 0.0  # label 2 against truth 0
    resumed = make()  # a new process: the curve goes on from the file
    resumed.set_model(model)
    model.optimizer.iterations.assign_add(1)
    resumed.on_train_batch_end(0)  # step 4
    resumed.on_train_end()  # already measured at 4: not again
    assert [e["step"] for e in resumed.history["teacher"]] == [2, 4]
    assert resumed.history["teacher"][1]["accuracy"] == 0.0  # label 1
    assert os.path.isdir(tmp_path / "logs" / "pseudo_labels")


def test_a_method_without_pseudo_labels_turns_the_monitor_off(tmp_path):
    callback = monitor.PseudoLabelMonitor(np.zeros((1, 4, 4, 3), np.float32), None, None,
                                          [1 / 3] * 3, NAMES, every_steps=1,
                                          directory=str(tmp_path))
    model = Supervised(tiny_segmenter(0), NUM_CLASSES)
    model.compile(optimizer=keras.optimizers.SGD())
    model.optimizer.build(model.trainable_variables)
    callback.set_model(model)
    callback.on_train_batch_end(0)
    assert not callback.active and callback.history == {}


def test_classmix_hands_over_its_teachers_thresholded_argmax():
    model = ClassMix(tiny_segmenter(0), NUM_CLASSES, confidence_threshold=0.4, seed=0)
    images = tf.random.stateless_uniform((2, 8, 8, 3), (1, 2), 0, 255)
    labels, admitted = model.pseudo_label_targets(images)["teacher"]
    probs = softmax(model.teacher(images, training=False).numpy().astype(np.float64))
    np.testing.assert_array_equal(labels.numpy(), probs.argmax(-1))
    np.testing.assert_array_equal(admitted.numpy(), probs.max(-1) > 0.4)


def test_guidedmix_paper_target_is_the_argmax_of_the_decoupled_mask():
    from kssl import models

    segmenter = models.build_segmenter(arch="psp_unet", backbone="small", num_classes=3,
                                       psp_channels=8)
    model = GuidedMix(segmenter, 3, pairs="random", seed=0)
    images = tf.random.stateless_uniform((2, 16, 16, 3), (3, 4), 0, 255)
    partners = tf.random.stateless_uniform((2, 16, 16, 3), (5, 6), 0, 255)
    labels, admitted = model.pseudo_label_targets(images, partners)["decoupled"]
    assert admitted is None
    lambdas = model._lambdas(tf.constant(0, tf.int64), 2, 2).numpy()
    weight = lambdas.reshape(-1, 1, 1, 1)
    mixed = weight * partners.numpy() + (1 - weight) * images.numpy()
    p_mix = softmax(segmenter(tf.constant(mixed), training=False).numpy().astype(np.float64))
    p_guide = softmax(segmenter(partners, training=False).numpy().astype(np.float64))
    expected = model.decoupled(tf.math.log(p_mix), tf.math.log(p_guide), lambdas)
    np.testing.assert_array_equal(labels.numpy(), np.argmax(expected.numpy(), -1))


@pytest.mark.parametrize("threshold", [None, 0.4])
def test_mkd_hands_over_each_teachers_target_and_each_students_argmax(threshold):
    from kssl import models

    segmenter = models.build_segmenter(arch="deeplabv3plus", backbone="small", num_classes=3,
                                       aspp_channels=8, decoder_channels=8)
    model = MKD(segmenter, 3, lambda_steps=1, seed=0, confidence_threshold=threshold)
    images = tf.random.stateless_uniform((2, 32, 32, 3), (8, 9), 0, 255)
    targets = model.pseudo_label_targets(images)
    assert sorted(targets) == ["student_1", "student_2", "teacher_1", "teacher_2"]
    for name in ("student_1", "student_2"):  # the mutual terms' targets: plain argmax
        labels, admitted = targets.pop(name)
        logits = model.network(name)(images, training=False).numpy()
        np.testing.assert_array_equal(labels.numpy(), logits.argmax(-1))
        assert admitted is None
    for name, (labels, admitted) in targets.items():
        probs = softmax(model.network(name)(images, training=False).numpy().astype(np.float64))
        np.testing.assert_array_equal(labels.numpy(), probs.argmax(-1))
        if threshold is None:
            assert admitted is None
        else:
            np.testing.assert_array_equal(admitted.numpy(), probs.max(-1) >= threshold)


def test_a_networks_own_argmax_is_scored_in_inference_mode_with_every_pixel_admitted():
    labels = np.array([[[0, 0, 1], [2, 2, 2]], [[1, 1, 1], [0, 2, 2]]])
    truth = np.array([[[0, 1, 1], [2, 2, IGNORE_LABEL]], [[1, 1, 0], [0, 2, 2]]])
    modes = []

    def network(images, training):  # one-hot logits of `labels`, row by row
        modes.append(training)
        rows = np.asarray(images)[:, 0, 0, 0].astype(int)
        return np.eye(3)[labels[rows]]

    images = np.zeros((2, 2, 3, 3), np.float32)
    images[1] = 1.0  # row index of each image, read back by the network
    prior = np.array([0.5, 0.25, 0.25])
    scores = monitor.score_network(network, images, truth, prior, NAMES, batch_size=1)
    assert modes == [False, False]  # inference mode, one call per batch
    # Valid pixels: 5 + 6. Confusion (truth, label): image 0 (0,0) (1,0) (1,1) (2,2) (2,2);
    # image 1 (1,1) (1,1) (0,1) (0,0) (2,2) (2,2). a: 2 / (2 + 1 + 1) = 0.5;
    # b: 3 / (4 + 4 - 3) = 0.6; c: 4 / 4 = 1.0 -> mean 0.7; accuracy 9 / 11.
    assert scores["mean_iou"] == pytest.approx(0.7)
    assert scores["accuracy"] == pytest.approx(9 / 11)
    assert scores["admitted_share"] == 1.0 and scores["admitted_accuracy"] == pytest.approx(9 / 11)
    assert scores["kl_to_prior"] == pytest.approx(scores["prediction_kl_to_prior"])


def test_the_monitored_subset_is_the_one_training_scores(tmp_path):
    """`training.monitored_subset` rebuilds, from a parsed config, the images the monitor
    of a run with that config scores (the reference target of bin/benchmark's curves)."""
    import gin

    from kssl import config, training
    from kssl.data import splits
    from kssl.data.readers.shapes import Shapes
    from tiny import TINY_SHAPES_CONFIG

    cfg = tmp_path / "c.gin"
    cfg.write_text(TINY_SHAPES_CONFIG + "train.method = @ClassMix\n"
                   "pseudo_label_monitor.images = 4\n")
    config.parse([str(cfg)])
    try:
        reader, ids, images, truth, prior = training.monitored_subset()
    finally:
        gin.clear_config()
    shapes = Shapes(num_train=24, height=48, width=64)
    examples = shapes.examples("train")
    labelled, pool = splits.labelled_split(examples, count=8)
    every = len(pool) // 4  # 16 unlabelled images, 4 of them, every 4th
    chosen = [int(i.split("/")[1]) for i in pool.ids[::every][:4]]
    assert ids == list(pool.ids[::every][:4])
    all_images, all_masks = shapes.arrays("train")
    np.testing.assert_array_equal(images, all_images[chosen].astype(np.float32))
    np.testing.assert_array_equal(truth, all_masks[chosen])
    labelled_rows = [int(i.split("/")[1]) for i in labelled.ids]
    masks = all_masks[labelled_rows]
    counts = np.bincount(masks[masks != IGNORE_LABEL], minlength=7)
    np.testing.assert_allclose(prior, counts / counts.sum())
    assert reader.info.num_classes == 7

    cfg.write_text(TINY_SHAPES_CONFIG + "train.method = @ClassMix\n"
                   "pseudo_label_monitor.images = 0\n")
    config.parse([str(cfg)])
    try:
        assert training.monitored_subset() is None
    finally:
        gin.clear_config()
