"""Weak augmentation and the labelled/unlabelled tf.data streams."""

import numpy as np
import pytest
import tensorflow as tf

from kssl.data import pipeline, transforms
from kssl.data.examples import IGNORE_LABEL, DatasetInfo, Examples
from kssl.data.readers.base import DataError, Reader


class ArrayReader(Reader):
    """A reader over in-memory arrays: example k has image k and mask k."""

    def __init__(self, images, masks):
        self.images, self.masks = images, masks
        self.info = DatasetInfo("arrays", ("a", "b", "c"), np.zeros((3, 3), np.uint8))

    def examples(self, split):
        ids = tuple(f"ex{k}" for k in range(len(self.images)))
        return Examples(ids, tuple(str(k) for k in range(len(ids))), ids, source="arrays")

    def load(self, examples, with_masks=True):
        rows = [int(i) for i in examples.images]
        columns = {"id": list(examples.ids), "image": self.images[rows]}
        if with_masks:
            columns["mask"] = self.masks[rows]
        return tf.data.Dataset.from_tensor_slices(columns)


def coordinate_example(height=12, width=16):
    """An image whose red channel encodes the row and green the column, and a mask
    holding the flat pixel index modulo 200 (so every geometric op can be traced)."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image = np.stack([rows * 10, cols * 10, np.zeros_like(rows)], -1).astype(np.uint8)
    mask = ((rows * width + cols) % 200).astype(np.uint8)
    return {"id": tf.constant("x"), "image": tf.constant(image), "mask": tf.constant(mask)}


def test_crop_and_flip_move_image_and_mask_together():
    example = coordinate_example()
    for k in range(10):
        out = transforms.weak_augment(example, tf.constant([k, 7], tf.int64), (8, 8),
                                      scale_range=(1.0, 1.0), flip=True)
        image, mask = out["image"].numpy(), out["mask"].numpy()
        assert image.shape == (8, 8, 3) and mask.shape == (8, 8)
        # The mask at each output pixel is the one at the image's source coordinates.
        src_rows, src_cols = image[..., 0] / 10, image[..., 1] / 10
        np.testing.assert_array_equal(mask, (src_rows * 16 + src_cols) % 200)


def test_crop_larger_than_image_pads_with_ignore_and_zero():
    example = coordinate_example(6, 5)
    out = transforms.random_crop(example, (8, 8), tf.constant([1, 2], tf.int64))
    mask, image = out["mask"].numpy(), out["image"].numpy()
    assert (mask[6:, :] == IGNORE_LABEL).all() and (mask[:, 5:] == IGNORE_LABEL).all()
    assert (image[6:, :] == 0).all()
    np.testing.assert_array_equal(mask[:6, :5], example["mask"].numpy())


def test_random_scale_resizes_masks_by_nearest_neighbour():
    example = coordinate_example()
    out = transforms.random_scale(example, (2.0, 2.0), tf.constant([0, 0], tf.int64))
    assert out["image"].shape == (24, 32, 3)
    # Nearest-neighbour: every output label is one of the input labels, each repeated 2x2.
    np.testing.assert_array_equal(out["mask"].numpy()[::2, ::2], example["mask"].numpy())
    assert out["mask"].dtype == tf.uint8


def test_scale_range_is_respected():
    example = coordinate_example(20, 20)
    sizes = {transforms.random_scale(example, (0.5, 1.5), tf.constant([k, 1], tf.int64))
             ["image"].shape[0] for k in range(20)}
    assert min(sizes) >= 10 and max(sizes) <= 30 and len(sizes) > 3


def make_reader(n=5, height=10, width=12):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, height, width, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, (n, height, width), dtype=np.uint8)
    return ArrayReader(images, masks)


def test_train_dataset_yields_labelled_and_unlabelled_batches_with_ids():
    reader = make_reader()
    examples = reader.examples("train")
    labelled, unlabelled = examples.select(["ex0", "ex1"]), examples.select(["ex2", "ex3", "ex4"])
    ds = pipeline.train_dataset(reader, labelled, unlabelled, batch_size=2,
                                unlabelled_batch_size=3, crop_size=(8, 8), seed=3)
    lab, unl = next(iter(ds))
    assert lab["image"].shape == (2, 8, 8, 3) and lab["image"].dtype == tf.float32
    assert lab["mask"].shape == (2, 8, 8) and lab["mask"].dtype == tf.int32
    assert unl["image"].shape == (3, 8, 8, 3) and "mask" not in unl
    assert set(lab["id"].numpy().astype(str)) == {"ex0", "ex1"}
    assert set(unl["id"].numpy().astype(str)) == {"ex2", "ex3", "ex4"}


def test_streams_repeat_independently_and_are_deterministic_by_seed():
    reader = make_reader()
    examples = reader.examples("train")
    labelled, unlabelled = examples.select(["ex0"]), examples.select(["ex1", "ex2", "ex3"])

    def first_batches(seed):
        ds = pipeline.train_dataset(reader, labelled, unlabelled, batch_size=1,
                                    crop_size=(8, 8), seed=seed)
        return [(lab["image"].numpy(), unl["id"].numpy()) for lab, unl in ds.take(6)]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    for (img_a, ids_a), (img_b, ids_b) in zip(a, b):
        np.testing.assert_array_equal(img_a, img_b)
        np.testing.assert_array_equal(ids_a, ids_b)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_mask_values_survive_the_pipeline():
    reader = make_reader()
    ds = pipeline.train_dataset(reader, reader.examples("train"), None, batch_size=4,
                                crop_size=(8, 8), scale_range=(0.5, 2.0), seed=0)
    masks = np.concatenate([b["mask"].numpy().ravel() for b in ds.take(5)])
    assert set(np.unique(masks)) <= {0, 1, 2, IGNORE_LABEL}


def test_empty_pool_is_an_error():
    reader = make_reader()
    empty = Examples((), (), (), source="empty.txt")
    with pytest.raises(DataError, match="labelled set is empty.*empty.txt"):
        pipeline.train_dataset(reader, empty, None, batch_size=1, crop_size=(8, 8))


def test_eval_dataset_keeps_full_images_in_order():
    reader = make_reader()
    ds = pipeline.eval_dataset(reader, reader.examples("val"))
    batches = list(ds)
    assert len(batches) == 5
    np.testing.assert_array_equal(batches[2]["mask"][0].numpy(), reader.masks[2])
    np.testing.assert_array_equal(batches[2]["image"][0].numpy(), reader.images[2])
