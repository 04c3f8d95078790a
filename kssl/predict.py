"""Predicting a folder of images and drawing the class maps in colour."""

from __future__ import annotations

import os
from typing import List

import numpy as np
import tensorflow as tf

from kssl.constants import IGNORE_LABEL
from kssl.data.examples import check_utf8_name
from kssl.data.readers.base import DataError, decode_image
from kssl.evaluation import predict_logits, progress_bar, resolve_mode

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
IGNORE_COLOUR = (255, 255, 255)
"""Colour of IGNORE_LABEL pixels in `colorize` (e.g. when drawing ground-truth masks)."""


def colorize(class_ids, palette) -> np.ndarray:
    """uint8 RGB [..., 3] image of integer class ids [...] through `palette` [C, 3].

    IGNORE_LABEL pixels are white; any other id outside [0, C) is black.
    """
    palette = np.asarray(palette, np.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"colorize: palette must be [num_classes, 3], got {palette.shape}")
    ids = np.asarray(class_ids).astype(np.int64)
    lookup = np.zeros((max(256, len(palette)) + 1, 3), np.uint8)
    lookup[:len(palette)] = palette
    if IGNORE_LABEL >= len(palette):
        lookup[IGNORE_LABEL] = IGNORE_COLOUR
    # Anything else out of range reads the last (black) row.
    return lookup[np.where((ids >= 0) & (ids < len(lookup)), ids, len(lookup) - 1)]


def list_images(input_dir: str) -> List[str]:
    """The image files (jpg/jpeg/png/bmp, any case) directly in a folder, sorted by name."""
    if not tf.io.gfile.isdir(input_dir):
        raise FileNotFoundError(f"{input_dir}: not a folder")
    try:
        listed = tf.io.gfile.listdir(input_dir)
    except UnicodeDecodeError:  # a local name that is not UTF-8: list it to name it
        listed = os.listdir(input_dir)
    names = sorted(n for n in listed if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ValueError(f"{input_dir}: no images found (expected files ending in "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    for name in names:
        check_utf8_name(os.path.join(input_dir, name))
    return [os.path.join(input_dir, n) for n in names]


def check_images(paths: List[str]) -> None:
    """Raises DataError naming the first of `paths` that does not decode as an image
    (e.g. a text file named .jpg), so a folder is refused before any mask is written."""
    from kssl.data.validate import _op_error_text

    def shape(path):
        return path, tf.shape(decode_image(path))

    # One parallel pass; the files that drop out of it are decoded again to say why.
    decoded = tf.data.Dataset.from_tensor_slices(paths).map(
        shape, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    readable = {path.decode("utf-8") for path, _ in decoded.as_numpy_iterator()}
    bad = [path for path in paths if path not in readable]
    if bad:
        try:
            decode_image(tf.constant(bad[0]))
            reason = "it fails to decode"
        except tf.errors.OpError as error:
            reason = _op_error_text(error)
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]} is not an image kssl can read ({reason}); expected a "
                        f"JPEG, PNG, BMP or GIF file{more}")


def _resolved(path: str) -> str:
    """`path` with links and `..` resolved (a URL as given), to compare two folders."""
    return path.rstrip("/") if "://" in path else os.path.realpath(path)


def predict_folder(model, input_dir: str, output_dir: str, palette, input_size=None,
                   mode: str = "whole", window=None, stride=None, flip: bool = False,
                   write_ids: bool = False, progress: bool = True,
                   overwrite: bool = False) -> List[str]:
    """Segments every image in `input_dir` and writes `<output_dir>/<stem>.png` colour masks.

    With `write_ids` also writes `<stem>_ids.png`, the class ids as a single-channel PNG.
    `input_size`, `mode`, `window`, `stride` and `flip` are as in
    `kssl.evaluation.predict_logits`. Refuses, before writing anything, an `output_dir`
    that is or lies inside `input_dir`, and, unless `overwrite`, one that already holds a
    file of the names it would write. Returns the written paths.
    """
    resolve_mode(mode, window, stride, input_size)  # argument errors before any work
    source, target = _resolved(input_dir), _resolved(output_dir)
    if target == source or target.startswith(source.rstrip(os.sep) + os.sep):
        raise ValueError(f"{output_dir}: the output folder is, or is inside, the input "
                         f"folder {input_dir}; choose an output folder outside it")
    paths = list_images(input_dir)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise ValueError(f"{input_dir}: images {clashes} share a name stem and would write "
                         "the same output file")
    check_images(paths)
    ends = ("", "_ids") if write_ids else ("",)
    outputs = [os.path.join(output_dir, f"{stem}{end}.png") for stem in stems for end in ends]
    existing = [path for path in outputs if tf.io.gfile.exists(path)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]} already exists{more}: choose an output folder "
                              "without earlier masks, or pass --overwrite to replace them")
    tf.io.gfile.makedirs(output_dir)

    @tf.function(autograph=False,
                 input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    def segment(image):
        logits = predict_logits(model, image[None], mode, window, stride, input_size, flip)
        return tf.argmax(logits[0], axis=-1, output_type=tf.int32)

    # Decoding in tf.data overlaps file reads with the model; images keep their own size.
    images = tf.data.Dataset.from_tensor_slices(paths).map(
        decode_image, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    bar = progress_bar(len(paths), unit_name="image") if progress else None
    written = []
    for k, (path, stem, image) in enumerate(zip(paths, stems, images)):
        ids = segment(image).numpy()
        colour_path = os.path.join(output_dir, f"{stem}.png")
        tf.io.write_file(colour_path, tf.io.encode_png(colorize(ids, palette)))
        written.append(colour_path)
        if write_ids:
            if ids.max(initial=0) > 255:
                raise ValueError(f"{path}: class id {ids.max()} does not fit an 8-bit PNG")
            ids_path = os.path.join(output_dir, f"{stem}_ids.png")
            tf.io.write_file(ids_path, tf.io.encode_png(ids.astype(np.uint8)[..., None]))
            written.append(ids_path)
        if bar is not None:
            bar.update(k + 1)
    return written
