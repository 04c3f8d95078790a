"""Segmentation evaluation: a streaming confusion-matrix metric, inference modes and reports.

One definition of IoU serves everything: the numpy functions `iou_from_confusion`,
`mean_iou_from_confusion` and `pixel_accuracy_from_confusion` are the reference, and the
Keras metric `ConfusionMatrix` computes the same numbers in-graph for `model.evaluate`.

Conventions (the same everywhere in kssl):
  * rows of a confusion matrix are ground truth, columns are predictions;
  * pixels labelled `IGNORE_LABEL` (255) are not counted at all;
  * a class absent from both the ground truth and the predictions has an undefined IoU
    (NaN per class, None in `evaluate` reports) and is left out of the mean, so a
    validation set that happens to lack a class is not penalised for it. A class present
    in the ground truth but never predicted (or predicted but absent) has IoU 0 and counts.
  * IoU values are fractions in [0, 1]; only `format_iou_table` shows percent.
"""

from __future__ import annotations

import math
import sys
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from kssl.constants import IGNORE_LABEL

MODES = ("whole", "sliding")


# -- numpy reference ------------------------------------------------------------------
def confusion_from_labels(labels, predictions, num_classes: int,
                          ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """The [C, C] int64 confusion matrix of integer label and prediction arrays (numpy).

    Pixels whose label is `ignore_label` (or outside [0, num_classes)) are not counted.
    """
    labels = np.asarray(labels).astype(np.int64).ravel()
    predictions = np.asarray(predictions).astype(np.int64).ravel()
    if labels.shape != predictions.shape:
        raise ValueError(f"labels have {labels.size} pixels but predictions {predictions.size}")
    keep = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    keep &= (predictions >= 0) & (predictions < num_classes)
    flat = labels[keep] * num_classes + predictions[keep]
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def iou_from_confusion(cm) -> np.ndarray:
    """Per-class IoU (fractions, float64 [C]) of a confusion matrix; NaN where a class is
    absent from both ground truth and predictions."""
    cm = np.asarray(cm, np.float64)
    true_positive = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / np.where(union > 0, union, 1), np.nan)


def mean_iou_from_confusion(cm) -> float:
    """Mean IoU over the classes whose IoU is defined; 0.0 when no pixel was counted."""
    iou = iou_from_confusion(cm)
    defined = ~np.isnan(iou)
    return float(iou[defined].mean()) if defined.any() else 0.0


def pixel_accuracy_from_confusion(cm) -> float:
    """Fraction of counted pixels predicted correctly; 0.0 when no pixel was counted."""
    cm = np.asarray(cm, np.float64)
    total = cm.sum()
    return float(np.trace(cm) / total) if total > 0 else 0.0


def class_shares_from_confusion(cm):
    """Where each class's pixels go, from a confusion matrix (numpy).

    Returns (truth_share, predicted_share, top_confusion, top_confusion_share), each [C]:
    the share of all counted pixels that are class c in the ground truth and in the
    predictions; and, among the other classes, the one that class c's true pixels are most
    often predicted as and the share of c's true pixels it takes (-1 and 0.0 when class c
    has no true pixel or none of them is mistaken). A predicted share far above the truth
    share, with a neighbour mistaken for the class, is how confirmation bias shows: the
    larger class absorbs the one it is confused with.
    """
    cm = np.asarray(cm, np.float64)
    total = cm.sum()
    scale = 1.0 / total if total > 0 else 0.0
    truth_share = cm.sum(axis=1) * scale
    predicted_share = cm.sum(axis=0) * scale
    off_diagonal = cm - np.diag(np.diag(cm))
    top = np.argmax(off_diagonal, axis=1)
    row_total = cm.sum(axis=1)
    top_count = off_diagonal[np.arange(len(cm)), top]
    top_share = np.where(row_total > 0, top_count / np.where(row_total > 0, row_total, 1), 0.0)
    top = np.where(top_count > 0, top, -1)
    return truth_share, predicted_share, top, top_share


