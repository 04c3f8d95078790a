"""Comparing trained segmenters on one labelled dataset: how confident each is, and where
two of them disagree, pixel by pixel.

Two runs with close mIoU can still make different decisions (a method that changed the
network) or the same ones (a method whose extra terms did not move it); the mIoU alone
cannot tell these apart. `compare_predictions` counts, over the labelled pixels, each
network's mean confidence (maximum softmax probability), mean entropy and accuracy, and for
every pair the share of pixels on which their argmax agrees and, where it does not, which
of the two is right.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from kssl.constants import IGNORE_LABEL
from kssl.evaluation import resize_logits_to, predict_logits


class _Sums:
    """Running sums of one network's statistics over labelled pixels."""

    def __init__(self):
        self.confidence = self.entropy = self.correct = 0.0


def compare_predictions(networks: Mapping[str, tuple], dataset: tf.data.Dataset,
                        ignore_label: int = IGNORE_LABEL) -> dict:
    """Confidence and pairwise agreement of several segmenters over a dataset.

    Args:
      networks: {name: (model, evaluation settings)}, the settings being the keyword
        arguments of `evaluation.predict_logits` (mode, window, stride, input_size, flip),
        so each network is run as it is evaluated. Logits are resized to the mask size.
      dataset: {"image", "mask"} elements, unbatched [H, W, 3] or batched.
      ignore_label: mask value of pixels that are not counted.

    Returns a dict: "pixels" (labelled pixels counted), "networks" ({name: {"confidence",
    "entropy" (nats), "pixel_accuracy"}}, means over those pixels) and "pairs" (a list of
    {"first", "second", "agreement", "first_right", "second_right", "neither_right"}: the
    share of pixels with equal argmax, and of the disagreeing pixels, the shares on which
    only the first, only the second, or neither matches the label).
    """
    if len(networks) < 1:
        raise ValueError("compare_predictions needs at least one network")
    spec = dataset.element_spec
    if not (isinstance(spec, dict) and "image" in spec and "mask" in spec):
        raise ValueError(f"compare_predictions: expected {{'image', 'mask'}} elements, got {spec}")
    if spec["image"].shape.rank == 3:
        dataset = dataset.batch(1)
    names = list(networks)
    predictors = {name: _predictor(model, settings)
                  for name, (model, settings) in networks.items()}
    sums = {name: _Sums() for name in names}
    pairs = list(itertools.combinations(names, 2))
    # Per pair: [agree, only first right, only second right, neither right] pixel counts.
    pair_counts = {pair: np.zeros(4, np.float64) for pair in pairs}
    pixels = 0
    for element in dataset:
        masks = element["mask"]
        if masks.shape.rank == 4:
            masks = masks[..., 0]
        masks = tf.cast(masks, tf.int32)
        labelled = (masks != ignore_label).numpy()
        truth = masks.numpy()[labelled]
        pixels += truth.size
        classes = {}
        for name in names:
            probabilities = predictors[name](element["image"], tf.shape(masks)[1:3]).numpy()
            probabilities = probabilities[labelled]  # [pixels, C]
            classes[name] = probabilities.argmax(axis=-1)
            entropy = -np.sum(probabilities * np.log(np.maximum(probabilities, 1e-12)), -1)
            sums[name].confidence += float(probabilities.max(axis=-1).sum())
            sums[name].entropy += float(entropy.sum())
            sums[name].correct += float((classes[name] == truth).sum())
        for first, second in pairs:
            a, b = classes[first], classes[second]
            differ = a != b
            pair_counts[first, second] += [
                np.sum(~differ), np.sum(differ & (a == truth)), np.sum(differ & (b == truth)),
                np.sum(differ & (a != truth) & (b != truth))]
    if pixels == 0:
        raise ValueError("compare_predictions: the dataset has no labelled pixels")
    result = {"pixels": pixels, "networks": {}, "pairs": []}
    for name in names:
        result["networks"][name] = {"confidence": sums[name].confidence / pixels,
                                    "entropy": sums[name].entropy / pixels,
                                    "pixel_accuracy": sums[name].correct / pixels}
    for (first, second), counts in pair_counts.items():
        disagreeing = max(pixels - counts[0], 1.0)
        result["pairs"].append({
            "first": first, "second": second, "agreement": counts[0] / pixels,
            "first_right": counts[1] / disagreeing, "second_right": counts[2] / disagreeing,
            "neither_right": counts[3] / disagreeing})
    return result


def _predictor(model, settings: dict):
    """A tf.function: softmax probabilities of `model` at a given mask size."""

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.float32), tf.TensorSpec([2], tf.int32)])
    def probabilities(images, size):
        logits = predict_logits(model, images, **settings)
        return tf.nn.softmax(resize_logits_to(logits, size))

    return lambda images, size: probabilities(tf.cast(images, tf.float32), size)


def format_comparison(result: dict) -> str:
    """The comparison as text: one line per network, then one line per pair."""
    names = list(result["networks"])
    width = max(len("network"), *(len(name) for name in names))
    lines = [f"{'network':<{width}}  confidence  entropy (nats)  pixel accuracy",
             f"{'-' * width}  ----------  --------------  --------------"]
    for name in names:
        stats = result["networks"][name]
        lines.append(f"{name:<{width}}  {stats['confidence']:10.3f}  {stats['entropy']:14.3f}  "
                     f"{100 * stats['pixel_accuracy']:13.1f}%")
    for pair in result["pairs"]:
        lines.append(
            f"{pair['first']} vs {pair['second']}: same class on "
            f"{100 * pair['agreement']:.1f} % of {result['pixels']} labelled pixels; where "
            f"they differ, the first is right on {100 * pair['first_right']:.1f} %, the "
            f"second on {100 * pair['second_right']:.1f} %, neither on "
            f"{100 * pair['neither_right']:.1f} %")
    return "\n".join(lines)


def check_same_classes(class_lists: Sequence[Sequence[str]], names: Sequence[str]) -> None:
    """Raises a ValueError unless every run predicts the same classes in the same order."""
    for name, classes in zip(names[1:], class_lists[1:]):
        if list(classes) != list(class_lists[0]):
            raise ValueError(f"{name} predicts classes {list(classes)}, but {names[0]} "
                             f"predicts {list(class_lists[0])}: runs compared must share "
                             "their classes")
