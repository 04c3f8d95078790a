"""What every dataset reader offers, and the decoding shared by the file-based ones."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from kssl.data.examples import IGNORE_LABEL, DatasetInfo, Examples


class DataError(ValueError):
    """A dataset problem found before training: names the file, the value and what was expected."""


class Reader:
    """A dataset layout: lists the examples of a split and decodes them in tf.data.

    Subclasses set `info` and implement `examples(split)`. File-based readers inherit
    `load`, which decodes `Examples` into a dataset of dicts:
      {"id": string, "image": uint8 [H, W, 3], "mask": uint8 [H, W]}  ("mask" only when
    `with_masks`), with raw mask values already mapped to class ids or IGNORE_LABEL.
    """

    info: DatasetInfo

    def examples(self, split: str) -> Examples:
        raise NotImplementedError

    def id_from_path(self, path: str) -> str:
        """The example id that an image (or mask) path in a list file stands for."""
        return os.path.splitext(os.path.basename(path))[0]

    # -- decoding -------------------------------------------------------------------
    def load(self, examples: Examples, with_masks: bool = True) -> tf.data.Dataset:
        """A tf.data.Dataset of decoded examples, in list order, not shuffled."""
        if with_masks and not examples.has_masks:
            raise DataError(f"{examples.source}: asked for masks but some examples have none")
        columns = {"id": list(examples.ids), "image": list(examples.images)}
        if with_masks:
            columns["mask"] = list(examples.masks)
        ds = tf.data.Dataset.from_tensor_slices(columns)
        return ds.map(self.decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def decode(self, row: dict) -> dict:
        """Reads the files one row names (tf ops only, usable inside tf.data.map)."""
        out = {"id": row["id"], "image": decode_image(row["image"])}
        if "mask" in row:
            out["mask"] = self.decode_mask(row["mask"])
        return out

    def decode_mask(self, path: tf.Tensor) -> tf.Tensor:
        """A mask file as uint8 [H, W] class ids, with the dataset's label map applied."""
        info = self.info
        if info.mask_palette is not None:
            rgb = tf.io.decode_png(tf.io.read_file(path), channels=3)
            mask = rgb_to_class_ids(rgb, info.mask_palette)
        else:
            mask = tf.io.decode_png(tf.io.read_file(path), channels=1)[..., 0]
        if info.label_map is not None:
            mask = tf.gather(tf.constant(info.label_map, tf.uint8), tf.cast(mask, tf.int32))
        return mask


def decode_image(path: tf.Tensor) -> tf.Tensor:
    """Any JPEG/PNG/BMP/GIF file as uint8 [H, W, 3]."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def rgb_to_class_ids(rgb: tf.Tensor, palette: np.ndarray) -> tf.Tensor:
    """Maps an RGB colour-coded mask to class ids through `palette` ([K, 3] uint8).

    Colour k becomes class k; the ignore colour must be listed by the caller as an entry
    whose index maps to IGNORE_LABEL through the label map. A colour not in the palette
    becomes 254, which validation reports as an out-of-range label.
    """
    palette = np.asarray(palette, np.int32)
    codes = tf.cast(rgb, tf.int32)
    code = codes[..., 0] * 65536 + codes[..., 1] * 256 + codes[..., 2]
    keys = tf.constant(palette[:, 0] * 65536 + palette[:, 1] * 256 + palette[:, 2], tf.int32)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(keys, tf.range(len(palette), dtype=tf.int32)),
        default_value=254)
    return tf.cast(table.lookup(code), tf.uint8)


UNKNOWN_COLOUR = 254
"""The value a colour outside the palette decodes to (validation reports it)."""


def mask_labels_valid(mask: tf.Tensor, num_classes: int) -> tf.Tensor:
    """True where a mask value is a class id or the ignore label."""
    mask = tf.cast(mask, tf.int32)
    return tf.logical_or(mask < num_classes, tf.equal(mask, IGNORE_LABEL))
