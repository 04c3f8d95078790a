"""What every dataset reader offers, and the decoding shared by the file-based ones."""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf

from kssl.constants import IGNORE_LABEL
from kssl.data.examples import DataError, DatasetInfo, Examples

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
"""File name endings `decode_image` reads (compared case-insensitively)."""

UNKNOWN_COLOUR = 254
"""What a mask pixel decodes to when the file cannot express a class id: a colour outside
the palette (colour-coded masks), an RGB pixel whose channels differ in a single-channel
mask, or a 16-bit value above 255. Validation reports it."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Reader:
    """A dataset layout: lists the examples of a split and decodes them in tf.data.

    Subclasses set `info` and implement `examples(split)`. File-based readers inherit
    `load`, which decodes `Examples` into a dataset of dicts:
      {"id": string, "image": uint8 [H, W, 3], "mask": uint8 [H, W]}  ("mask" only when
    `with_masks`), with raw mask values already mapped to class ids or IGNORE_LABEL.
    """

    info: DatasetInfo

    @property
    def file_based(self) -> bool:
        """True when `Examples.images`/`masks` are file paths that validation checks exist.

        A reader that overrides `load` (tfds, the generated Shapes set) produces its data
        another way, and its "paths" are element indices.
        """
        return type(self).load is Reader.load

    def examples(self, split: str) -> Examples:
        """The examples of a split: a split name or a list file, as each reader documents."""
        raise NotImplementedError

    def id_from_path(self, path: str) -> str:
        """The example id that an image (or mask) path in a list file stands for."""
        return os.path.splitext(os.path.basename(path))[0]

    # -- decoding -------------------------------------------------------------------
    def load(self, examples: Examples, with_masks: bool = True) -> tf.data.Dataset:
        """A tf.data.Dataset of decoded examples, in list order, not shuffled."""
        if with_masks and not examples.has_masks:
            raise DataError(_missing_masks_message(examples))
        columns = {"id": list(examples.ids), "image": list(examples.images)}
        if with_masks:
            columns["mask"] = list(examples.masks)
        ds = tf.data.Dataset.from_tensor_slices(columns)
        return ds.map(self.decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def decode(self, row: dict) -> dict:
        """Reads the files one row names (tf ops only, usable inside tf.data.map)."""
        out = {"id": row["id"], "image": decode_image(row["image"])}
        if "mask" in row:
            out["mask"] = self.decode_mask(row["mask"])
        return out

    def decode_mask(self, path: tf.Tensor) -> tf.Tensor:
        """A mask file as uint8 [H, W] class ids, with the dataset's label map applied."""
        info = self.info
        contents = tf.io.read_file(path)
        if info.mask_palette is not None:
            mask = rgb_to_class_ids(decode_mask_rgb(contents, path), info.mask_palette)
        else:
            mask = decode_label_png(contents, path)
        if info.label_map is not None:
            mask = tf.gather(tf.constant(info.label_map, tf.uint8), tf.cast(mask, tf.int32))
        return mask


def _missing_masks_message(examples: Examples) -> str:
    if examples.masks is None:
        return f"{examples.source or 'examples'}: asked for masks but the list has no masks"
    lacking = [i for i, m in zip(examples.images, examples.masks) if m is None]
    return (f"{examples.source or 'examples'}: asked for masks but {len(lacking)} image(s) "
            f"have none, e.g. {lacking[:3]}")


