"""Median frequency class weights: counted from masks and checked by hand."""

import os

import numpy as np
import pytest
import tensorflow as tf

from kssl.data import class_balance
from kssl.data.readers.folder import Folder


def write_pair(root, name, mask):
    mask = np.asarray(mask, np.uint8)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    image = np.zeros((*mask.shape, 3), np.uint8)
    tf.io.write_file(os.path.join(root, "images", name + ".png"), tf.io.encode_png(image))
    tf.io.write_file(os.path.join(root, "masks", name + ".png"),
                     tf.io.encode_png(mask[..., None]))


def test_median_frequency_weights_by_hand():
    # class 0: 30 px in images totalling 40 labelled px -> freq 0.75
    # class 1: 10 px in images totalling 40 -> 0.25; class 2: 5 px of 20 -> 0.25
    # class 3 absent. Median of (0.75, 0.25, 0.25) = 0.25.
    weights = class_balance.median_frequency_weights([30, 10, 5, 0], [40, 40, 20, 0])
    np.testing.assert_allclose(weights, [0.25 / 0.75, 1.0, 1.0, 1.0], rtol=1e-6)


def test_counts_from_masks(tmp_path):
    root = str(tmp_path)
    # image a: 3 px of class 0, 1 px of class 1, 2 ignored; image b: 4 px of class 2.
    write_pair(root, "a", [[0, 0, 0], [1, 255, 255]])
    write_pair(root, "b", [[2, 2], [2, 2]])
    reader = Folder(os.path.join(root, "images"), os.path.join(root, "masks"),
                    class_names=("x", "y", "z"))
    class_pixels, image_pixels = class_balance.class_pixel_counts(
        reader, reader.examples("all"), 3)
    np.testing.assert_array_equal(class_pixels, [3, 1, 4])
    np.testing.assert_array_equal(image_pixels, [4, 4, 4])  # a has 4 labelled px, b has 4
    weights = class_balance.resolve_class_weights("median_frequency", reader,
                                                  reader.examples("all"), 3)
    # freqs 0.75, 0.25, 1.0 -> median 0.75
    np.testing.assert_allclose(weights, [1.0, 3.0, 0.75], rtol=1e-6)


@pytest.mark.parametrize("setting", ["median", [1.0, 2.0], [1.0, -1.0, 1.0], ["a", 1, 1]])
def test_bad_settings_are_named(setting):
    with pytest.raises(ValueError, match="class_weights"):
        class_balance.resolve_class_weights(setting, None, None, 3)


def test_explicit_weights_pass_through():
    weights = class_balance.resolve_class_weights([0.5, 1, 2], None, None, 3)
    np.testing.assert_array_equal(weights, np.float32([0.5, 1, 2]))
    assert class_balance.resolve_class_weights(None, None, None, 3) is None