# -- streaming Keras metric -----------------------------------------------------------
class ConfusionMatrix(keras.metrics.Metric):
    """Streaming [C, C] confusion matrix (rows ground truth, columns prediction); its
    `result()` is the mean IoU as a fraction.

    `update_state(labels, predictions)` takes labels [B, H, W] (or [B, H, W, 1]) and either
    logits/probabilities [B, H, W, C] (argmax is taken) or class ids shaped like the
    labels. Pixels labelled `ignore_label`, and labels outside [0, C) (which data
    validation reports separately), are not counted. An optional `sample_weight`
    broadcastable to the labels weights each pixel (0 excludes it).

    Counts are kept in a float64 variable, exact up to 2**53 pixels per cell (float32 would
    stop counting at 2**24, about 8 Cityscapes images). The variable is created with
    SUM aggregation and on-read synchronisation, so under `tf.distribute` each replica
    counts its own pixels and reading the metric in cross-replica context sums them.

    A class absent from both ground truth and predictions is left out of the mean (see the
    module docstring); with nothing counted at all the result is 0.0.
    """

    def __init__(self, num_classes: int, ignore_label: int = IGNORE_LABEL,
                 name: str = "mean_iou", dtype=None):
        super().__init__(name=name, dtype=dtype)
        if int(num_classes) < 1:
            raise ValueError(f"ConfusionMatrix: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.confusion = self.add_variable(
            shape=(self.num_classes, self.num_classes), initializer="zeros",
            dtype="float64", aggregation="sum", name="confusion")

    def update_state(self, labels, predictions, sample_weight=None):
        """Adds one batch of labels and predictions (class ids or logits) to the counts."""
        counts = batch_confusion(labels, predictions, self.num_classes, self.ignore_label,
                                 sample_weight)
        self.confusion.assign_add(counts)

    def result(self):
        """Mean IoU (a fraction) over the classes with a defined IoU."""
        cm = tf.convert_to_tensor(self.confusion)
        true_positive = tf.linalg.diag_part(cm)
        union = tf.reduce_sum(cm, 0) + tf.reduce_sum(cm, 1) - true_positive
        defined = union > 0
        iou = tf.math.divide_no_nan(true_positive, union)
        num_defined = tf.reduce_sum(tf.cast(defined, tf.float64))
        mean = tf.math.divide_no_nan(tf.reduce_sum(tf.where(defined, iou, 0.0)), num_defined)
        return tf.cast(mean, self.dtype)

    # Eager helpers for reports; they read the (replica-summed) counts.
    def confusion_matrix(self) -> np.ndarray:
        """The accumulated counts as an int64 numpy array [C, C]."""
        return np.rint(keras.ops.convert_to_numpy(self.confusion)).astype(np.int64)

    def per_class_iou(self) -> np.ndarray:
        """Per-class IoU fractions (float64 [C]); NaN for classes absent from both."""
        return iou_from_confusion(self.confusion_matrix())

    def mean_iou(self) -> float:
        """Mean IoU fraction over classes with a defined IoU."""
        return mean_iou_from_confusion(self.confusion_matrix())

    def pixel_accuracy(self) -> float:
        """Fraction of counted pixels predicted correctly."""
        return pixel_accuracy_from_confusion(self.confusion_matrix())

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype, "num_classes": self.num_classes,
                "ignore_label": self.ignore_label}


def batch_confusion(labels, predictions, num_classes: int, ignore_label: int = IGNORE_LABEL,
                    sample_weight=None) -> tf.Tensor:
    """The float64 [C, C] confusion counts of one batch, in tf ops (XLA-compatible).

    `predictions` are logits/probabilities when they have one more dimension than the
    (squeezed) labels, else class ids.
    """
    labels = tf.convert_to_tensor(labels)
    predictions = tf.convert_to_tensor(predictions)
    if labels.shape.rank == 4 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if predictions.shape.rank == labels.shape.rank + 1:
        channels = predictions.shape[-1]
        if channels == 1 and num_classes != 1:  # class ids with a trailing axis
            predictions = predictions[..., 0]
        elif channels is not None and channels != num_classes:
            raise ValueError(f"ConfusionMatrix: predictions have {channels} channels but "
                             f"num_classes is {num_classes}")
        else:
            predictions = tf.argmax(predictions, axis=-1, output_type=tf.int32)
    if not labels.shape.is_compatible_with(predictions.shape):
        raise ValueError(f"ConfusionMatrix: labels of shape {labels.shape} do not match "
                         f"predictions of shape {predictions.shape} (expected logits "
                         "[B, H, W, C] or class ids [B, H, W])")
    if sample_weight is not None:
        sample_weight = tf.cast(tf.convert_to_tensor(sample_weight), tf.float64)
        if sample_weight.shape.rank == labels.shape.rank + 1 and sample_weight.shape[-1] == 1:
            sample_weight = sample_weight[..., 0]
        sample_weight = tf.reshape(tf.broadcast_to(sample_weight, tf.shape(labels)), [-1])
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    predictions = tf.reshape(tf.cast(predictions, tf.int32), [-1])
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    valid &= (predictions >= 0) & (predictions < num_classes)
    # Uncounted pixels go to one extra bin that is dropped: a static-size segment sum
    # instead of a boolean mask, so the op compiles under XLA and avoids a host sync.
    bins = num_classes * num_classes
    index = tf.where(valid, labels * num_classes + predictions, bins)
    if sample_weight is None:
        # int32 per batch (under 2**31 pixels) is the cheapest scatter on every device.
        counts = tf.math.unsorted_segment_sum(tf.ones_like(index), index, bins + 1)
    else:
        counts = tf.math.unsorted_segment_sum(sample_weight, index, bins + 1)
    return tf.reshape(tf.cast(counts[:bins], tf.float64), [num_classes, num_classes])


