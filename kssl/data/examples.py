"""The records every reader produces: a list of examples and what the dataset is.

A reader turns a dataset layout on disk (or a tfds dataset) into an `Examples` list for a
split. Everything after that (subset selection, validation, the tf.data pipeline) works on
`Examples` alone, so it never needs to know which layout the files came from.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from kssl.constants import IGNORE_LABEL  # noqa: F401  (also read from here)


class DataError(ValueError):
    """A dataset problem found before training: names the file, the value and what was expected."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a dataset's labels mean.

    Attributes:
      name: short name, e.g. "camvid".
      class_names: one name per class id 0..num_classes-1.
      palette: uint8 array [num_classes, 3], the RGB colour of each class (for drawing
        predictions).
      label_map: optional uint8 array [256]: raw mask value -> class id or IGNORE_LABEL,
        applied in-graph when a mask is decoded (Cityscapes labelIds -> train ids,
        CamVid void 11 -> 255). None means raw values are class ids already.
      mask_palette: optional uint8 array [K, 3]: masks are RGB colour-coded and colour k
        means class k; a colour not in it is an error. None means single-channel masks.
    """

    name: str
    class_names: tuple
    palette: np.ndarray
    label_map: Optional[np.ndarray] = None
    mask_palette: Optional[np.ndarray] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class Examples:
    """One split of a dataset: parallel lists, one entry per example.

    Attributes:
      ids: stable example ids (unique within the dataset), e.g. "2007_000032".
      images: image file paths, or for a tfds source the element index as a string.
      masks: mask file paths (None entries, or masks=None, where there is no mask).
      source: where the list came from, for error messages (a file or a folder).
    """

    ids: tuple
    images: tuple
    masks: Optional[tuple] = None
    source: str = ""

    def __post_init__(self):
        if len(set(self.ids)) != len(self.ids):
            seen, dupes = set(), []
            for i in self.ids:
                if i in seen:
                    dupes.append(i)
                seen.add(i)
            raise ValueError(f"{self.source or 'examples'}: duplicate example ids {dupes[:5]}")
        if len(self.images) != len(self.ids):
            raise ValueError("Examples: ids and images differ in length")
        if self.masks is not None and len(self.masks) != len(self.ids):
            raise ValueError("Examples: ids and masks differ in length")
        for name in (*self.images, *(self.masks or ())):
            check_utf8_name(name, self.source)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_masks(self) -> bool:
        return self.masks is not None and all(m is not None for m in self.masks)

    def without_masks(self) -> "Examples":
        """The same examples with their masks dropped (an unlabelled pool)."""
        return Examples(self.ids, self.images, None, self.source)

    def select(self, ids: Sequence[str]) -> "Examples":
        """The examples with these ids, in this order; an unknown id is an error."""
        index = {example_id: k for k, example_id in enumerate(self.ids)}
        missing = [i for i in ids if i not in index]
        if missing:
            raise ValueError(
                f"{len(missing)} id(s) not in {self.source or 'the dataset'}: {missing[:5]}")
        rows = [index[i] for i in ids]
        masks = None if self.masks is None else tuple(self.masks[r] for r in rows)
        return Examples(tuple(ids), tuple(self.images[r] for r in rows), masks, self.source)


def check_utf8_name(path, source: str = "") -> None:
    """Raises DataError naming `path` when it is a file name that is not valid UTF-8.

    Python lists such a name with surrogate escapes, which TensorFlow's file ops (UTF-8
    strings) and the id hashing cannot encode; failing here names the file.
    """
    if not isinstance(path, str):
        return
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise DataError(f"file name is not valid UTF-8: {shown}"
                        f"{f' (in {source})' if source else ''}; expected UTF-8 names "
                        "(TensorFlow reads UTF-8 paths only): rename the file") from None
