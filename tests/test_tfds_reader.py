"""The tfds reader on a tiny builder prepared here; skipped where tensorflow-datasets is
not installed (the other readers' tests do not need it)."""

import os

import numpy as np
import pytest

from kssl.data.readers.base import DataError
from tiny import decode_all

tfds = pytest.importorskip("tensorflow_datasets")
H, W = 8, 12
TFDS_SIZES = {"train": 5, "test": 2}


def tfds_element(split, index):
    rng = np.random.default_rng(index + (100 if split == "test" else 0))
    return (rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
            rng.integers(1, 4, (H, W, 1), dtype=np.uint8))


class KsslTinyTrimaps(tfds.core.GeneratorBasedBuilder):
    """Five train and two test images with Oxford-Pet-style trimaps (1..3)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        # DatasetInfo directly: dataset_info_from_configs looks for metadata files in the
        # defining package, and a test module is not one.
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "segmentation_mask": tfds.features.Image(shape=(None, None, 1)),
            "label": tfds.features.ClassLabel(names=["x", "y"]),
        }))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in TFDS_SIZES}

    def _generate_examples(self, split):
        for index in range(TFDS_SIZES[split]):
            image, mask = tfds_element(split, index)
            yield index, {"image": image, "segmentation_mask": mask, "label": index % 2}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    KsslTinyTrimaps(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return data_dir


def test_tfds_reader_subset_and_value_map(tfds_dir):
    from kssl.data.readers.tfds_reader import Tfds
    value_map = {1: 1, 2: 0, 3: 255}
    reader = Tfds("kssl_tiny_trimaps", data_dir=tfds_dir, class_names=("background", "pet"),
                  value_map=value_map)
    assert reader.mask_key == "segmentation_mask" and reader.info.num_classes == 2
    train = reader.examples("train")
    assert train.ids == tuple(f"train/{i}" for i in range(5)) and train.images[3] == "3"
    # tfds stores elements in its own order, so the written element is found by pixels.
    written = [tfds_element("train", i) for i in range(5)]
    subset = train.select(["train/1", "train/4"])
    rows = decode_all(reader, subset)
    assert [r["id"].decode() for r in rows] == ["train/1", "train/4"]
    lookup = np.array([0, 1, 0, 255], np.uint8)
    for row in rows:
        # tfds orders elements by its own key hash, so the written element is the one
        # with these (losslessly stored, random) pixels.
        matches = [m for im, m in written if np.array_equal(im, row["image"])]
        assert len(matches) == 1
        np.testing.assert_array_equal(row["mask"], lookup[matches[0][..., 0]])
    assert len(decode_all(reader, reader.examples("test"), with_masks=False)) == 2


def test_tfds_builder_dir_and_offset(tfds_dir):
    from kssl.data.readers.tfds_reader import Tfds
    reader = Tfds(builder_dir=os.path.join(tfds_dir, "kssl_tiny_trimaps", "1.0.0"),
                  num_classes=3, label_offset=-1)
    masks = [r["mask"] for r in decode_all(reader, reader.examples("test"))]
    assert set(np.unique(np.concatenate([m.ravel() for m in masks])).tolist()) <= {0, 1, 2}
    assert reader.info.class_names == ("class_0", "class_1", "class_2")
    head = reader.examples("train[:2]")
    assert head.ids == ("train[:2]/0", "train[:2]/1")
    assert len(decode_all(reader, head.select(["train[:2]/1"]))) == 1
    with pytest.raises(DataError, match="not a prepared dataset folder"):
        Tfds(builder_dir=os.path.join(tfds_dir, "nothing_here"))


def test_tfds_never_downloads(tmp_path, tfds_dir):
    from kssl.data.readers.tfds_reader import Tfds
    with pytest.raises(DataError, match=r"not prepared in .* never downloads"):
        Tfds("kssl_tiny_trimaps", data_dir=str(tmp_path / "empty"), num_classes=3)
    with pytest.raises(DataError, match=r"cannot open dataset 'no_such_dataset_kssl'"):
        Tfds("no_such_dataset_kssl", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="has no class names"):
        Tfds("kssl_tiny_trimaps", data_dir=tfds_dir)
    with pytest.raises(DataError, match=r"no split 'valid'.*\['test', 'train'\]"):
        Tfds("kssl_tiny_trimaps", data_dir=tfds_dir, num_classes=3).examples("valid")
