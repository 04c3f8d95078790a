"""Any TensorFlow Datasets dataset with an image and a segmentation-mask feature.

The dataset must already be prepared on disk: this reader never downloads (training jobs
often run where there is no internet, and a silent multi-GB download is never wanted).
Prepare it once with `tfds build NAME --data_dir DIR` where there is internet, then point
`data_dir` (or `builder_dir`) at it.

Example ids are "<split>/<index>" and `Examples.images` hold the index as a string;
`load` enumerates the split and keeps the selected indices, so a subset costs one pass
over the split files.

Example, Oxford-IIIT Pet (trimap 1 pet, 2 background, 3 border):

    Tfds("oxford_iiit_pet", class_names=("background", "pet"),
         value_map={1: 1, 2: 0, 3: 255})
"""

from __future__ import annotations

import collections
from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from kssl.constants import IGNORE_LABEL
from kssl.data.examples import DatasetInfo, Examples
from kssl.data.readers.base import UNKNOWN_COLOUR, DataError, Reader
from kssl.data.readers.voc import voc_palette

# Preferred mask feature names when a dataset has several image features besides the image.
_MASK_HINTS = ("segmentation_mask", "mask", "segmentation", "label", "annotation")


class Tfds(Reader):
    """A prepared tfds dataset as a segmentation source.

    Args:
      name: the tfds name (optionally "name:version" or with a config, "name/config").
        May be None when builder_dir is given.
      data_dir: the tfds data folder holding the prepared dataset (tfds' default when
        None, usually ~/tensorflow_datasets).
      builder_dir: instead of name/data_dir, the prepared dataset's version folder
        (DIR/name/1.0.0), read with tfds.builder_from_directory.
      image_key: the image feature.
      mask_key: the mask feature; None picks the one other image feature (preferring
        "segmentation_mask", "mask", ...). A dataset with no mask feature is unlabelled.
      value_map: {raw mask value: class id or 255}; applied before label_offset.
      label_offset: added to raw values not in value_map (e.g. -1 when 0 means
        "unlabelled" and classes are 1..K); results outside 0..254 become 255, and a raw
        255 stays 255.
      class_names: names of classes 0..K-1; default the mask feature's label names
        (tfds.features.LabeledImage), else num_classes generic names.
      num_classes: K, when there are no class names.
      palette: drawing colours [K, 3]; default the VOC colour map.
    """

    def __init__(self, name: Optional[str] = None, data_dir: Optional[str] = None,
                 builder_dir: Optional[str] = None, image_key: str = "image",
                 mask_key: Optional[str] = None,
                 value_map: Optional[Mapping[int, int]] = None, label_offset: int = 0,
                 class_names: Optional[Sequence[str]] = None,
                 num_classes: Optional[int] = None,
                 palette: Optional[Sequence[Sequence[int]]] = None):
        self.builder = _prepared_builder(name, data_dir, builder_dir)
        self.name = self.builder.info.name
        features = self.builder.info.features
        if image_key not in features:
            raise DataError(f"tfds {self.name}: no image feature {image_key!r}; features: "
                            f"{sorted(features.keys())}")
        self.image_key = image_key
        self.mask_key = _mask_feature(self.name, features, image_key, mask_key)
        names = _class_names(self.name, features, self.mask_key, class_names, num_classes)
        draw = (voc_palette(max(len(names), 1))[:len(names)] if palette is None
                else np.asarray(palette, np.uint8).reshape(-1, 3))
        if len(draw) != len(names):
            raise ValueError(f"Tfds: palette has {len(draw)} colours for {len(names)} classes")
        self.info = DatasetInfo(name=self.name, class_names=names, palette=draw,
                                label_map=_label_map(value_map, label_offset))

    def _num_examples(self, split: str) -> int:
        try:
            return self.builder.info.splits[split].num_examples
        except (KeyError, ValueError) as error:
            raise DataError(f"tfds {self.name}: no split {split!r} ({error}); splits: "
                            f"{sorted(self.builder.info.splits.keys())}") from None

    def examples(self, split: str) -> Examples:
        """Every element of a tfds split (slices such as "train[:80%]" work too)."""
        count = self._num_examples(split)
        index = tuple(str(i) for i in range(count))
        ids = tuple(f"{split}/{i}" for i in range(count))
        return Examples(ids, index, index if self.mask_key else None,
                        source=f"tfds:{self.name}:{split}")

    def id_from_path(self, path: str) -> str:
        """List files for tfds name ids ("train/12") directly."""
        return path

    def load(self, examples: Examples, with_masks: bool = True) -> tf.data.Dataset:
        """The selected elements as {"id", "image", "mask"} dicts.

        Elements come in split order (then in order of first appearance of each split),
        which is list order for the Examples that `examples` and kssl's subset selection
        produce.
        """
        if with_masks and not examples.has_masks:
            raise DataError(f"{examples.source}: asked for masks but tfds dataset "
                            f"{self.name} has no mask feature")
        by_split = collections.OrderedDict()
        for example_id, index in zip(examples.ids, examples.images):
            split = example_id.rsplit("/", 1)[0]
            try:
                by_split.setdefault(split, []).append(int(index))
            except ValueError:
                raise DataError(f"{examples.source}: tfds example {example_id!r} has index "
                                f"{index!r}; expected an element index") from None
        datasets = [self._load_split(split, indices, with_masks)
                    for split, indices in by_split.items()]
        if not datasets:
            return self._load_split(None, [], with_masks)
        ds = datasets[0]
        for more in datasets[1:]:
            ds = ds.concatenate(more)
        return ds

    def _load_split(self, split, indices, with_masks) -> tf.data.Dataset:
        features = self.builder.info.features
        if split is None:  # nothing selected: an empty dataset of the right structure
            split, count = next(iter(self.builder.info.splits.keys())), 0
        else:
            count = self._num_examples(split)
        indices = np.asarray(indices, np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= count):
            raise DataError(f"tfds {self.name}: index {int(indices.max())} out of range for "
                            f"split {split!r} with {count} elements")
        if np.any(np.diff(indices) <= 0):
            logging.warning("tfds %s: examples are not in split order; they are loaded in "
                            "split order", self.name)
        keep = np.zeros([count], bool)
        keep[indices] = True
        keep = tf.constant(keep)
        # Skipping decoding until after the filter means unselected elements cost no
        # image decode.
        keys = [self.image_key] + ([self.mask_key] if with_masks else [])
        decoders = {k: tf_skip_decoding() for k in keys if _is_image(features[k])}
        ds = self.builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
        label_map = None if self.info.label_map is None else tf.constant(self.info.label_map)
        prefix = tf.constant(split + "/")

        def decode(index, element):
            row = {"id": tf.strings.join([prefix, tf.strings.as_string(index)]),
                   "image": _to_rgb(_decoded(features, self.image_key, element, decoders))}
            if with_masks:
                mask = _decoded(features, self.mask_key, element, decoders)
                if mask.shape.rank == 3:
                    mask = mask[..., 0]
                mask = tf.cast(mask, tf.int32)
                # Values a uint8 map cannot take are flagged for validation.
                mask = tf.where((mask < 0) | (mask > 255), UNKNOWN_COLOUR, mask)
                if label_map is not None:
                    mask = tf.gather(label_map, mask)
                row["mask"] = tf.cast(mask, tf.uint8)
            return row

        ds = ds.enumerate().filter(lambda index, element: keep[index])
        return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def tf_skip_decoding():
    import tensorflow_datasets as tfds  # noqa: PLC0415 (optional dependency)
    return tfds.decode.SkipDecoding()


