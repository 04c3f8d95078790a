"""Cityscapes: urban street scenes, 19 evaluated classes ("train ids").

Layout under `root`:
  leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
Example ids are "<city>_<seq>_<frame>". The labelIds masks hold the 34 full label ids;
they are mapped in-graph to the 19 train ids, everything else to the ignore label.

`examples(split)` takes a split folder name (train, val, test, train_extra...) or a list
file with one example per line: an id, an image path, or "IMAGE MASK" paths relative to
`root` (the form of the published semi-supervised split files).
"""

from __future__ import annotations

import glob
import os

import numpy as np

from kssl.constants import IGNORE_LABEL
from kssl.data.examples import DatasetInfo, Examples
from kssl.data.readers import base
from kssl.data.readers.base import DataError, Reader

# (name, label id in the labelIds masks, RGB colour), in train-id order.
_CLASSES = (
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)
CLASS_NAMES = tuple(name for name, _, _ in _CLASSES)
PALETTE = np.array([colour for _, _, colour in _CLASSES], np.uint8)
LABEL_TYPES = ("labelIds", "labelTrainIds")
_SPLIT_ORDER = ("train", "val", "test", "train_extra")


def label_id_to_train_id() -> np.ndarray:
    """The 256-entry map from Cityscapes label ids to train ids (255 for the rest)."""
    table = np.full([256], IGNORE_LABEL, np.uint8)
    for train_id, (_, label_id, _) in enumerate(_CLASSES):
        table[label_id] = train_id
    return table


class Cityscapes(Reader):
    """Cityscapes fine annotations, evaluated on the 19 train-id classes.

    Args:
      root: the folder holding leftImg8bit/ and gtFine/.
      annotation: annotation folder and file infix, "gtFine" (or "gtCoarse").
      label_type: "labelIds" (the official masks, mapped to train ids here) or
        "labelTrainIds" (masks already converted by cityscapesScripts; used as they are).
    """

    def __init__(self, root: str, annotation: str = "gtFine", label_type: str = "labelIds"):
        if label_type not in LABEL_TYPES:
            raise ValueError(f"Cityscapes: label_type must be one of {LABEL_TYPES}, "
                             f"got {label_type!r}")
        self.root = root
        self.annotation = annotation
        self.label_type = label_type
        # labelTrainIds masks are used unmapped, so a stray value stays visible to
        # validation instead of being folded into the ignore label.
        label_map = label_id_to_train_id() if label_type == "labelIds" else None
        self.info = DatasetInfo(name="cityscapes", class_names=CLASS_NAMES, palette=PALETTE,
                                label_map=label_map)

    # -- paths ----------------------------------------------------------------------
    def id_from_path(self, path: str) -> str:
        """"<city>_<seq>_<frame>" from any Cityscapes image or mask file name."""
        stem = os.path.splitext(os.path.basename(path))[0]
        return "_".join(stem.split("_")[:3])

    def _mask_path(self, split: str, example_id: str) -> str:
        city = example_id.rsplit("_", 2)[0]
        return os.path.join(self.root, self.annotation, split, city,
                            f"{example_id}_{self.annotation}_{self.label_type}.png")

    def _image_path(self, split: str, example_id: str) -> str:
        city = example_id.rsplit("_", 2)[0]
        return os.path.join(self.root, "leftImg8bit", split, city,
                            f"{example_id}_leftImg8bit.png")

    def _splits_on_disk(self):
        images = os.path.join(self.root, "leftImg8bit")
        found = sorted(d for d in os.listdir(images)
                       if os.path.isdir(os.path.join(images, d))) if os.path.isdir(images) else []
        return [s for s in _SPLIT_ORDER if s in found] + [s for s in found if s not in _SPLIT_ORDER]

    def _split_of(self, example_id: str):
        for split in self._splits_on_disk():
            if os.path.exists(self._image_path(split, example_id)):
                return split
        return None

    # -- listing --------------------------------------------------------------------
    def examples(self, split: str) -> Examples:
        """The examples of a split folder (sorted by id) or of a list file."""
        if os.path.isfile(split):
            return self._from_list(split)
        folder = os.path.join(self.root, "leftImg8bit", split)
        if not os.path.isdir(folder):
            raise DataError(f"Cityscapes: no split {split!r}: {folder} is not a folder and "
                            f"{split} is not a list file; splits on disk: "
                            f"{self._splits_on_disk() or 'none (wrong root?)'}")
        images = sorted(glob.glob(os.path.join(folder, "*", "*_leftImg8bit.png")))
        rows = []
        for image in images:
            example_id = self.id_from_path(image)
            rows.append((example_id, image, self._mask_path(split, example_id)))
        return base.build_examples(rows, source=folder)

    def _from_list(self, path: str) -> Examples:
        rows, unknown = [], []
        for columns in base.read_list_file(path):
            if len(columns) == 1 and not base.looks_like_path(columns[0]):
                example_id = columns[0]
                split = self._split_of(example_id)
                if split is None:
                    unknown.append(example_id)
                    continue
                rows.append((example_id, self._image_path(split, example_id),
                             self._mask_path(split, example_id)))
                continue
            mask = None
            if len(columns) == 2:
                self._check_mask_kind(path, columns[1])
                mask = base.resolve_under(self.root, columns[1])
            rows.append((self.id_from_path(columns[0]),
                         base.resolve_under(self.root, columns[0]), mask))
        if unknown:
            raise DataError(f"{path}: {len(unknown)} id(s) have no image under "
                            f"{os.path.join(self.root, 'leftImg8bit')}/<split>/<city>/: "
                            f"{unknown[:5]}")
        return base.build_examples(rows, source=path)

    def _check_mask_kind(self, list_path: str, mask: str):
        # Reading train-id masks as label ids (or the reverse) gives plausible but wrong
        # classes with no error anywhere later, so a mismatch is refused here.
        other = [t for t in LABEL_TYPES if t != self.label_type][0]
        if mask.endswith(f"_{other}.png"):
            raise DataError(
                f"{list_path}: mask {mask} is a {other} file but this reader reads "
                f"{self.label_type}; use Cityscapes(label_type={other!r})")
