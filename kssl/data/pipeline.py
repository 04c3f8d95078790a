"""tf.data streams for training and evaluation.

A training step reads one labelled batch and, for semi-supervised methods, one unlabelled
batch. The two streams are shuffled and repeated independently (the pools differ in size)
and zipped, so each element is `(labelled, unlabelled)`:

    labelled   = {"id": string [B], "image": float32 [B, h, w, 3] in [0, 255],
                  "mask": int32 [B, h, w]}
    unlabelled = {"id": string [B'], "image": float32 [B', h, w, 3]}

(the unlabelled dict also holds "padding", int32 [B', h, w], when asked for, and each
image twice in consecutive rows with `unlabelled_views=2`).

A supervised pipeline yields the labelled dict alone. The example id travels with every
element so later stages can attach per-example data (stored pseudo-masks) by id.
"""

from __future__ import annotations

from typing import Callable, Optional

import tensorflow as tf

from kssl.data import transforms
from kssl.data.examples import Examples
from kssl.data.readers.base import DataError, Reader

AUTOTUNE = tf.data.AUTOTUNE


def _finalise(example: dict) -> dict:
    """Casts label maps to int32 (what losses and metrics index with)."""
    out = dict(example)
    for key in transforms.label_keys(example):
        out[key] = tf.cast(example[key], tf.int32)
    return out


def augmented_stream(reader: Reader, examples: Examples, *, with_masks: bool, batch_size: int,
                     crop_size, scale_range=(0.5, 2.0), flip=True, resize=None,
                     cache=False, seed=0, shuffle_buffer=None,
                     attach: Optional[Callable] = None, views: int = 1,
                     mark_padding: bool = False) -> tf.data.Dataset:
    """An endless, shuffled, weakly augmented, batched stream of one pool of examples.

    Args:
      reader: decodes the examples.
      examples: the pool.
      with_masks: whether to decode masks (False for the unlabelled pool).
      batch_size: examples per batch (global batch: a distribution strategy splits it).
      crop_size: (height, width) of every training crop.
      scale_range: random rescaling range; (1, 1) for none.
      flip: random horizontal flip.
      resize: optional (height, width) every image is resized to on load, before
        augmentation (training at reduced resolution).
      cache: keep decoded (and resized) examples in memory after the first pass.
      seed: shuffling and augmentation seed.
      shuffle_buffer: defaults to the pool size (a full shuffle).
      attach: optional `dataset -> dataset` adding per-example label maps by id (e.g.
        `PseudoMaskStore.attach`) after resizing, so augmentation treats them like the mask.
      views: independently augmented copies of each example, in consecutive rows (a batch
        holds batch_size * views rows); 2 gives UniMatch / FixMatch their second view.
      mark_padding: add a "padding" label map, 0 on the image and the ignore label where
        the crop padded it (an unlabelled image has no mask to show where).
    """
    if len(examples) == 0:
        what = "labelled" if with_masks else "unlabelled"
        raise DataError(f"the {what} set is empty ({examples.source or 'no source'})")
    ds = reader.load(examples, with_masks=with_masks)
    if mark_padding:  # a label map of zeros: padding fills it with the ignore label
        ds = ds.map(lambda e: {**e, "padding": tf.zeros(tf.shape(e["image"])[:2], tf.uint8)},
                    num_parallel_calls=AUTOTUNE)
    if resize is not None:
        ds = ds.map(lambda e: transforms.resize(e, resize), num_parallel_calls=AUTOTUNE)
    if attach is not None:
        ds = attach(ds)
    if cache:
        ds = ds.cache()
    ds = ds.shuffle(shuffle_buffer or len(examples), seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat()
    if views > 1:  # after the shuffle, so the copies of an example stay in adjacent rows
        ds = ds.flat_map(lambda e: tf.data.Dataset.from_tensors(e).repeat(views))
    # One stateless seed pair per element keeps augmentation reproducible for a given seed.
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    ds = tf.data.Dataset.zip(ds, seeds)

    def augment(example, element_seed):
        example = transforms.weak_augment(example, element_seed, crop_size, scale_range, flip)
        return _finalise(example)

    ds = ds.map(augment, num_parallel_calls=AUTOTUNE)
    return ds.batch(batch_size * views, drop_remainder=True)


def train_dataset(reader: Reader, labelled: Examples, unlabelled: Optional[Examples], *,
                  batch_size: int, unlabelled_batch_size: Optional[int] = None,
                  seed: int = 0, unlabelled_reader: Optional[Reader] = None,
                  unlabelled_views: int = 1, unlabelled_padding: bool = False,
                  **stream_args) -> tf.data.Dataset:
    """The training stream: labelled batches, zipped with unlabelled ones when given.

    `unlabelled_reader` decodes the unlabelled pool when it comes from elsewhere (e.g. a
    folder of extra images); by default `reader` decodes both. `unlabelled_views` and
    `unlabelled_padding` are the unlabelled stream's `views` and `mark_padding`.
    `stream_args` go to `augmented_stream` (crop_size, scale_range, flip, resize, cache,
    attach).
    """
    labelled_ds = augmented_stream(reader, labelled, with_masks=True, batch_size=batch_size,
                                   seed=seed, **stream_args)
    if unlabelled is None:
        return labelled_ds.prefetch(AUTOTUNE)
    unlabelled_ds = augmented_stream(
        unlabelled_reader or reader, unlabelled.without_masks(), with_masks=False,
        batch_size=unlabelled_batch_size or batch_size, seed=seed + 1,
        views=unlabelled_views, mark_padding=unlabelled_padding, **stream_args)
    return tf.data.Dataset.zip(labelled_ds, unlabelled_ds).prefetch(AUTOTUNE)


def eval_dataset(reader: Reader, examples: Examples, *, with_masks: bool = True,
                 cache: bool = False) -> tf.data.Dataset:
    """Full, un-augmented images one at a time, at their original size, in list order."""
    ds = reader.load(examples, with_masks=with_masks)
    ds = ds.map(lambda e: _finalise({**e, "image": tf.cast(e["image"], tf.float32)}),
                num_parallel_calls=AUTOTUNE)
    if cache:
        ds = ds.cache()
    return ds.batch(1).prefetch(AUTOTUNE)
