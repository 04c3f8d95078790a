"""Weak augmentation for one example, as tf ops: resize, random scale, pad, crop, flip.

Every geometric op is applied to the image and, identically, to every label map in the
example ("mask" and any other integer map a method attaches, e.g. stored pseudo-masks).
Images are resampled bilinearly, label maps by nearest neighbour; padding gives images 0
and label maps the ignore label, so padded pixels never count in a loss.

Randomness is stateless: each function takes a `seed` tensor of shape [2] so a pipeline
built with the same seed yields the same crops.
"""

from __future__ import annotations

import tensorflow as tf

from kssl.constants import IGNORE_LABEL

_NOT_LABEL_KEYS = ("id", "image")


def label_keys(example: dict) -> list:
    """The keys of an example that hold label maps (everything but id and image)."""
    return [k for k in example if k not in _NOT_LABEL_KEYS]


def resize(example: dict, size) -> dict:
    """Resizes image (bilinear) and label maps (nearest) to `size` = (height, width)."""
    out = dict(example)
    out["image"] = tf.image.resize(tf.cast(example["image"], tf.float32), size)
    for key in label_keys(example):
        out[key] = _resize_labels(example[key], size)
    return out


def _resize_labels(labels: tf.Tensor, size) -> tf.Tensor:
    resized = tf.image.resize(labels[..., None], size, method="nearest")
    return tf.cast(resized[..., 0], labels.dtype)


def random_scale(example: dict, scale_range, seed) -> dict:
    """Rescales the example by a factor drawn uniformly from `scale_range`."""
    low, high = scale_range
    if low == high == 1.0:
        return example
    factor = tf.random.stateless_uniform([], seed, low, high)
    shape = tf.cast(tf.shape(example["image"])[:2], tf.float32)
    size = tf.cast(tf.round(shape * factor), tf.int32)
    return resize(example, size)


def pad_to_at_least(example: dict, size) -> dict:
    """Pads bottom/right so the example is at least `size`: image with 0, labels with ignore."""
    shape = tf.shape(example["image"])
    pad_h = tf.maximum(size[0] - shape[0], 0)
    pad_w = tf.maximum(size[1] - shape[1], 0)
    out = dict(example)
    out["image"] = tf.pad(example["image"], [[0, pad_h], [0, pad_w], [0, 0]])
    for key in label_keys(example):
        out[key] = tf.pad(example[key], [[0, pad_h], [0, pad_w]],
                          constant_values=tf.cast(IGNORE_LABEL, example[key].dtype))
    return out


def random_crop(example: dict, size, seed) -> dict:
    """Crops a random `size` window, the same for image and label maps (pads first if small)."""
    example = pad_to_at_least(example, size)
    shape = tf.shape(example["image"])
    top = tf.random.stateless_uniform([], seed, 0, shape[0] - size[0] + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform(
        [], seed + [0, 1], 0, shape[1] - size[1] + 1, dtype=tf.int32)
    out = dict(example)
    out["image"] = example["image"][top:top + size[0], left:left + size[1]]
    out["image"].set_shape([size[0], size[1], 3])
    for key in label_keys(example):
        out[key] = example[key][top:top + size[0], left:left + size[1]]
        out[key].set_shape([size[0], size[1]])
    return out


def random_flip(example: dict, seed) -> dict:
    """Flips image and label maps left-right with probability 0.5."""
    flip = tf.random.stateless_uniform([], seed) < 0.5
    out = dict(example)
    for key in ["image"] + label_keys(example):
        out[key] = tf.cond(flip, lambda k=key: tf.reverse(example[k], [1]),
                           lambda k=key: example[k])
    return out


def weak_augment(example: dict, seed, crop_size, scale_range=(0.5, 2.0), flip=True) -> dict:
    """Random scale, crop to `crop_size` (padding with ignore), and horizontal flip.

    Args:
      example: {"image": [H, W, 3] float or uint8, "id": ..., label maps [H, W]}.
      seed: int tensor [2], a stateless seed for this example.
      crop_size: (height, width) of the output.
      scale_range: (low, high) of the random rescaling factor; (1, 1) turns it off.
      flip: whether to flip left-right at random.
    """
    seeds = tf.random.experimental.stateless_split(seed, 3)
    example = dict(example)
    example["image"] = tf.cast(example["image"], tf.float32)
    example = random_scale(example, scale_range, seeds[0])
    example = random_crop(example, crop_size, seeds[1])
    if flip:
        example = random_flip(example, seeds[2])
    return example
