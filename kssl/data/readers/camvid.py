"""CamVid in the SegNet layout: 11 road-scene classes, 360x480 images.

Layout under `root`:
  train/ val/ test/                   images
  trainannot/ valannot/ testannot/    single-channel masks, 0..10 classes, 11 void
  train.txt val.txt test.txt          "IMAGE MASK" per line
The list files keep SegNet's absolute paths ("/SegNet/CamVid/train/x.png"), which exist on
nobody's machine, so every path is resolved against `root` by its last two components.
Any list file in that format works as a split (e.g. root/splits/1_8/labeled.txt); a list
may also give only the image column (an unlabelled list) or bare ids. Void (11) is mapped
to the ignore label.
"""

from __future__ import annotations

import os

import numpy as np

from kssl.constants import IGNORE_LABEL
from kssl.data.examples import DatasetInfo, Examples
from kssl.data.readers import base
from kssl.data.readers.base import DataError, Reader

CLASS_NAMES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
               "Car", "Pedestrian", "Bicyclist")
PALETTE = np.array([
    [128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222],
    [128, 128, 0], [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192],
], np.uint8)
VOID = 11
_IMAGE_FOLDERS = ("train", "val", "test")
_IMAGE_EXTENSIONS = (".png", ".jpg")


def void_to_ignore() -> np.ndarray:
    """The label map: classes 0..10 unchanged, void 11 -> 255; other values stay as they
    are so that validation reports them."""
    table = base.identity_label_map()
    table[VOID] = IGNORE_LABEL
    return table


class CamVid(Reader):
    """CamVid (SegNet layout and splits).

    Args:
      root: the folder holding train.txt, train/, trainannot/, ...
    """

    def __init__(self, root: str):
        self.root = root
        self.info = DatasetInfo(name="camvid", class_names=CLASS_NAMES, palette=PALETTE,
                                label_map=void_to_ignore())

    def _resolve(self, path: str) -> str:
        tail = path.replace("\\", "/").rstrip("/").split("/")[-2:]
        return os.path.join(self.root, *tail)

    def _from_id(self, example_id: str):
        for folder in _IMAGE_FOLDERS:
            for extension in _IMAGE_EXTENSIONS:
                image = os.path.join(self.root, folder, example_id + extension)
                if os.path.exists(image):
                    return image, os.path.join(self.root, folder + "annot", example_id + ".png")
        return None

    def examples(self, split: str) -> Examples:
        """The examples of "train"/"val"/"test" (root/<split>.txt) or of a list file."""
        path = base.list_file_for(split, self.root)
        if path is None:
            raise DataError(f"CamVid: no split {split!r}: neither a file nor "
                            f"{os.path.join(self.root, split + '.txt')}; splits there: "
                            f"{base.available_splits(self.root) or 'none (wrong root?)'}")
        rows, unknown = [], []
        for columns in base.read_list_file(path):
            if len(columns) == 1 and not base.looks_like_path(columns[0]):
                found = self._from_id(columns[0])
                if found is None:
                    unknown.append(columns[0])
                else:
                    rows.append((columns[0],) + found)
                continue
            mask = self._resolve(columns[1]) if len(columns) == 2 else None
            rows.append((self.id_from_path(columns[0]), self._resolve(columns[0]), mask))
        if unknown:
            raise DataError(f"{path}: {len(unknown)} id(s) have no image in "
                            f"{', '.join(os.path.join(self.root, f) for f in _IMAGE_FOLDERS)}: "
                            f"{unknown[:5]}")
        return base.build_examples(rows, source=path)