def progress_bar(target: Optional[int], **options) -> keras.utils.Progbar:
    """A Keras progress bar that redraws itself on a terminal and otherwise (a log file,
    a pipe) prints one line when it is done: Keras takes every POSIX process for a live
    display and would write each update with a carriage return into the file."""
    return keras.utils.Progbar(target, verbose=1 if sys.stdout.isatty() else 2, **options)


# -- inference ------------------------------------------------------------------------
def _pair(value, name: str):
    """(int, int) from an int or a pair of positive ints."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of "
                         f"positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def resolve_mode(mode: str = "whole", window=None, stride=None, input_size=None):
    """Checks an inference mode's arguments; returns (window, stride, input_size) as
    (h, w) pairs or None, with the default sliding stride (2/3 of the window) filled in."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    window, stride = _pair(window, "window"), _pair(stride, "stride")
    input_size = _pair(input_size, "input_size")
    if mode == "sliding":
        if window is None:
            raise ValueError("mode='sliding' needs window=(height, width)")
        if stride is None:
            stride = tuple(max(1, int(round(w * 2 / 3))) for w in window)
        if stride[0] > window[0] or stride[1] > window[1]:
            raise ValueError(f"stride {stride} is larger than window {window}: pixels "
                             "between windows would get no prediction")
    return window, stride, input_size


def _run_model(model, images):
    return tf.cast(model(images, training=False), tf.float32)


