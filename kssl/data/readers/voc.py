"""PASCAL VOC 2012 (with the SBD "aug" masks): 20 object classes plus background.

Layout under `root` (the VOCdevkit/VOC2012 folder, with SegmentationClassAug added):
  JPEGImages/<id>.jpg
  SegmentationClassAug/<id>.png      class ids 0..20, 255 on object boundaries / ignore
  SegmentationClass/<id>.png         the original indexed-colour masks (mask_dir option)
  ImageSets/Segmentation/<split>.txt train, val, train_aug, ...

A split list has one example per line, in any of three forms:
  2007_000032                                                    an id (labelled)
  /JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png  image and mask
  /JPEGImages/2007_000032.jpg                                    an image (unlabelled)
Paths are resolved against `root`.
"""

from __future__ import annotations

import os

import numpy as np

from kssl.data.examples import DatasetInfo, Examples
from kssl.data.readers import base
from kssl.data.readers.base import DataError, Reader

CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)


def voc_palette(num_colours: int = 256) -> np.ndarray:
    """The VOC colour map, uint8 [num_colours, 3].

    Colour of index i: the bits of i are dealt out in turn to red, green and blue, from
    the most significant bit of each channel down (index 1 is dark red, 255 the boundary
    cream 224 224 192). Distinct indices get distinct colours.
    """
    palette = np.zeros([num_colours, 3], np.uint8)
    for index in range(num_colours):
        value, colour = index, [0, 0, 0]
        for bit in range(7, -1, -1):
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << bit
            value >>= 3
        palette[index] = colour
    return palette


class VOC(Reader):
    """PASCAL VOC 2012 segmentation, optionally with the SBD augmented masks.

    Args:
      root: the VOC2012 folder (holding JPEGImages/, ImageSets/, the mask folder).
      mask_dir: mask folder under root: "SegmentationClassAug" (single-channel class ids)
        or "SegmentationClass" (the original indexed-colour PNGs; their palette indices
        are the class ids, 255 the boundary).
      image_dir: image folder under root.
      lists_dir: folder under root holding <split>.txt list files.
    """

    def __init__(self, root: str, mask_dir: str = "SegmentationClassAug",
                 image_dir: str = "JPEGImages",
                 lists_dir: str = os.path.join("ImageSets", "Segmentation")):
        self.root = root
        self.mask_dir = mask_dir
        self.image_dir = image_dir
        self.lists_dir = os.path.join(root, lists_dir)
        self.info = DatasetInfo(name="voc", class_names=CLASS_NAMES,
                                palette=voc_palette(len(CLASS_NAMES)))

    def examples(self, split: str) -> Examples:
        """The examples of a split name (a list in lists_dir) or of a list file path."""
        path = base.list_file_for(split, self.lists_dir)
        if path is None:
            raise DataError(
                f"VOC: no split {split!r}: neither a file nor "
                f"{os.path.join(self.lists_dir, split + '.txt')}; splits there: "
                f"{base.available_splits(self.lists_dir) or 'none (wrong root?)'}")
        rows = []
        for columns in base.read_list_file(path):
            if len(columns) == 1 and not base.looks_like_path(columns[0]):
                example_id = columns[0]
                rows.append((example_id,
                             os.path.join(self.root, self.image_dir, example_id + ".jpg"),
                             os.path.join(self.root, self.mask_dir, example_id + ".png")))
            else:
                image = base.resolve_under(self.root, columns[0])
                mask = base.resolve_under(self.root, columns[1]) if len(columns) == 2 else None
                rows.append((self.id_from_path(columns[0]), image, mask))
        return base.build_examples(rows, source=path)