def decode_image(path: tf.Tensor) -> tf.Tensor:
    """Any JPEG/PNG/BMP/GIF file as uint8 [H, W, 3]."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


# -- masks ------------------------------------------------------------------------------
def _header(contents: tf.Tensor) -> tf.Tensor:
    """The first 26 bytes of a file as uint8 (zero-padded, so short files do not fail here)."""
    padded = tf.strings.join([contents, tf.constant(b"\0" * 26)])
    return tf.io.decode_raw(tf.strings.substr(padded, 0, 26), tf.uint8)


def _assert_lossless(header: tf.Tensor, path) -> Tuple[tf.Tensor, tf.Tensor]:
    """(is_png, is_bmp), after asserting the file is one of them.

    tf.io.decode_png silently decodes JPEG too, and a JPEG mask has wrong values along
    every edge, so masks in any other format are refused with the file named.
    """
    is_png = tf.reduce_all(tf.equal(header[:8], tf.constant(list(_PNG_SIGNATURE), tf.uint8)))
    is_bmp = tf.logical_and(tf.equal(header[0], 66), tf.equal(header[1], 77))  # "BM"
    message = "mask file is not a PNG (or BMP) image; masks must be lossless:"
    path = "?" if path is None else path
    if tf.executing_eagerly():  # the same message as in graphs, not Assert's eager format
        if not bool(tf.logical_or(is_png, is_bmp)):
            name = path.numpy().decode("utf-8") if isinstance(path, tf.Tensor) else path
            raise tf.errors.InvalidArgumentError(None, None, f"{message} {name}")
        return is_png, is_bmp
    check = tf.debugging.Assert(tf.logical_or(is_png, is_bmp), [message, path])
    with tf.control_dependencies([check]):
        return tf.identity(is_png), tf.identity(is_bmp)


def decode_mask_rgb(contents: tf.Tensor, path=None) -> tf.Tensor:
    """A colour-coded mask file (PNG or BMP) as uint8 [H, W, 3]."""
    checked, _ = _assert_lossless(_header(contents), path)
    with tf.control_dependencies([checked]):
        rgb = tf.io.decode_image(contents, channels=3, expand_animations=False)
    rgb.set_shape([None, None, 3])
    return rgb


def decode_label_png(contents: tf.Tensor, path=None) -> tf.Tensor:
    """A single-channel label image's stored values as uint8 [H, W].

    tf.io.decode_png(channels=1) returns luminance, not stored values, for several PNG
    kinds that label files use; each is handled so the result is the value written:
      * palette (indexed) PNGs, e.g. VOC `SegmentationClass` and most annotation tools:
        the pixel's palette index (the first index, where the palette repeats a colour);
      * 1/2/4-bit greyscale: libpng scales 1 to 255, so the scale is undone;
      * 16-bit greyscale: read as uint16; values above 255 become UNKNOWN_COLOUR;
      * RGB(A) PNGs and BMPs: the value where R == G == B, UNKNOWN_COLOUR elsewhere (a
        colour-coded mask read without a mask palette).
    Non-PNG/BMP files (a JPEG mask) fail with an InvalidArgumentError naming `path`.
    """
    header = _header(contents)
    is_png, _ = _assert_lossless(header, path)
    # Most label files are plain 8-bit greyscale PNGs: those take the direct route, and
    # only the other kinds pay for the general decoder's branching.
    plain = tf.logical_and(is_png, tf.logical_and(tf.equal(header[24], 8),
                                                  tf.equal(header[25], 0)))
    mask = tf.cond(plain, lambda: tf.io.decode_png(contents, channels=1)[..., 0],
                   lambda: _decode_any_label_image(contents))
    mask.set_shape([None, None])
    return mask


# Traced once per process and reused by every tf.data map: the branches below take about
# a second to trace, which would otherwise be paid by every pipeline (and every test).
@tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
def _decode_any_label_image(contents: tf.Tensor) -> tf.Tensor:
    """decode_label_png for a PNG or BMP of any kind (already checked to be one)."""
    header = _header(contents)
    is_png = tf.reduce_all(tf.equal(header[:8], tf.constant(list(_PNG_SIGNATURE), tf.uint8)))
    is_bmp = tf.logical_not(is_png)
    bit_depth = tf.cast(header[24], tf.int32)
    colour_type = tf.cast(header[25], tf.int32)

    def palette_png():
        return _palette_indices(contents)

    def low_bit_grey():
        # libpng replicates bits (1 -> 255 for 1-bit), so dividing recovers the value.
        scale = tf.cast(255 // (tf.bitwise.left_shift(1, bit_depth) - 1), tf.uint8)
        return tf.io.decode_png(contents, channels=1)[..., 0] // scale

    def grey16():
        values = tf.cast(tf.io.decode_png(contents, channels=1, dtype=tf.uint16)[..., 0],
                         tf.int32)
        return tf.cast(tf.where(values > 255, UNKNOWN_COLOUR, values), tf.uint8)

    def colour():
        rgb = tf.io.decode_image(contents, channels=3, expand_animations=False)
        grey = tf.logical_and(tf.equal(rgb[..., 0], rgb[..., 1]),
                              tf.equal(rgb[..., 1], rgb[..., 2]))
        return tf.where(grey, rgb[..., 0], tf.constant(UNKNOWN_COLOUR, tf.uint8))

    def grey8():
        return tf.io.decode_png(contents, channels=1)[..., 0]

    png_grey = tf.logical_and(is_png, tf.logical_or(tf.equal(colour_type, 0),
                                                    tf.equal(colour_type, 4)))
    png_colour = tf.logical_and(is_png, tf.logical_or(tf.equal(colour_type, 2),
                                                      tf.equal(colour_type, 6)))
    # One switch_case rather than nested conds: cheaper to trace.
    kinds = [(is_bmp, colour), (tf.logical_and(is_png, tf.equal(colour_type, 3)), palette_png),
             (tf.logical_and(png_grey, bit_depth < 8), low_bit_grey),
             (tf.logical_and(png_grey, tf.equal(bit_depth, 16)), grey16),
             (png_colour, colour)]
    branch = tf.constant(len(kinds), tf.int32)  # default: 8-bit grey
    for k in reversed(range(len(kinds))):
        branch = tf.where(kinds[k][0], k, branch)
    mask = tf.switch_case(branch, [fn for _, fn in kinds] + [grey8])
    mask.set_shape([None, None])
    return mask


def _palette_indices(contents: tf.Tensor) -> tf.Tensor:
    """The palette index of every pixel of an indexed PNG, as uint8 [H, W].

    TensorFlow only offers the palette colours, so the file's PLTE chunk is read (walking
    the chunk list from the start, lengths as int64 so a corrupt file cannot loop) and
    each colour is mapped back to its index.
    """
    data = tf.cast(tf.io.decode_raw(contents, tf.uint8), tf.int64)
    size = tf.size(data, out_type=tf.int64)
    data = tf.concat([data, tf.zeros([12], tf.int64)], 0)  # reads past the end see zeros
    plte = tf.constant([80, 76, 84, 69], tf.int64)  # "PLTE"

    def chunk_length(pos):
        b = data[pos:pos + 4]
        return b[0] * 16777216 + b[1] * 65536 + b[2] * 256 + b[3]

    def not_found(pos):
        return tf.logical_and(pos + 8 <= size,
                              tf.reduce_any(tf.not_equal(data[pos + 4:pos + 8], plte)))

    (pos,) = tf.while_loop(not_found, lambda pos: (pos + 12 + chunk_length(pos),),
                           (tf.constant(8, tf.int64),))
    length = chunk_length(pos)
    found = tf.debugging.Assert(
        tf.logical_and(pos + 8 + length <= size, length >= 3),
        ["indexed PNG has no PLTE chunk"])
    with tf.control_dependencies([found]):
        palette = tf.reshape(data[pos + 8:pos + 8 + length - length % 3], [-1, 3])
    rgb = tf.io.decode_png(contents, channels=3)
    return tf.cast(_colour_indices(rgb, tf.cast(palette, tf.int32), UNKNOWN_COLOUR), tf.uint8)


def _colour_indices(rgb: tf.Tensor, palette: tf.Tensor, default: int) -> tf.Tensor:
    """int32 [H, W]: the lowest index k with palette[k] == pixel colour, else `default`."""
    return _colour_indices_fn(tf.cast(rgb, tf.uint8), tf.cast(palette, tf.int32),
                              tf.constant(default, tf.int32))


# Traced once per process (see _decode_label_png).
@tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8),
                              tf.TensorSpec([None, 3], tf.int32),
                              tf.TensorSpec([], tf.int32)], autograph=False)
def _colour_indices_fn(rgb, palette, default):
    codes = tf.cast(rgb, tf.int32)
    code = codes[..., 0] * 65536 + codes[..., 1] * 256 + codes[..., 2]
    keys = palette[:, 0] * 65536 + palette[:, 1] * 256 + palette[:, 2]
    # A stable sort keeps equal colours in index order, so searchsorted(side="left")
    # lands on the lowest index of a repeated colour.
    order = tf.argsort(keys, stable=True)
    sorted_keys = tf.gather(keys, order)
    flat = tf.reshape(code, [-1])
    slot = tf.minimum(tf.searchsorted(sorted_keys, flat, side="left"), tf.size(keys) - 1)
    hit = tf.equal(tf.gather(sorted_keys, slot), flat)
    index = tf.where(hit, tf.gather(order, slot), default)
    return tf.reshape(index, tf.shape(code))


def rgb_to_class_ids(rgb: tf.Tensor, palette: np.ndarray) -> tf.Tensor:
    """Maps an RGB colour-coded mask to class ids through `palette` ([K, 3] uint8).

    Colour k becomes class k; the ignore colour must be listed by the caller as an entry
    whose index maps to IGNORE_LABEL through the label map. A colour not in the palette
    becomes UNKNOWN_COLOUR (254), which validation reports as an unknown colour.
    """
    palette = tf.constant(np.asarray(palette, np.int32).reshape(-1, 3))
    return tf.cast(_colour_indices(rgb, palette, UNKNOWN_COLOUR), tf.uint8)


def mask_labels_valid(mask: tf.Tensor, num_classes: int) -> tf.Tensor:
    """True where a mask value is a class id or the ignore label."""
    mask = tf.cast(mask, tf.int32)
    return tf.logical_or(mask < num_classes, tf.equal(mask, IGNORE_LABEL))


# -- list files -------------------------------------------------------------------------
def read_list_file(path: str) -> List[Tuple[str, ...]]:
    """The rows of a split list file: whitespace-separated columns, one example per line.

    Blank lines and lines starting with '#' are skipped. Every row has one column (an id
    or an image path) or two (image path, mask path); anything else is a DataError naming
    the file and line.
    """
    if not tf.io.gfile.exists(path):
        raise DataError(f"split list file {path} does not exist")
    rows = []
    with tf.io.gfile.GFile(path, "r") as f:
        for number, line in enumerate(f, 1):
            columns = tuple(line.split())
            if not columns or columns[0].startswith("#"):
                continue
            if len(columns) > 2:
                raise DataError(
                    f"{path}:{number}: expected 'ID', 'IMAGE' or 'IMAGE MASK', got "
                    f"{len(columns)} columns: {line.strip()!r}")
            rows.append(columns)
    return rows


def looks_like_path(token: str) -> bool:
    """True for a list-file token that names a file rather than an example id."""
    return ("/" in token or "\\" in token
            or os.path.splitext(token)[1].lower() in IMAGE_EXTENSIONS)


def list_file_for(split: str, named_dir: str, suffix: str = ".txt") -> Optional[str]:
    """The list file a split argument means: an existing file path as given, else
    `named_dir/<split><suffix>` if that exists, else None."""
    if os.path.isfile(split):
        return split
    named = os.path.join(named_dir, split + suffix)
    return named if os.path.isfile(named) else None


def available_splits(named_dir: str, suffix: str = ".txt") -> List[str]:
    """The split names that have a list file in `named_dir` (for error messages)."""
    if not os.path.isdir(named_dir):
        return []
    return sorted(name[:-len(suffix)] for name in os.listdir(named_dir) if name.endswith(suffix))


def identity_label_map() -> np.ndarray:
    """A 256-entry uint8 label map that changes nothing (start here and edit entries)."""
    return np.arange(256, dtype=np.uint8)


def build_examples(rows: List[Tuple[str, str, Optional[str]]], source: str) -> Examples:
    """Examples from (id, image, mask-or-None) rows; masks=None when no row has a mask.

    A repeated id is a DataError naming the source and both images, since two list lines
    (or two files with the same stem) standing for one example is always a mistake.
    """
    first_image = {}
    for example_id, image, _ in rows:
        if example_id in first_image:
            raise DataError(f"{source}: example id {example_id!r} appears twice "
                            f"({first_image[example_id]} and {image}); ids must be unique")
        first_image[example_id] = image
    masks = tuple(row[2] for row in rows)
    return Examples(ids=tuple(row[0] for row in rows), images=tuple(row[1] for row in rows),
                    masks=None if all(m is None for m in masks) else masks, source=source)


def resolve_under(root: str, path: str) -> str:
    """A list-file path resolved against a dataset root.

    List files name paths from the dataset root, often with a leading '/' (VOC
    "/JPEGImages/x.jpg"); an absolute path that exists on this machine is kept as is.
    """
    if os.path.isabs(path) and os.path.exists(path):
        return path
    return os.path.join(root, path.replace("\\", "/").lstrip("/"))
