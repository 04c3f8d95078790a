"""The embedded procedural Shapes dataset."""

import numpy as np
import pytest
import tensorflow as tf

from kssl.data.examples import IGNORE_LABEL
from kssl.data.readers.base import DataError
from kssl.data.readers.shapes import CLASS_NAMES, Shapes


def test_same_seed_same_pixels_and_other_seeds_differ():
    images, masks = Shapes(num_train=6, num_val=3, seed=3).arrays("train")
    again_images, again_masks = Shapes(num_train=6, num_val=3, seed=3).arrays("train")
    np.testing.assert_array_equal(images, again_images)
    np.testing.assert_array_equal(masks, again_masks)
    other_images, other_masks = Shapes(num_train=6, seed=4).arrays("train")
    assert not np.array_equal(masks, other_masks)
    assert not np.array_equal(images, other_images)
    val_images, _ = Shapes(num_train=6, num_val=3, seed=3).arrays("val")
    assert not np.array_equal(images[:3], val_images)


def test_an_image_does_not_depend_on_the_split_size():
    small, small_masks = Shapes(num_train=3).arrays("train")
    large, large_masks = Shapes(num_train=70).arrays("train")  # spans two chunks
    np.testing.assert_array_equal(small, large[:3])
    np.testing.assert_array_equal(small_masks, large_masks[:3])


def test_values_and_class_coverage():
    images, masks = Shapes(num_train=64).arrays("train")
    assert images.shape == (64, 96, 128, 3) and images.dtype == np.uint8
    assert masks.shape == (64, 96, 128) and masks.dtype == np.uint8
    values = set(np.unique(masks).tolist())
    assert values == set(range(len(CLASS_NAMES))) | {IGNORE_LABEL}
    ignored = np.mean(masks == IGNORE_LABEL)
    assert 0.0 < ignored < 0.1
    # Every object class appears in most images' worth of pixels, not just one blob.
    per_class = np.bincount(masks[masks != IGNORE_LABEL], minlength=len(CLASS_NAMES))
    assert (per_class[1:] > 0.005 * masks.size).all()
    assert images.std() > 30  # textured, not flat


def test_reader_interface_and_load():
    reader = Shapes(num_train=5, num_val=2, height=40, width=56, seed=1)
    assert reader.info.num_classes == 7 and reader.info.palette.shape == (7, 3)
    assert reader.info.label_map is None and reader.info.class_names == CLASS_NAMES
    train = reader.examples("train")
    assert train.ids[:2] == ("train/00000", "train/00001") and train.images[3] == "3"
    assert len(reader.examples("val")) == 2

    picked = train.select(["train/00003", "train/00001"])
    elements = list(reader.load(picked).as_numpy_iterator())
    images, masks = reader.arrays("train")
    assert [e["id"] for e in elements] == [b"train/00003", b"train/00001"]
    np.testing.assert_array_equal(elements[0]["image"], images[3])
    np.testing.assert_array_equal(elements[1]["mask"], masks[1])
    spec = reader.load(picked).element_spec
    assert spec["image"] == tf.TensorSpec([40, 56, 3], tf.uint8)
    assert spec["mask"] == tf.TensorSpec([40, 56], tf.uint8)

    unlabelled = reader.load(train.without_masks(), with_masks=False)
    assert "mask" not in unlabelled.element_spec
    with pytest.raises(DataError, match="asked for masks"):
        reader.load(train.without_masks())


def test_bad_splits_and_arguments_are_named():
    reader = Shapes(num_train=2, num_val=2)
    with pytest.raises(ValueError, match="'test'"):
        reader.examples("test")
    with pytest.raises(ValueError, match="height"):
        Shapes(height=8)
    bigger = Shapes(num_train=4).examples("train")
    with pytest.raises(DataError, match="out of range"):
        reader.load(bigger)