def _sliding_logits(model, images, window, stride):
    """Sums the logits of overlapping windows and divides by how many windows saw each pixel.

    Window origins along an axis are 0, s, 2s, ... with the last one clamped to L - w, so
    the final window ends exactly on the image edge. Images smaller than the window are
    padded with 0 at the bottom/right and the padding is cropped off the logits.
    """
    (wh, ww), (sh, sw) = window, stride
    shape = tf.shape(images)
    height, width = shape[1], shape[2]
    padded_h, padded_w = tf.maximum(height, wh), tf.maximum(width, ww)
    padded = tf.pad(images, [[0, 0], [0, padded_h - height], [0, padded_w - width], [0, 0]])
    rows = (padded_h - wh + sh - 1) // sh + 1
    cols = (padded_w - ww + sw - 1) // sw + 1

    def place(i):
        y = tf.minimum((i // cols) * sh, padded_h - wh)
        x = tf.minimum((i % cols) * sw, padded_w - ww)
        logits = _run_model(model, padded[:, y:y + wh, x:x + ww, :])
        if logits.shape[1] is not None and tuple(logits.shape[1:3]) != (wh, ww):
            raise ValueError(f"sliding window: model returned logits of spatial size "
                             f"{tuple(logits.shape[1:3])} for a {wh}x{ww} window; expected "
                             "logits at input size")
        paddings = [[0, 0], [y, padded_h - y - wh], [x, padded_w - x - ww], [0, 0]]
        hits = tf.pad(tf.ones([1, wh, ww, 1], tf.float32), paddings)
        return tf.pad(logits, paddings), hits

    total, count = place(0)
    any_shape = tf.TensorShape([None, None, None, None])
    _, total, count = tf.while_loop(
        lambda i, *_: i < rows * cols,
        lambda i, t, c: (i + 1, *[a + b for a, b in zip((t, c), place(i))]),
        (tf.constant(1), total, count),
        shape_invariants=(tf.TensorShape([]), any_shape, any_shape))
    return (total / count)[:, :height, :width, :]


def predict_logits(model, images, mode: str = "whole", window=None, stride=None,
                   input_size=None, flip: bool = False) -> tf.Tensor:
    """Float32 logits [B, H, W, C] of `model` for images [B, H, W, 3] (uint8 or float in
    [0, 255]), in tf ops (usable in a tf.function with unknown H and W).

    Args:
      mode: "whole" runs the model on the whole image; "sliding" tiles windows of
        `window` (h, w) every `stride` (default 2/3 of the window), the last window
        clamped to the image edge, and averages the logits where windows overlap.
      input_size: optional (h, w): the image is resized (bilinear) to it first and the
        logits are resized back to H x W (bilinear), for models trained at reduced
        resolution. Combines with either mode.
      flip: also runs on the horizontally flipped image and averages the (flipped back)
        logits.
    """
    window, stride, input_size = resolve_mode(mode, window, stride, input_size)
    images = tf.cast(tf.convert_to_tensor(images), tf.float32)
    if images.shape.rank != 4:
        raise ValueError(f"predict_logits expects images [B, H, W, 3], got shape {images.shape}")
    size = tf.shape(images)[1:3]

    def forward(x):
        if input_size is not None:
            x = tf.image.resize(x, input_size, method="bilinear")
        if mode == "sliding":
            logits = _sliding_logits(model, x, window, stride)
        else:
            logits = _run_model(model, x)
        if input_size is not None:
            logits = tf.image.resize(logits, size, method="bilinear")
        return logits

    logits = forward(images)
    if flip:
        flipped = forward(tf.reverse(images, axis=[2]))
        logits = (logits + tf.reverse(flipped, axis=[2])) / 2.0
    return logits


def describe_mode(mode: str = "whole", window=None, stride=None, input_size=None,
                  flip: bool = False) -> str:
    """A one-line description of an inference mode, for reports."""
    window, stride, input_size = resolve_mode(mode, window, stride, input_size)
    if mode == "sliding":
        text = f"sliding window {window[0]}x{window[1]}, stride {stride[0]}x{stride[1]}"
    else:
        text = "whole image"
    if input_size is not None:
        text += (f" at {input_size[0]}x{input_size[1]} input, logits resized to label size")
    if flip:
        text += ", with horizontal flip averaging"
    return text


def resize_logits_to(logits, size):
    """Bilinear resize of logits [B, h, w, C] to `size` (H, W), only where they differ."""
    same = tf.reduce_all(tf.equal(tf.shape(logits)[1:3], size))
    return tf.cond(same, lambda: logits,
                   lambda: tf.image.resize(logits, size, method="bilinear"))


def evaluate(model, dataset: tf.data.Dataset, num_classes: int,
             class_names: Optional[Sequence[str]] = None, mode: str = "whole",
             window=None, stride=None, input_size=None, flip: bool = False,
             ignore_label: int = IGNORE_LABEL, progress: bool = True) -> dict:
    """Evaluates a segmentation model on a dataset of {"image", "mask"} elements.

    The dataset holds either unbatched images [H, W, 3] (batched by 1 here, so sizes may
    vary) or batches [B, H, W, 3] of one size; masks are [(B,) H, W] class ids with
    `ignore_label` pixels. One tf.function with unknown H and W serves every size (no
    retracing). Logits are resized to the mask size when it differs from the image size.

    Returns a dict: "mean_iou" (fraction), "per_class_iou" ({class name: fraction, or None
    for a class absent from both ground truth and predictions}), "pixel_accuracy",
    "num_images", "mode" (description), "confusion_matrix" (nested lists of ints).
    """
    if class_names is None:
        class_names = [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"evaluate: {len(class_names)} class names for num_classes="
                         f"{num_classes}")
    spec = dataset.element_spec
    if isinstance(spec, dict):
        if "image" not in spec or "mask" not in spec:
            raise ValueError(f"evaluate: dataset elements need 'image' and 'mask', got keys "
                             f"{sorted(spec)}")
        dataset = dataset.map(lambda e: (e["image"], e["mask"]))
    elif not (isinstance(spec, tuple) and len(spec) == 2):
        raise ValueError(f"evaluate: expected elements {{'image', 'mask'}} or (image, mask), "
                         f"got {spec}")
    image_spec, mask_spec = dataset.element_spec
    if image_spec.shape.rank == 3:
        dataset = dataset.batch(1)
        image_spec, mask_spec = dataset.element_spec
    if image_spec.shape.rank != 4 or mask_spec.shape.rank not in (3, 4):
        raise ValueError(f"evaluate: images must be [B, H, W, 3] and masks [B, H, W], got "
                         f"{image_spec.shape} and {mask_spec.shape}")

    # Checks the mode arguments eagerly, for a clear error before any tracing.
    description = describe_mode(mode, window, stride, input_size, flip)
    metric = ConfusionMatrix(num_classes, ignore_label)

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, None, None, 3], image_spec.dtype),
        tf.TensorSpec([None] * mask_spec.shape.rank, mask_spec.dtype)])
    def step(images, masks):
        if masks.shape.rank == 4:
            masks = masks[..., 0]
        logits = predict_logits(model, images, mode, window, stride, input_size, flip)
        metric.update_state(masks, resize_logits_to(logits, tf.shape(masks)[1:3]))
        return tf.shape(images)[0]

    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    cardinality = int(dataset.cardinality())
    bar = (progress_bar(cardinality if cardinality >= 0 else None,
                        stateful_metrics=["mean_iou"], unit_name="batch")
           if progress else None)
    num_images = batches = 0
    for batches, (images, masks) in enumerate(dataset, start=1):
        num_images += int(step(images, masks))
        if bar is not None:
            bar.update(batches, values=[("mean_iou", float(metric.result()))])
    if bar is not None and bar.target is None:  # the length is known now: close the bar
        bar.target = batches
        bar.update(batches, values=[("mean_iou", float(metric.result()))], finalize=True)
    if num_images == 0:
        raise ValueError("evaluate: the dataset yielded no images")

    return dict(report_from_confusion(metric.confusion_matrix(), class_names),
                num_images=num_images, mode=description)


