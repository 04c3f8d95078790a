"""Your own data: a folder of images, and optionally a folder of masks.

The mask of `images/<stem>.<ext>` is `masks/<stem><mask_suffix>.png` (a .bmp works too).
Masks are either single-channel class-id images (8-bit grey, or indexed-colour PNGs
whose palette index is the class id, as most annotation tools save them) or RGB
colour-coded images decoded through `mask_palette`. A folder of images without masks is a
valid unlabelled pool.

Example (colour-coded masks, black meaning "not annotated"):

    Folder("data/images", "data/masks", class_names=("background", "crack"),
           mask_palette=[(0, 0, 255), (255, 0, 0)], ignore_colours=[(0, 0, 0)],
           splits={"train": "data/train.txt", "val": "data/val.txt"})
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np

from kssl.constants import IGNORE_LABEL
from kssl.data.examples import DatasetInfo, Examples
from kssl.data.readers import base
from kssl.data.readers.base import UNKNOWN_COLOUR, DataError, Reader
from kssl.data.readers.voc import voc_palette

# Preference when one stem has several mask files: lossless formats first.
_MASK_EXTENSIONS = (".png", ".bmp") + tuple(
    e for e in base.IMAGE_EXTENSIONS if e not in (".png", ".bmp"))


class Folder(Reader):
    """Images in one folder, masks (optional) in another, matched by file name.

    Args:
      images_dir: folder of images (.jpg, .jpeg, .png, .bmp, .gif).
      masks_dir: folder of masks, or None for an unlabelled pool. An image without a
        mask file gets no mask; validation names it when masks are needed. May equal
        images_dir when mask_suffix tells masks apart ("x.jpg" + "x_mask.png").
      class_names: names of classes 0..K-1. May be omitted when num_classes or
        mask_palette gives K (names are then "class_0", "class_1", ...).
      num_classes: K, when class_names are not given.
      mask_palette: for RGB colour-coded masks: one [R, G, B] per class, index = class id.
        None means masks are single-channel class ids.
      ignore_colours: [R, G, B] colours of colour-coded masks that mean "ignore" (255).
        A colour neither here nor in mask_palette is reported by validation.
      ignore_values: raw values of single-channel masks that mean "ignore" (255 always
        does), e.g. (0,) when 0 marks unannotated pixels.
      value_map: {raw value: class id or 255} for single-channel masks, e.g. {255: 1} for
        masks that store foreground as 255. Unlisted values are class ids as they are.
      palette: colours for drawing predictions, [K, 3]; default mask_palette, else the
        VOC colour map.
      mask_suffix: text between the image stem and the mask extension ("_mask").
      splits: {split name: list file} so that examples(name) reads that list. A list
        file has one example per line: an id (the image path under images_dir without
        extension), an image path, or "IMAGE MASK" paths (taken as they are when they
        exist, else relative to the list file's folder).
      recursive: also read subfolders; ids are then relative paths ("street/0001").
      name: dataset name shown in logs.
    """

    def __init__(self, images_dir: str, masks_dir: Optional[str] = None,
                 class_names: Optional[Sequence[str]] = None,
                 num_classes: Optional[int] = None,
                 mask_palette: Optional[Sequence[Sequence[int]]] = None,
                 ignore_colours: Sequence[Sequence[int]] = (),
                 ignore_values: Sequence[int] = (),
                 value_map: Optional[Mapping[int, int]] = None,
                 palette: Optional[Sequence[Sequence[int]]] = None,
                 mask_suffix: str = "",
                 splits: Optional[Mapping[str, str]] = None,
                 recursive: bool = False,
                 name: str = "folder"):
        self.images_dir = images_dir
        self.masks_dir = masks_dir
        self.mask_suffix = mask_suffix
        self.splits = dict(splits or {})
        self.recursive = recursive
        if masks_dir is not None and _same_folder(images_dir, masks_dir) and not mask_suffix:
            raise ValueError("Folder: masks_dir is images_dir, so mask_suffix must tell "
                             "masks apart from images (e.g. mask_suffix='_mask')")
        class_names = _class_names(class_names, num_classes, mask_palette)
        k = len(class_names)
        if mask_palette is not None:
            if value_map or ignore_values:
                raise ValueError("Folder: value_map/ignore_values are for single-channel "
                                 "masks; colour-coded masks use mask_palette/ignore_colours")
            colours = _colour_table(mask_palette, "mask_palette")
            ignore = _colour_table(ignore_colours, "ignore_colours") if len(ignore_colours) \
                else np.zeros([0, 3], np.uint8)
            all_colours = np.concatenate([colours, ignore])
            _check_distinct(all_colours)
            if len(all_colours) >= UNKNOWN_COLOUR:
                raise ValueError(f"Folder: at most {UNKNOWN_COLOUR - 1} palette and ignore "
                                 f"colours, got {len(all_colours)}")
            # The ignore colours are extra palette entries K.. that the label map sends to
            # 255; UNKNOWN_COLOUR keeps its value so validation still sees it.
            label_map = base.identity_label_map()
            label_map[k:len(all_colours)] = IGNORE_LABEL
            mask_palette_array, default_palette = all_colours, colours
        else:
            if ignore_colours:
                raise ValueError("Folder: ignore_colours needs mask_palette (colour masks)")
            label_map = _value_label_map(ignore_values, value_map)
            mask_palette_array, default_palette = None, voc_palette(max(k, 1))[:k]
        draw = default_palette if palette is None else _colour_table(palette, "palette")
        if len(draw) != k:
            raise ValueError(f"Folder: palette has {len(draw)} colours for {k} classes")
        self.info = DatasetInfo(name=name, class_names=class_names, palette=draw,
                                label_map=label_map, mask_palette=mask_palette_array)

    # -- ids and files --------------------------------------------------------------
    def id_from_path(self, path: str) -> str:
        """The id of an image or mask path: its path under images_dir (or masks_dir,
        less mask_suffix) without extension; for other paths the file stem."""
        for folder, suffix in ((self.images_dir, ""), (self.masks_dir, self.mask_suffix)):
            relative = _relative_stem(path, folder) if folder else None
            if relative is not None:
                if suffix and relative.endswith(suffix):
                    relative = relative[:-len(suffix)]
                return relative
        stem = os.path.splitext(os.path.basename(path))[0]
        if self.mask_suffix and stem.endswith(self.mask_suffix):
            stem = stem[:-len(self.mask_suffix)]
        return stem

    def _scan(self, folder: str, extensions) -> dict:
        """{relative stem: path} of the files in `folder` with these extensions, the
        earlier extension winning when a stem has several."""
        found = {}
        rank = {e: r for r, e in enumerate(extensions)}
        for directory, subdirs, files in os.walk(folder):
            subdirs.sort()
            for file_name in files:
                extension = os.path.splitext(file_name)[1].lower()
                if extension not in rank:
                    continue
                path = os.path.join(directory, file_name)
                stem = _relative_stem(path, folder)
                previous = found.get(stem)
                if previous is None or rank[extension] < rank[
                        os.path.splitext(previous)[1].lower()]:
                    found[stem] = path
            if not self.recursive:
                break
        return found

    def _images(self) -> dict:
        if not os.path.isdir(self.images_dir):
            raise DataError(f"Folder: images_dir {self.images_dir} is not a folder")
        images = {}
        masks_beside = bool(self.masks_dir and self.mask_suffix
                            and _same_folder(self.images_dir, self.masks_dir))
        masks_real = os.path.realpath(self.masks_dir) if self.masks_dir else None
        for directory, subdirs, files in os.walk(self.images_dir):
            # A masks folder inside images_dir holds masks, not more images.
            subdirs[:] = sorted(d for d in subdirs
                                if os.path.realpath(os.path.join(directory, d)) != masks_real)
            for file_name in sorted(files):
                if os.path.splitext(file_name)[1].lower() not in base.IMAGE_EXTENSIONS:
                    continue
                path = os.path.join(directory, file_name)
                stem = _relative_stem(path, self.images_dir)
                if masks_beside and stem.endswith(self.mask_suffix):
                    continue  # a mask stored beside its image
                if stem in images:
                    raise DataError(f"Folder: two images with id {stem!r}: {images[stem]} and "
                                    f"{path}; ids are file names without extension")
                images[stem] = path
            if not self.recursive:
                break
        return images

    def _masks(self) -> dict:
        if self.masks_dir is None:
            return {}
        if not os.path.isdir(self.masks_dir):
            raise DataError(f"Folder: masks_dir {self.masks_dir} is not a folder")
        masks = self._scan(self.masks_dir, _MASK_EXTENSIONS)
        if not self.mask_suffix:
            return masks
        return {stem[:-len(self.mask_suffix)]: path for stem, path in masks.items()
                if stem.endswith(self.mask_suffix)}

    # -- listing --------------------------------------------------------------------
    def examples(self, split: str = "all") -> Examples:
        """"all" (every image, sorted by id), a name in `splits`, or a list file path."""
        images, masks = self._images(), self._masks()
        if split == "all":
            rows = [(i, images[i], masks.get(i)) for i in sorted(images)]
            return base.build_examples(rows, source=self.images_dir)
        path = self.splits.get(split, split)
        if not os.path.isfile(path):
            raise DataError(f"Folder: split {split!r} is not 'all', a name in splits "
                            f"{sorted(self.splits)} or an existing list file"
                            + (f" ({path} does not exist)" if split in self.splits else ""))
        rows, unknown = [], []
        list_folder = os.path.dirname(os.path.abspath(path))
        for columns in base.read_list_file(path):
            if len(columns) == 2:
                image, mask = (_resolve_listed(c, list_folder) for c in columns)
                rows.append((self.id_from_path(image), image, mask))
                continue
            example_id = (self.id_from_path(_resolve_listed(columns[0], list_folder))
                          if base.looks_like_path(columns[0]) else columns[0])
            if example_id not in images:
                unknown.append(columns[0])
                continue
            rows.append((example_id, images[example_id], masks.get(example_id)))
        if unknown:
            raise DataError(f"{path}: {len(unknown)} line(s) name no image in "
                            f"{self.images_dir}: {unknown[:5]}")
        return base.build_examples(rows, source=path)


def _same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _relative_stem(path: str, folder: str) -> Optional[str]:
    """path's location under folder without extension ("sub/x"), or None if outside."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    if relative.startswith(os.pardir):
        return None
    return os.path.splitext(relative)[0].replace(os.sep, "/")


def _resolve_listed(path: str, list_folder: str) -> str:
    return path if os.path.exists(path) else os.path.join(list_folder, path)


def _class_names(class_names, num_classes, mask_palette) -> tuple:
    if class_names is not None:
        names = tuple(str(n) for n in class_names)
        if num_classes is not None and num_classes != len(names):
            raise ValueError(f"Folder: {len(names)} class_names but num_classes={num_classes}")
    elif num_classes is not None:
        names = tuple(f"class_{k}" for k in range(int(num_classes)))
    elif mask_palette is not None:
        names = tuple(f"class_{k}" for k in range(len(mask_palette)))
    else:
        names = ()  # an unlabelled pool needs no classes
    if mask_palette is not None and len(mask_palette) != len(names):
        raise ValueError(f"Folder: mask_palette has {len(mask_palette)} colours for "
                         f"{len(names)} classes")
    if len(names) > IGNORE_LABEL - 1:
        raise ValueError(f"Folder: at most {IGNORE_LABEL - 1} classes, got {len(names)}")
    return names


def _colour_table(colours, what: str) -> np.ndarray:
    table = np.asarray(colours, np.int64)
    if table.ndim != 2 or table.shape[1] != 3 or table.min() < 0 or table.max() > 255:
        raise ValueError(f"Folder: {what} must be a list of [R, G, B] with values 0..255, "
                         f"got {colours!r}")
    return table.astype(np.uint8)


def _check_distinct(colours: np.ndarray):
    seen = {}
    for index, colour in enumerate(map(tuple, colours.tolist())):
        if colour in seen:
            raise ValueError(f"Folder: colour {colour} is listed twice (entries {seen[colour]} "
                             f"and {index} of mask_palette + ignore_colours)")
        seen[colour] = index


def _value_label_map(ignore_values, value_map) -> Optional[np.ndarray]:
    if not ignore_values and not value_map:
        return None
    table = base.identity_label_map()
    for value in ignore_values:
        _check_byte(value, "ignore_values")
        table[value] = IGNORE_LABEL
    for raw, class_id in (value_map or {}).items():
        _check_byte(raw, "value_map key")
        _check_byte(class_id, "value_map value")
        table[raw] = class_id
    return table


def _check_byte(value, what: str):
    if int(value) != value or not 0 <= value <= 255:
        raise ValueError(f"Folder: {what} must be an integer 0..255, got {value!r}")
