"""The pre-training data check: every error names its file, value and expectation."""

import os

import numpy as np
import pytest
import tensorflow as tf

from kssl.data.examples import DatasetInfo, Examples
from kssl.data.readers.base import DataError, Reader
from kssl.data.readers.camvid import CamVid
from kssl.data.readers.folder import Folder
from kssl.data.validate import validate
from tiny import random_mask, write_image, write_mask

H, W = 8, 12
MASK_VALUES = (0, 1, 2, 255)  # three classes and the ignore label


@pytest.fixture
def dataset(tmp_path):
    """A clean 5-image folder dataset with 3 classes; returns (reader, images, masks dirs)."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    for k in range(5):
        write_image(str(images / f"im{k}.jpg"), k)
        write_mask(str(masks / f"im{k}.png"), random_mask(k, MASK_VALUES))
    reader = Folder(str(images), str(masks), class_names=("a", "b", "c"))
    return reader, images, masks


def test_clean_data_passes_and_counts_pixels(dataset):
    reader, _, _ = dataset
    examples = reader.examples("all")
    report = validate(reader, examples, with_masks=True, num_classes=3)
    expected = np.bincount(np.concatenate([random_mask(k, MASK_VALUES).ravel() for k in range(5)]),
                           minlength=256)
    np.testing.assert_array_equal(report.class_pixels, expected[:3])
    assert report.ignored_pixels == expected[255] and report.count == 5
    assert report.absent_classes == ()
    assert validate(reader, examples.without_masks(), with_masks=False, num_classes=3,
                    what="unlabelled").count == 5


def test_absent_class_is_reported(dataset):
    reader, _, _ = dataset
    report = validate(reader, reader.examples("all"), with_masks=True, num_classes=4)
    assert report.absent_classes == (3,)


def test_missing_files_are_all_named(dataset):
    reader, images, masks = dataset
    examples = reader.examples("all")
    os.remove(images / "im1.jpg")
    os.remove(images / "im3.jpg")
    os.remove(masks / "im4.png")
    with pytest.raises(DataError) as error:
        validate(reader, examples, with_masks=True, num_classes=3)
    lines = str(error.value).splitlines()
    assert lines[0].startswith("3 of the 10 labelled files are missing")
    assert lines[1:] == [f"  image {images / 'im1.jpg'}", f"  image {images / 'im3.jpg'}",
                         f"  mask {masks / 'im4.png'}"]
    # Unlabelled checks look at images only.
    with pytest.raises(DataError, match=r"^2 of the 5 unlabelled files are missing"):
        validate(reader, examples, with_masks=False, num_classes=3, what="unlabelled")


def test_missing_file_list_is_capped(dataset):
    reader, images, _ = dataset
    examples = reader.examples("all")
    for k in range(5):
        os.remove(images / f"im{k}.jpg")
    with pytest.raises(DataError, match=r"(?s)5 of the 5 unlabelled.*im1.jpg\n  \.\.\. and "
                                        r"3 more$"):
        validate(reader, examples, with_masks=False, num_classes=3, what="unlabelled",
                 max_listed=2)


def test_unreadable_files_are_named(dataset):
    reader, images, masks = dataset
    examples = reader.examples("all")
    (images / "im2.jpg").write_bytes(b"this is not an image")
    tf.io.write_file(str(masks / "im4.png"), tf.io.encode_jpeg(np.zeros((H, W, 3), np.uint8)))
    with pytest.raises(DataError) as error:
        validate(reader, examples, with_masks=True, num_classes=3)
    message = str(error.value)
    assert message.splitlines()[0].startswith(
        "labelled data check failed: 2 bad file(s) in ") and "(2 unreadable)" in message
    assert f"image {images / 'im2.jpg'}: Unknown image file format" in message
    assert f"mask {masks / 'im4.png'}: mask file is not a PNG" in message


def test_size_mismatch_names_both_files(dataset):
    reader, images, masks = dataset
    write_mask(str(masks / "im3.png"), random_mask(3, MASK_VALUES, size=(H, W + 2)))
    with pytest.raises(DataError) as error:
        validate(reader, reader.examples("all"), with_masks=True, num_classes=3)
    message = str(error.value)
    assert "(1 with image/mask size mismatch)" in message.splitlines()[0]
    assert (f"image {images / 'im3.jpg'} is 8x12 (HxW) but mask {masks / 'im3.png'} is 8x14"
            in message)


def test_out_of_range_labels(dataset):
    reader, _, masks = dataset
    bad = random_mask(0, MASK_VALUES)
    bad[0, :3] = [3, 3, 17]
    write_mask(str(masks / "im0.png"), bad)
    with pytest.raises(DataError) as error:
        validate(reader, reader.examples("all"), with_masks=True, num_classes=3)
    message = str(error.value)
    assert "1 bad file(s)" in message and "(1 with out-of-range labels)" in message
    assert "mask values that are not class ids 0..2 or 255 (ignore) (1):" in message
    assert f"{masks / 'im0.png'}: values [3, 17] in 3 pixels" in message


def test_out_of_range_after_label_map(tmp_path):
    root = tmp_path / "camvid"
    write_image(str(root / "train" / "a.jpg"), 0)
    mask = random_mask(0, range(12))
    mask[0, 0] = 40
    write_mask(str(root / "trainannot" / "a.png"), mask)
    with open(root / "train.txt", "w") as f:
        f.write("/SegNet/CamVid/train/a.jpg /SegNet/CamVid/trainannot/a.png\n")
    reader = CamVid(str(root))
    with pytest.raises(DataError, match=r"a.png: values \[40\] in 1 pixels"):
        validate(reader, reader.examples("train"), with_masks=True, num_classes=11)
    mask[0, 0] = 11  # void is fine: it maps to 255
    write_mask(str(root / "trainannot" / "a.png"), mask)
    validate(reader, reader.examples("train"), with_masks=True, num_classes=11)


def test_unknown_palette_colour(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    palette = [(0, 0, 0), (255, 0, 0)]
    for k in range(3):
        write_image(str(images / f"{k}.jpg"), k)
        rgb = np.zeros((H, W, 3), np.uint8)
        rgb[:2, :] = (255, 0, 0)
        rgb[2, :] = (9, 9, 9)  # ignore colour
        if k == 1:
            rgb[5, :4] = (0, 200, 0)
        os.makedirs(masks, exist_ok=True)
        tf.io.write_file(str(masks / f"{k}.png"), tf.io.encode_png(rgb))
    reader = Folder(str(images), str(masks), class_names=("bg", "red"), mask_palette=palette,
                    ignore_colours=[(9, 9, 9)])
    with pytest.raises(DataError) as error:
        validate(reader, reader.examples("all"), with_masks=True, num_classes=2)
    message = str(error.value)
    assert "(1 with unknown colours)" in message.splitlines()[0]
    assert f"{masks / '1.png'}: 4 pixels of unknown colours: (0, 200, 0) x 4" in message


def test_colour_mask_read_as_class_ids_hints_at_palette(dataset):
    reader, _, masks = dataset
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[0, 0] = (200, 10, 10)
    tf.io.write_file(str(masks / "im0.png"), tf.io.encode_png(rgb))
    with pytest.raises(DataError, match=r"im0.png: values \[254\] in 1 pixels \(254 is also "
                                        r"what a pixel whose R, G, B differ"):
        validate(reader, reader.examples("all"), with_masks=True, num_classes=3)


def test_empty_set_and_missing_masks(dataset, tmp_path):
    reader, images, _ = dataset
    with pytest.raises(DataError, match=r"^the labelled set is empty \(nothing.txt\)"):
        validate(reader, Examples((), (), (), source="nothing.txt"), with_masks=True,
                 num_classes=3)
    write_image(str(images / "extra.jpg"), 9)
    with pytest.raises(DataError, match=r"(?s)^1 of the 6 labelled images have no mask.*"
                                        r"extra.jpg"):
        validate(reader, reader.examples("all"), with_masks=True, num_classes=3)
    pool = Folder(str(images)).examples("all")
    with pytest.raises(DataError, match="6 of the 6 labelled images have no mask"):
        validate(reader, pool, with_masks=True, num_classes=3)


class InMemory(Reader):
    """A reader that is not file based: its data comes from arrays."""

    def __init__(self, masks):
        self.masks = np.asarray(masks, np.uint8)
        self.info = DatasetInfo("memory", ("a", "b"), np.zeros([2, 3], np.uint8))

    def examples(self, split):
        index = tuple(str(k) for k in range(len(self.masks)))
        return Examples(tuple(f"{split}/{k}" for k in index), index, index, source="memory")

    def load(self, examples, with_masks=True):
        rows = [int(i) for i in examples.images]
        columns = {"id": list(examples.ids),
                   "image": np.zeros([len(rows), H, W, 3], np.uint8)}
        if with_masks:
            columns["mask"] = self.masks[rows]
        return tf.data.Dataset.from_tensor_slices(columns)


def test_non_file_reader_names_example_ids():
    masks = np.zeros([3, H, W], np.uint8)
    masks[2, 1, 1] = 5
    reader = InMemory(masks)
    assert not reader.file_based
    with pytest.raises(DataError, match=r"mask of train/2: values \[5\] in 1 pixels"):
        validate(reader, reader.examples("train"), with_masks=True, num_classes=2)
    assert validate(reader, reader.examples("train").select(["train/0"]), with_masks=True,
                    num_classes=2).count == 1