def report_from_confusion(cm, class_names: Sequence[str]) -> dict:
    """The scores of a [C, C] confusion matrix as `evaluate` reports them: "mean_iou",
    "per_class_iou" ({name: fraction or None}), "pixel_accuracy", "confusion_matrix"."""
    cm = np.asarray(cm, np.int64)
    return {
        "mean_iou": mean_iou_from_confusion(cm),
        "per_class_iou": {name: (None if math.isnan(v) else float(v))
                          for name, v in zip(class_names, iou_from_confusion(cm))},
        "pixel_accuracy": pixel_accuracy_from_confusion(cm),
        "confusion_matrix": cm.tolist(),
    }


def format_iou_table(result: dict, class_names: Optional[Sequence[str]] = None) -> str:
    """A plain-text table of per-class IoU in percent (one decimal), then the mean IoU and
    pixel accuracy. Classes with an undefined IoU show "n/a".

    When `result` holds a "confusion_matrix" (rows in `class_names` order), three more
    columns say where each class's pixels go: its share of the true pixels ("true %"), its
    share of the predictions ("pred %"), and the class its true pixels are most often
    predicted as, with the share of them ("mistaken for").
    """
    per_class = result["per_class_iou"]
    names = list(class_names) if class_names is not None else list(per_class)
    missing = [n for n in names if n not in per_class]
    if missing:
        raise ValueError(f"format_iou_table: no IoU for class(es) {missing}")
    width = max([len("mean IoU"), len("pixel accuracy")] + [len(n) for n in names])
    shares = None
    if result.get("confusion_matrix") is not None:
        cm = np.asarray(result["confusion_matrix"])
        if cm.shape != (len(names), len(names)):
            raise ValueError(f"format_iou_table: confusion matrix of shape {cm.shape} for "
                             f"{len(names)} classes")
        shares = class_shares_from_confusion(cm)

    def line(label, value):
        shown = "n/a" if value is None else f"{100.0 * value:.1f}"
        return f"{label:<{width}}  {shown:>6}"

    def class_line(i, name):
        text = line(name, per_class[name])
        if shares is None:
            return text
        truth, predicted, top, top_share = (column[i] for column in shares)
        mistaken = f"{names[top]} {100.0 * top_share:.1f}%" if top >= 0 else "-"
        return f"{text}  {100.0 * truth:>6.1f}  {100.0 * predicted:>6.1f}  {mistaken}"

    header = f"{'class':<{width}}  {'IoU %':>6}"
    if shares is not None:
        header += f"  {'true %':>6}  {'pred %':>6}  mistaken for"
    rule = "-" * len(header)
    lines = [header, rule]
    lines += [class_line(i, name) for i, name in enumerate(names)]
    lines.append(rule)
    lines.append(line("mean IoU", result["mean_iou"]))
    if "pixel_accuracy" in result:
        lines.append(line("pixel accuracy", result["pixel_accuracy"]))
    if result.get("mode"):
        lines.append(f"({result['mode']}; {result.get('num_images', '?')} images)")
    return "\n".join(lines)
