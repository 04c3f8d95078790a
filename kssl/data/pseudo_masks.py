"""Stored pseudo-masks: class-id maps written by one training stage, read by the next.

A store is a folder of 8-bit greyscale PNGs (one class id per pixel) plus `index.json`,
which maps each example id to its file. Ids are the pipeline's stable example ids, so any
id (with slashes, spaces, ...) works; files are numbered.

Writing is atomic: files go to `<folder>.partial/`, the index is written last, and the
folder is renamed into place. A folder that exists with its index is complete; a crash
leaves at most a `.partial` folder, which the next attempt clears.

Pseudo-masks are made at the resolution the training pipeline loads images at (after
`pipeline.resize`), from full, un-cropped images, so the next stage's pipeline can attach
each one by id before cropping, scaling and flipping it together with its image.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Collection, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from kssl import evaluation
from kssl.data import transforms
from kssl.constants import IGNORE_LABEL, PSEUDO_MASK_KEY
from kssl.data.examples import Examples
from kssl.data.readers.base import DataError, Reader
from kssl.methods import pseudo_label_controls

INDEX = "index.json"
KEY = PSEUDO_MASK_KEY  # the example key the pipeline attaches a stored mask under


class PseudoMaskStore:
    """A folder of stored pseudo-masks (see the module docstring)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._index = None
        self._files = None

    @property
    def complete(self) -> bool:
        """Whether the whole set was written (the index exists)."""
        return os.path.exists(os.path.join(self.directory, INDEX))

    @property
    def index(self) -> dict:
        """The parsed index.json: {"ids": [...], "files": [...], "num_classes": C, ...}."""
        if self._index is None:
            if not self.complete:
                raise DataError(f"no complete pseudo-mask set in {self.directory} "
                                f"({INDEX} is missing)")
            with open(os.path.join(self.directory, INDEX)) as f:
                self._index = json.load(f)
        return self._index

    @property
    def ids(self) -> list:
        return list(self.index["ids"])

    def load(self, example_id: str) -> np.ndarray:
        """The stored mask of `example_id`, uint8 [H, W]."""
        index = self.index
        if self._files is None:
            self._files = dict(zip(index["ids"], index["files"]))
        path = os.path.join(self.directory, self._files[example_id])
        return tf.io.decode_png(tf.io.read_file(path), channels=1)[..., 0].numpy()

    def check_matches(self, num_classes: int, resize) -> None:
        """Fails when the set was made for another class count or training resolution."""
        index = self.index
        stored_resize = index.get("resize")
        wanted = None if resize is None else list(resize)
        if index.get("num_classes") != num_classes or stored_resize != wanted:
            raise DataError(
                f"the pseudo-masks in {self.directory} were made for {index.get('num_classes')}"
                f" classes at pipeline.resize = {stored_resize}; this run has {num_classes} "
                f"classes at {wanted}")

    def check_covers(self, examples: Examples, what: str) -> None:
        """Fails, naming a few ids, when any of `examples` has no stored mask."""
        stored = set(self.index["ids"])
        missing = [i for i in examples.ids if i not in stored]
        if missing:
            raise DataError(f"{len(missing)} {what} example(s) have no pseudo-mask in "
                            f"{self.directory}: {missing[:5]}")

    def attach(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        """Adds the stored mask of each element's id as uint8 [H, W] under `KEY`."""
        index = self.index
        paths = [os.path.join(self.directory, name) for name in index["files"]]
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(index["ids"]), tf.constant(paths)),
            default_value="")

        def add(example):
            path = table.lookup(example["id"])
            found = tf.debugging.assert_greater(
                tf.strings.length(path), 0,
                message=f"an example id has no pseudo-mask in {self.directory}")
            with tf.control_dependencies([found]):
                mask = tf.io.decode_png(tf.io.read_file(path), channels=1)[..., 0]
            # A mask made at another resolution would be cropped out of line with its image.
            same_size = tf.debugging.assert_equal(
                tf.shape(mask), tf.shape(example["image"])[:2],
                message=f"a pseudo-mask in {self.directory} differs in size from its image "
                        "(made with another pipeline.resize?)")
            with tf.control_dependencies([same_size]):
                mask = tf.identity(mask)
            return {**example, KEY: mask}

        return ds.map(add, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _same_size_batches(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Batches of equal-size images (no padding, which would change predictions)."""

    def size_key(example):
        shape = tf.shape(example["image"], out_type=tf.int64)
        return shape[0] * 100_000 + shape[1]

    return ds.group_by_window(size_key, lambda _, window: window.batch(batch_size),
                              window_size=batch_size)


def _label_function(network: keras.Model, confidence_threshold: Optional[float] = None):
    """images -> (the argmax of `network`, whether the softmax confidence reaches
    `confidence_threshold`: every pixel when it is None)."""
    def labels_of(images):
        probs = tf.nn.softmax(tf.cast(network(images, training=False), tf.float32))
        labels = tf.argmax(probs, axis=-1, output_type=tf.int32)
        return labels, tf.reduce_max(probs, -1) >= (confidence_threshold or 0.0)

    return tf.function(labels_of, reduce_retracing=True)


def _predicted_batches(predict, reader: Reader, examples: Examples, resize, batch_size,
                       with_masks: bool = False):
    """(ids, (argmax uint8 [B, H, W], confident bool [B, H, W]), ground truth [B, H, W] or
    None) per batch of `examples`, loaded at the training pipeline's resolution."""
    ds = reader.load(examples, with_masks=with_masks)
    if resize is not None:
        ds = ds.map(lambda e: transforms.resize(e, resize), num_parallel_calls=tf.data.AUTOTUNE)
    for batch in _same_size_batches(ds, batch_size).prefetch(tf.data.AUTOTUNE):
        argmax, confident = predict(tf.cast(batch["image"], tf.float32))
        ids = [example_id.decode() for example_id in batch["id"].numpy()]
        yield (ids, (argmax.numpy().astype(np.uint8), confident.numpy()),
               batch["mask"].numpy() if with_masks else None)


def write_pseudo_masks(directory: str, network: keras.Model, reader: Reader,
                       pools: Sequence[tuple], num_classes: int,
                       resize: Optional[Sequence[int]] = None, batch_size: int = 8,
                       progress: bool = True,
                       confidence_threshold: Optional[float] = None,
                       dropped_ids: Optional[Collection[str]] = None,
                       notes: Optional[dict] = None) -> dict:
    """Predicts and stores the argmax of `network` on every example of `pools`.

    Args:
      directory: the store's folder (must not hold a complete set already).
      network: images [B, H, W, 3] in [0, 255] -> logits [B, H, W, C].
      reader: decodes the examples.
      pools: (name, Examples) pairs, e.g. ("labelled", ...), ("unlabelled", ...); a pool
        whose examples all have ground-truth masks gets its pseudo-masks scored.
      resize: the training pipeline's `resize`, so masks match the images it loads.
      confidence_threshold: store the ignore label (255) where the network's softmax
        confidence is below this, so self-training learns only the confident pixels
        (None: every pixel keeps its argmax, as the three-stage paper).
      dropped_ids: examples whose masks are stored all-ignore, so the next stage learns
        nothing from them (e.g. the images ST++'s selection finds unreliable).
      notes: entries the report starts from (stored with the scores in the index).
    Returns {"<name>_mean_iou": ..., "<name>_pixel_accuracy": ...,
    "<name>_confusion_matrix": ..., "<name>_kept_share": ...} for each scored pool
    (the stored pseudo-masks against ground truth at the stored resolution, over the kept
    pixels; matrix rows are the true class; the share of pixels kept) and "num_masks".
    With `dropped_ids`, also "<name>_dropped_images" per pool and, for a scored pool with
    dropped images, "<name>_dropped_mean_iou" and "<name>_dropped_pixel_accuracy": the
    masks they would have had (its "<name>_mean_iou" then covers the kept images).
    A scored pool also gets "<name>_argmax_mean_iou" and "<name>_argmax_pixel_accuracy":
    the network's argmax at every pixel of every image, before the confidence filter and
    the dropped images, so that the masks of two stages compare on the same pixels
    whatever each of them kept.
    """
    if num_classes > 255:
        raise ValueError(f"pseudo-masks are stored as 8-bit class ids (255 = ignore); "
                         f"{num_classes} classes do not fit")
    all_ids = [i for _, examples in pools for i in examples.ids]
    if len(set(all_ids)) != len(all_ids):
        raise DataError("pseudo-masks: the pools share example ids; each id must be unique")
    partial = directory.rstrip("/") + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)
    os.makedirs(partial)
    predict = _label_function(network, confidence_threshold)
    dropped_ids = None if dropped_ids is None else set(dropped_ids)
    total = sum(len(examples) for _, examples in pools)
    bar = evaluation.progress_bar(total, unit_name="image") if progress else None
    ids, files, report = [], [], dict(notes or {})
    for name, examples in pools:
        scored = examples.has_masks
        confusion = np.zeros((num_classes, num_classes), np.int64)
        dropped_confusion = np.zeros_like(confusion)
        argmax_confusion = np.zeros_like(confusion)
        kept = pixels = dropped = 0
        for batch_ids, (argmax, confident), truth in _predicted_batches(
                predict, reader, examples, resize, batch_size, with_masks=scored):
            labels = np.where(confident, argmax, np.uint8(IGNORE_LABEL))
            drop = np.array([dropped_ids is not None and i in dropped_ids for i in batch_ids])
            stored = np.where(drop[:, None, None], np.uint8(IGNORE_LABEL), labels)
            dropped += int(drop.sum())
            kept += int(np.sum(stored != IGNORE_LABEL))
            pixels += stored.size
            for mask, example_id in zip(stored, batch_ids):
                file_name = f"{len(ids):06d}.png"
                tf.io.write_file(os.path.join(partial, file_name),
                                 tf.io.encode_png(mask[..., None]))
                ids.append(example_id)
                files.append(file_name)
            if scored:  # all-ignore masks count no pixel
                confusion += evaluation.confusion_from_labels(truth, stored, num_classes)
                dropped_confusion += evaluation.confusion_from_labels(
                    truth[drop], labels[drop], num_classes)
                argmax_confusion += evaluation.confusion_from_labels(truth, argmax, num_classes)
            if bar is not None:
                bar.add(len(labels))
        if scored:
            report[f"{name}_mean_iou"] = evaluation.mean_iou_from_confusion(confusion)
            report[f"{name}_pixel_accuracy"] = evaluation.pixel_accuracy_from_confusion(
                confusion)
            report[f"{name}_confusion_matrix"] = confusion.tolist()
            report[f"{name}_kept_share"] = kept / max(pixels, 1)
            report[f"{name}_argmax_mean_iou"] = evaluation.mean_iou_from_confusion(
                argmax_confusion)
            report[f"{name}_argmax_pixel_accuracy"] = (
                evaluation.pixel_accuracy_from_confusion(argmax_confusion))
        if dropped_ids is not None:
            report[f"{name}_dropped_images"] = dropped
            if scored and dropped:
                report[f"{name}_dropped_mean_iou"] = evaluation.mean_iou_from_confusion(
                    dropped_confusion)
                report[f"{name}_dropped_pixel_accuracy"] = (
                    evaluation.pixel_accuracy_from_confusion(dropped_confusion))
    report["num_masks"] = len(ids)
    with open(os.path.join(partial, INDEX), "w") as f:
        json.dump({"ids": ids, "files": files, "num_classes": num_classes,
                   "resize": None if resize is None else list(resize), "scores": report}, f)
    if os.path.exists(directory):  # an incomplete leftover without an index
        shutil.rmtree(directory)
    os.replace(partial, directory)
    return report


def stability_against(snapshots: Sequence[PseudoMaskStore], network: keras.Model,
                      reader: Reader, examples: Examples, num_classes: int,
                      resize: Optional[Sequence[int]] = None, batch_size: int = 8) -> tuple:
    """ST++'s reliability of each of `examples`: (ids, scores), the mean IoU between the
    argmax of `network` (the final checkpoint) and the masks each of `snapshots` (earlier
    checkpoints' argmax) stores, averaged over the snapshots (see
    `pseudo_label_controls.stability_scores`; no snapshot scores every image 0)."""
    predict = _label_function(network)
    ids, scores = [], []
    for batch_ids, (labels, _), _ in _predicted_batches(predict, reader, examples, resize,
                                                        batch_size):
        earlier = [np.stack([store.load(i) for i in batch_ids]) for store in snapshots]
        scores.extend(pseudo_label_controls.stability_scores(labels, earlier, num_classes))
        ids.extend(batch_ids)
    return ids, np.asarray(scores, np.float64)
