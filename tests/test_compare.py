"""Comparing segmenters: confidence, entropy and pairwise agreement against numpy."""

import numpy as np
import pytest
import tensorflow as tf

from kssl.compare import check_same_classes, compare_predictions, format_comparison
from tiny import pixel_model

KERNELS = {"a": [[0.02, -0.01, 0.0, 0.01], [0.0, 0.02, -0.02, 0.0], [-0.01, 0.0, 0.02, 0.01]],
           "b": [[0.01, 0.0, -0.01, 0.02], [0.02, 0.01, 0.0, -0.02], [0.0, -0.01, 0.02, 0.0]],
           "c": [[0.0, 0.0, 0.0, 0.0]] * 3}  # uniform probabilities: argmax 0 everywhere


def labelled_images(seed=0):
    """Two images of different sizes with random masks, some pixels ignored (255)."""
    rng = np.random.default_rng(seed)
    elements = []
    for shape in [(5, 7), (4, 3)]:
        image = rng.integers(0, 256, (*shape, 3)).astype(np.uint8)
        mask = rng.integers(0, 4, shape).astype(np.uint8)
        mask[rng.random(shape) < 0.2] = 255
        elements.append({"image": image, "mask": mask})
    return elements


def as_dataset(elements):
    return tf.data.Dataset.from_generator(
        lambda: iter(elements),
        output_signature={"image": tf.TensorSpec([None, None, 3], tf.uint8),
                          "mask": tf.TensorSpec([None, None], tf.uint8)})


def numpy_probabilities(kernel, elements):
    """Softmax of each labelled pixel's logits (pixel @ kernel), and the labels."""
    pixels = np.concatenate([e["image"][e["mask"] != 255] for e in elements]).astype(np.float64)
    labels = np.concatenate([e["mask"][e["mask"] != 255] for e in elements]).astype(int)
    logits = pixels @ np.asarray(kernel, np.float64)
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True), labels


def test_statistics_and_agreement_match_numpy():
    elements = labelled_images()
    networks = {name: (pixel_model(kernel), {}) for name, kernel in KERNELS.items()}
    result = compare_predictions(networks, as_dataset(elements))

    expected = {name: numpy_probabilities(kernel, elements) for name, kernel in KERNELS.items()}
    labels = expected["a"][1]
    assert result["pixels"] == labels.size
    for name, (p, _) in expected.items():
        stats = result["networks"][name]
        assert stats["confidence"] == pytest.approx(p.max(-1).mean(), rel=1e-4)
        assert stats["entropy"] == pytest.approx(-(p * np.log(p)).sum(-1).mean(), rel=1e-4)
        assert stats["pixel_accuracy"] == pytest.approx((p.argmax(-1) == labels).mean())
    # The uniform network: confidence 1/4, entropy log 4.
    assert result["networks"]["c"]["entropy"] == pytest.approx(np.log(4), rel=1e-5)

    assert [(p["first"], p["second"]) for p in result["pairs"]] == [
        ("a", "b"), ("a", "c"), ("b", "c")]
    for pair in result["pairs"]:
        first = expected[pair["first"]][0].argmax(-1)
        second = expected[pair["second"]][0].argmax(-1)
        differ = first != second
        assert 0 < differ.sum() < labels.size  # the example exercises both cases
        assert pair["agreement"] == pytest.approx(1 - differ.mean())
        assert pair["first_right"] == pytest.approx(
            (differ & (first == labels)).sum() / differ.sum())
        assert pair["second_right"] == pytest.approx(
            (differ & (second == labels)).sum() / differ.sum())
        assert pair["neither_right"] == pytest.approx(
            (differ & (first != labels) & (second != labels)).sum() / differ.sum())

    text = format_comparison(result)
    assert f"{100 * result['pairs'][0]['agreement']:.1f} % of {labels.size}" in text
    assert f"{result['networks']['c']['entropy']:.3f}" in text


def test_a_network_agrees_with_itself_and_its_evaluation_settings_apply():
    elements = labelled_images(seed=1)
    model = pixel_model(KERNELS["a"])
    # The same model run on a 2x smaller input and resized back (evaluation.input_size)
    # is a different predictor: it must not be scored as the model at full size.
    result = compare_predictions({"full": (model, {}), "same": (model, {}),
                                  "small": (model, {"input_size": (2, 2)})},
                                 as_dataset(elements))
    same = result["pairs"][0]
    assert (same["first"], same["second"], same["agreement"]) == ("full", "same", 1.0)
    assert result["pairs"][1]["agreement"] < 1.0


def test_bad_input_is_named():
    unlabelled = [{"image": np.zeros((2, 2, 3), np.uint8), "mask": np.full((2, 2), 255,
                                                                           np.uint8)}]
    with pytest.raises(ValueError, match="no labelled pixels"):
        compare_predictions({"a": (pixel_model(KERNELS["a"]), {})}, as_dataset(unlabelled))
    with pytest.raises(ValueError, match="at least one network"):
        compare_predictions({}, as_dataset(unlabelled))
    with pytest.raises(ValueError, match="runs/b predicts classes"):
        check_same_classes([["sky", "road"], ["sky", "car"]], ["runs/a", "runs/b"])