def _is_image(feature) -> bool:
    import tensorflow_datasets as tfds  # noqa: PLC0415
    return isinstance(feature, tfds.features.Image)


def _decoded(features, key, element, decoders):
    value = element[key]
    return features[key].decode_example(value) if key in decoders else value


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    image = tf.cast(image, tf.uint8)
    if image.shape.rank == 2:
        image = image[..., None]
    channels = tf.shape(image)[-1]
    image = tf.cond(tf.equal(channels, 1), lambda: tf.tile(image, [1, 1, 3]),
                    lambda: image[..., :3])
    image.set_shape([None, None, 3])
    return image


def _prepared_builder(name, data_dir, builder_dir):
    """The tfds builder, refusing anything that would need a download."""
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415
    except ImportError:
        raise DataError("the tfds reader needs tensorflow-datasets: "
                        "pip install 'kssl[tfds]'") from None
    if builder_dir is not None:
        try:
            return tfds.builder_from_directory(builder_dir)
        except Exception as error:  # tfds raises several types for a bad folder
            raise DataError(f"tfds: {builder_dir} is not a prepared dataset folder (it "
                            f"should hold dataset_info.json): {_first_line(error)}") from None
    if not name:
        raise DataError("Tfds: give a dataset name or builder_dir")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # DatasetNotFoundError lists every dataset: keep line one
        raise DataError(f"tfds: cannot open dataset {name!r} in "
                        f"{data_dir or 'the default data_dir'}: {_first_line(error)}") from None
    if not builder.is_prepared():
        raise DataError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir} and kssl never "
            f"downloads. Prepare it where there is internet (tfds build {name} "
            f"--data_dir DIR) and pass data_dir=DIR, or pass builder_dir.")
    return builder


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _mask_feature(name, features, image_key, mask_key) -> Optional[str]:
    if mask_key is not None:
        if mask_key not in features:
            raise DataError(f"tfds {name}: no mask feature {mask_key!r}; features: "
                            f"{sorted(features.keys())}")
        return mask_key
    candidates = [k for k in features.keys() if k != image_key and _is_image(features[k])]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    for hint in _MASK_HINTS:
        hinted = [k for k in candidates if hint in k]
        if len(hinted) == 1:
            return hinted[0]
    raise DataError(f"tfds {name}: several image features could be the mask {candidates}; "
                    f"pass mask_key")


def _class_names(name, features, mask_key, class_names, num_classes) -> tuple:
    if class_names is not None:
        return tuple(str(n) for n in class_names)
    feature_names = getattr(features[mask_key], "names", None) if mask_key else None
    if feature_names:
        return tuple(feature_names)
    if num_classes is not None:
        return tuple(f"class_{k}" for k in range(int(num_classes)))
    if mask_key is None:
        return ()
    raise DataError(f"tfds {name}: mask feature {mask_key!r} has no class names; pass "
                    f"class_names=(...) or num_classes")


def _label_map(value_map, label_offset) -> Optional[np.ndarray]:
    if not value_map and not label_offset:
        return None
    table = np.empty([256], np.uint8)
    for raw in range(256):
        if value_map and raw in value_map:
            mapped = value_map[raw]
        elif raw == IGNORE_LABEL:
            mapped = IGNORE_LABEL
        else:
            mapped = raw + label_offset
            if not 0 <= mapped < IGNORE_LABEL:
                mapped = IGNORE_LABEL
        if not 0 <= mapped <= 255:
            raise ValueError(f"Tfds: value_map sends {raw} to {mapped}; expected 0..255")
        table[raw] = mapped
    return table
