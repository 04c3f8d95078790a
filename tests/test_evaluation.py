"""Confusion matrix / IoU, inference modes (whole, sliding, resized, flipped) and evaluate."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kssl.evaluation import (ConfusionMatrix, class_shares_from_confusion, confusion_from_labels,
                             describe_mode, evaluate, format_iou_table, iou_from_confusion,
                             mean_iou_from_confusion, pixel_accuracy_from_confusion,
                             predict_logits)
from tiny import one_hot_model, pixel_model, random_images, strided_model

# A hand-checked example, 4 classes, class 3 absent from both ground truth and predictions.
LABELS = np.array([[[0, 0, 1, 255],
                    [2, 1, 1, 2]]], np.uint8)
PREDICTIONS = np.array([[[0, 1, 1, 2],     # the 255 pixel's prediction (2) is not counted
                         [2, 1, 0, 0]]], np.int32)
# rows = ground truth, columns = prediction
EXPECTED_CM = np.array([[1, 1, 0, 0],
                        [1, 2, 0, 0],
                        [1, 0, 1, 0],
                        [0, 0, 0, 0]])
# IoU = tp / (row + col - tp): class 0: 1/(2+3-1), class 1: 2/(3+3-2), class 2: 1/(2+1-1)
EXPECTED_IOU = [1 / 4, 2 / 4, 1 / 2, math.nan]
EXPECTED_MEAN = (1 / 4 + 2 / 4 + 1 / 2) / 3
EXPECTED_ACCURACY = 4 / 7


# -- confusion matrix and IoU -----------------------------------------------------------
def test_numpy_reference_matches_hand_computation():
    cm = confusion_from_labels(LABELS, PREDICTIONS, 4)
    np.testing.assert_array_equal(cm, EXPECTED_CM)
    np.testing.assert_allclose(iou_from_confusion(cm), EXPECTED_IOU)
    assert mean_iou_from_confusion(cm) == pytest.approx(EXPECTED_MEAN)
    assert pixel_accuracy_from_confusion(cm) == pytest.approx(EXPECTED_ACCURACY)


def test_metric_matches_hand_computation_for_ids_and_logits():
    metric = ConfusionMatrix(4)
    metric.update_state(LABELS, PREDICTIONS)
    np.testing.assert_array_equal(metric.confusion_matrix(), EXPECTED_CM)
    np.testing.assert_allclose(metric.per_class_iou(), EXPECTED_IOU)
    assert float(metric.result()) == pytest.approx(EXPECTED_MEAN)
    assert metric.mean_iou() == pytest.approx(EXPECTED_MEAN)
    assert metric.pixel_accuracy() == pytest.approx(EXPECTED_ACCURACY)

    logits = tf.one_hot(PREDICTIONS, 4) * 3.0 - 1.0
    by_logits = ConfusionMatrix(4)
    by_logits.update_state(LABELS[..., None], logits)  # [B, H, W, 1] labels too
    np.testing.assert_array_equal(by_logits.confusion_matrix(), EXPECTED_CM)


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero():
    cm = confusion_from_labels([0, 0, 0], [0, 0, 1], 3)
    iou = iou_from_confusion(cm)
    assert iou[1] == 0.0 and math.isnan(iou[2])
    assert mean_iou_from_confusion(cm) == pytest.approx((2 / 3 + 0.0) / 2)


def test_empty_metric_is_zero_and_reset_clears_counts():
    metric = ConfusionMatrix(3)
    assert float(metric.result()) == 0.0
    metric.update_state(LABELS.clip(0, 2), PREDICTIONS.clip(0, 2))
    metric.reset_state()
    assert metric.confusion_matrix().sum() == 0


def test_streaming_updates_equal_one_big_update():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, (6, 9, 11)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.2] = 255
    predictions = rng.integers(0, 5, labels.shape)
    streamed = ConfusionMatrix(5)
    for k in range(0, 6, 2):
        streamed.update_state(labels[k:k + 2], predictions[k:k + 2])
    at_once = ConfusionMatrix(5)
    at_once.update_state(labels, predictions)
    np.testing.assert_array_equal(streamed.confusion_matrix(), at_once.confusion_matrix())
    np.testing.assert_array_equal(streamed.confusion_matrix(),
                                  confusion_from_labels(labels, predictions, 5))
    assert float(streamed.result()) == pytest.approx(float(at_once.result()))


def test_metric_in_compiled_model_and_under_mirrored_strategy(two_replicas):
    rng = np.random.default_rng(2)
    images = random_images((8, 12, 16, 3), seed=3, integer=True)
    masks = rng.integers(0, 3, (8, 12, 16)).astype(np.uint8)
    masks[:, :2] = 255
    dataset = tf.data.Dataset.from_tensor_slices((images, masks)).batch(4)

    def build():
        model = strided_model(3)
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=255), metrics=[ConfusionMatrix(3)])
        return model

    single = build()
    reference = confusion_from_labels(
        masks, np.argmax(single.predict(images, verbose=0), -1), 3)
    expected = mean_iou_from_confusion(reference)
    assert single.evaluate(dataset, verbose=0, return_dict=True)["mean_iou"] == \
        pytest.approx(expected, abs=1e-6)

    strategy = two_replicas
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        distributed = build()
    distributed.set_weights(single.get_weights())
    logs = distributed.evaluate(dataset, verbose=0, return_dict=True)
    assert logs["mean_iou"] == pytest.approx(expected, abs=1e-6)

    # A custom loop: each replica counts its half of the batch; reading sums them.
    with strategy.scope():
        metric = ConfusionMatrix(3)
    predictions = np.argmax(single.predict(images, verbose=0), -1)
    pairs = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((masks, predictions)).batch(4))

    @tf.function
    def step(labels, ids):
        strategy.run(metric.update_state, args=(labels, ids))

    for labels, ids in pairs:
        step(labels, ids)
    np.testing.assert_array_equal(metric.confusion_matrix(), reference)
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)


# -- inference modes --------------------------------------------------------------------
def test_sliding_window_equals_whole_image_for_a_pixelwise_model():
    # Integer weights on integer pixels: every logit is an exact float, so averaging
    # overlapping windows must reproduce the whole-image logits bit for bit.
    model = pixel_model([[1, 0, 2, -1], [0, 1, 1, 3], [2, -1, 0, 1]])
    images = random_images((2, 37, 53, 3), integer=True)  # neither size divisible by the stride
    whole = predict_logits(model, images)
    sliding = predict_logits(model, images, "sliding", window=(16, 20), stride=(7, 9))
    assert sliding.shape == (2, 37, 53, 4)
    np.testing.assert_array_equal(sliding.numpy(), whole.numpy())


def test_sliding_windows_cover_every_pixel_including_edges():
    identity = pixel_model(np.eye(3))  # logits are the image itself
    for size, window, stride in [((23, 31), (8, 8), (5, 6)), ((17, 17), (16, 16), None),
                                 ((9, 40), (9, 12), (9, 11))]:
        images = random_images((1, *size, 3), seed=sum(size), integer=True)
        logits = predict_logits(identity, images, "sliding", window=window, stride=stride)
        # A pixel no window covered would be 0/0 = NaN.
        np.testing.assert_array_equal(logits.numpy(), images)


def test_sliding_window_pads_images_smaller_than_the_window():
    model = pixel_model([[1, 2], [0, 1], [3, 0]])
    images = random_images((1, 10, 12, 3), integer=True)
    logits = predict_logits(model, images, "sliding", window=(16, 20))
    assert logits.shape == (1, 10, 12, 2)
    np.testing.assert_array_equal(logits.numpy(), predict_logits(model, images).numpy())
    # For a model with spatial context, the padded single window is the model run on the
    # zero-padded image, cropped back.
    context = strided_model(3)
    padded = np.pad(images, [[0, 0], [0, 6], [0, 8], [0, 0]])
    np.testing.assert_allclose(
        predict_logits(context, images, "sliding", window=(16, 20)).numpy(),
        context(padded).numpy()[:, :10, :12], rtol=1e-6, atol=1e-6)


def test_sliding_window_traces_once_for_all_sizes():
    model = strided_model(3)
    fn = tf.function(lambda x: predict_logits(model, x, "sliding", window=(12, 12)),
                     input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    for size in [(20, 30), (7, 9), (12, 12)]:
        assert fn(random_images((1, *size, 3), integer=True)).shape == (1, *size, 3)
    assert fn.experimental_get_tracing_count() == 1


def test_input_size_resizes_the_image_then_the_logits_back():
    model = strided_model(3)
    images = random_images((2, 30, 50, 3), integer=True)
    logits = predict_logits(model, images, input_size=(16, 24))
    assert logits.shape == (2, 30, 50, 3)
    expected = tf.image.resize(model(tf.image.resize(images, (16, 24))), (30, 50))
    np.testing.assert_allclose(logits.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_flip_averaging():
    images = random_images((1, 14, 19, 3), integer=True)
    equivariant = pixel_model([[1, 0], [0, 1], [1, 1]])
    np.testing.assert_allclose(predict_logits(equivariant, images, flip=True).numpy(),
                               predict_logits(equivariant, images).numpy(), rtol=1e-6)
    model = strided_model(2)
    flipped_back = tf.reverse(model(tf.reverse(images, [2])), [2])
    np.testing.assert_allclose(predict_logits(model, images, flip=True).numpy(),
                               ((model(images) + flipped_back) / 2).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_named():
    model = pixel_model(np.eye(3))
    with pytest.raises(ValueError, match="mode"):
        predict_logits(model, random_images((1, 4, 4, 3)), mode="tiles")
    with pytest.raises(ValueError, match="window"):
        predict_logits(model, random_images((1, 4, 4, 3)), mode="sliding")
    with pytest.raises(ValueError, match="stride"):
        predict_logits(model, random_images((1, 4, 4, 3)), "sliding", window=4, stride=5)


# -- evaluate and reporting -------------------------------------------------------------
def colour_coded(predicted):
    """An image whose pixel-model prediction (see one_hot_model) is `predicted`."""
    return (np.eye(3)[predicted] * 255).astype(np.uint8)


def test_evaluate_gives_hand_computed_numbers_on_images_of_two_sizes(capsys):
    # Image 1 is the module's hand-checked example; image 2 (another size) adds
    # 3 pixels: gt 0 -> pred 0, gt 2 -> pred 2, gt 255 -> ignored.
    image_1, mask_1 = colour_coded(PREDICTIONS[0].clip(0, 2)), LABELS[0]
    image_2 = colour_coded(np.array([[0], [2], [1]]))
    mask_2 = np.array([[0], [2], [255]], np.uint8)
    dataset = tf.data.Dataset.from_generator(
        lambda: iter([{"image": image_1, "mask": mask_1}, {"image": image_2, "mask": mask_2}]),
        output_signature={"image": tf.TensorSpec([None, None, 3], tf.uint8),
                          "mask": tf.TensorSpec([None, None], tf.uint8)})
    names = ["background", "disc", "ring", "square"]
    result = evaluate(one_hot_model(), dataset, 4, names, progress=True)
    assert "mean_iou" in capsys.readouterr().out  # the progress bar
    cm = EXPECTED_CM + np.diag([1, 0, 1, 0])
    np.testing.assert_array_equal(result["confusion_matrix"], cm)
    assert result["per_class_iou"] == pytest.approx(
        {"background": 2 / 5, "disc": 2 / 4, "ring": 2 / 3, "square": None})
    assert result["mean_iou"] == pytest.approx((2 / 5 + 2 / 4 + 2 / 3) / 3)
    assert result["pixel_accuracy"] == pytest.approx(6 / 9)
    assert result["num_images"] == 2
    assert result["mode"] == "whole image"


def test_evaluate_batched_sliding_and_resized_modes_agree_for_a_pixelwise_model():
    rng = np.random.default_rng(4)
    predicted = rng.integers(0, 3, (4, 20, 24))
    masks = rng.integers(0, 3, (4, 20, 24)).astype(np.uint8)
    dataset = tf.data.Dataset.from_tensor_slices(
        {"id": [str(i) for i in range(4)], "image": colour_coded(predicted), "mask": masks})
    expected = mean_iou_from_confusion(confusion_from_labels(masks, predicted, 4))
    model = one_hot_model()
    batched = evaluate(model, dataset.batch(2), 4, progress=False)
    sliding = evaluate(model, dataset, 4, mode="sliding", window=(8, 8), progress=False)
    assert batched["mean_iou"] == pytest.approx(expected)
    assert sliding["mean_iou"] == pytest.approx(expected)
    assert batched["num_images"] == sliding["num_images"] == 4
    assert sliding["mode"] == "sliding window 8x8, stride 5x5"
    resized = evaluate(model, dataset, 4, input_size=(10, 12), flip=True, progress=False)
    assert resized["mode"] == ("whole image at 10x12 input, logits resized to label size, "
                               "with horizontal flip averaging")
    assert 0.0 <= resized["mean_iou"] <= 1.0


def test_evaluate_rejects_wrong_class_names():
    dataset = tf.data.Dataset.from_tensor_slices(
        {"image": np.zeros((1, 4, 4, 3), np.uint8), "mask": np.zeros((1, 4, 4), np.uint8)})
    with pytest.raises(ValueError, match="2 class names"):
        evaluate(one_hot_model(), dataset, 4, ["a", "b"], progress=False)


def test_format_iou_table():
    result = {"mean_iou": 0.5, "pixel_accuracy": 0.875, "num_images": 3, "mode": "whole image",
              "per_class_iou": {"background": 0.75, "disc": 0.25, "ring": None}}
    table = format_iou_table(result, ["background", "disc", "ring"])
    lines = table.splitlines()
    assert lines[0].split() == ["class", "IoU", "%"]
    assert lines[2].split() == ["background", "75.0"]
    assert lines[3].split() == ["disc", "25.0"]
    assert lines[4].split() == ["ring", "n/a"]
    assert "mean IoU" in table and lines[6].split()[-1] == "50.0"
    assert lines[7].split()[-1] == "87.5"
    assert "whole image; 3 images" in table
    assert describe_mode("sliding", window=(512, 1024)) == \
        "sliding window 512x1024, stride 341x683"


def test_class_shares_from_confusion_by_hand():
    # rows truth, columns prediction: 8 "a" pixels (2 called "b"), 4 "b" pixels (1 called
    # "a"), no "c" pixel at all.
    cm = [[6, 2, 0], [1, 3, 0], [0, 0, 0]]
    truth, predicted, top, top_share = class_shares_from_confusion(cm)
    np.testing.assert_allclose(truth, [8 / 12, 4 / 12, 0.0])
    np.testing.assert_allclose(predicted, [7 / 12, 5 / 12, 0.0])
    assert list(top) == [1, 0, -1]
    np.testing.assert_allclose(top_share, [2 / 8, 1 / 4, 0.0])


def test_class_shares_of_a_perfect_prediction_name_no_confusion():
    truth, predicted, top, top_share = class_shares_from_confusion(np.diag([5, 3]))
    np.testing.assert_allclose(truth, predicted)
    assert list(top) == [-1, -1] and list(top_share) == [0.0, 0.0]


def test_format_iou_table_with_confusion_columns():
    result = {"mean_iou": 0.5, "per_class_iou": {"a": 0.6, "b": 0.5, "c": None},
              "confusion_matrix": [[6, 2, 0], [1, 3, 0], [0, 0, 0]]}
    lines = format_iou_table(result, ["a", "b", "c"]).splitlines()
    assert lines[0].split() == ["class", "IoU", "%", "true", "%", "pred", "%", "mistaken", "for"]
    assert lines[2].split() == ["a", "60.0", "66.7", "58.3", "b", "25.0%"]
    assert lines[3].split() == ["b", "50.0", "33.3", "41.7", "a", "25.0%"]
    assert lines[4].split() == ["c", "n/a", "0.0", "0.0", "-"]
    with pytest.raises(ValueError, match="shape"):
        format_iou_table(dict(result, confusion_matrix=[[1]]), ["a", "b", "c"])
