"""Checks a dataset before training, so that bad data fails in seconds with the file named
instead of hours later as a crash or, worse, as a silently wrong model.

`validate` checks that every file exists, decodes, that each image and its mask have the
same size, and that every mask value (after the reader's label map) is a class id or the
ignore label. It decodes everything in one parallel tf.data pass; only when that pass hits
an undecodable file does it look at the failing examples one by one to name the culprit.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import List, Optional

import numpy as np
import tensorflow as tf
from absl import logging

from kssl.constants import IGNORE_LABEL
from kssl.data.examples import Examples
from kssl.data.readers import base
from kssl.data.readers.base import UNKNOWN_COLOUR, DataError, Reader

_BATCH = 64  # per-example statistics are small; batching just cuts Python overhead


@dataclasses.dataclass
class ValidationReport:
    """What a successful check saw.

    Attributes:
      what: the set's role ("labelled", "unlabelled", "val"...).
      count: examples checked.
      class_pixels: int64 [num_classes], labelled pixels per class (None without masks).
      ignored_pixels: pixels with the ignore label.
      absent_classes: class ids with no pixel at all (such a class cannot be learnt).
    """
    what: str
    count: int
    class_pixels: Optional[np.ndarray] = None
    ignored_pixels: int = 0
    absent_classes: tuple = ()


def validate(reader: Reader, examples: Examples, with_masks: bool, num_classes: int,
             what: str = "labelled", max_listed: int = 20) -> ValidationReport:
    """Checks `examples` before training; raises DataError describing every problem.

    Args:
      reader: decodes the examples (its label map / mask palette are applied).
      examples: the set to check.
      with_masks: check the masks too (labelled and evaluation sets).
      num_classes: valid mask values are 0..num_classes-1 and 255 (ignore).
      what: the set's role, used in messages.
      max_listed: the most files named per kind of problem.
    Returns:
      a ValidationReport (also logged in one line).
    Raises:
      DataError: first line says what is wrong and how many files; one line per file.
    """
    source = examples.source or "the example list"
    if len(examples) == 0:
        raise DataError(f"the {what} set is empty ({source}): no examples to use")
    if with_masks and not examples.has_masks:
        lacking = (list(examples.images) if examples.masks is None else
                   [i for i, m in zip(examples.images, examples.masks) if m is None])
        raise DataError(_listing(
            f"{len(lacking)} of the {len(examples)} {what} images have no mask ({source})",
            lacking, max_listed))
    if reader.file_based:
        _check_files_exist(examples, with_masks, what, source, max_listed)

    names = _NameOf(reader, examples)
    stats, failed = _statistics(reader, examples, with_masks)
    # (count label for the first line, section title, one line per file)
    sections = []
    if failed:
        sections.append(("unreadable", "files that cannot be decoded",
                         _unreadable(reader, examples, failed, with_masks, names)))
    if with_masks:
        sections.append(("with image/mask size mismatch", "image and mask sizes differ", [
            f"image {names.image(i)} is {h}x{w} (HxW) but mask {names.mask(i)} is {mh}x{mw}"
            for i, (h, w, mh, mw) in stats["sizes"].items() if (h, w) != (mh, mw)]))
        bad_values, unknown_colours = _bad_values(reader, stats["histograms"], num_classes,
                                                  names, max_listed)
        sections.append(("with out-of-range labels",
                         f"mask values that are not class ids 0..{num_classes - 1} or "
                         f"{IGNORE_LABEL} (ignore)", bad_values))
        sections.append(("with unknown colours",
                         "mask colours that are neither in the mask palette nor ignore "
                         "colours", unknown_colours))
    sections = [section for section in sections if section[2]]
    if sections:
        summary = ", ".join(f"{len(lines)} {label}" for label, _, lines in sections)
        problems = sum(len(lines) for _, _, lines in sections)
        message = [f"{what} data check failed: {problems} bad file(s) in {source} "
                   f"({summary})"]
        for _, title, lines in sections:
            message.append(_listing(f"{title} ({len(lines)}):", lines, max_listed))
        raise DataError("\n".join(message))
    return _report(reader, examples, stats, with_masks, num_classes, what, source)


# -- checks -----------------------------------------------------------------------------
def _exists(path: str) -> bool:
    return tf.io.gfile.exists(path) if "://" in path else os.path.exists(path)


def _check_files_exist(examples, with_masks, what, source, max_listed):
    missing = [f"image {p}" for p in examples.images if not _exists(p)]
    if with_masks:
        missing += [f"mask {p}" for p in examples.masks if not _exists(p)]
    if missing:
        files = len(examples) * (2 if with_masks else 1)
        raise DataError(_listing(f"{len(missing)} of the {files} {what} files are missing "
                                 f"({source})", missing, max_listed))


def _statistics(reader, examples, with_masks):
    """Per-example sizes and mask value histograms from one parallel decoding pass.

    Returns (stats, failed positions). When a file cannot be decoded, the pass is run
    again skipping errors; the examples that drop out are the failed ones.
    """
    def summarise(row):
        out = {"id": row["id"], "image_hw": tf.shape(row["image"])[:2]}
        if with_masks:
            out["mask_hw"] = tf.shape(row["mask"])[:2]
            out["histogram"] = tf.math.bincount(
                tf.cast(tf.reshape(row["mask"], [-1]), tf.int32),
                minlength=256, maxlength=256, dtype=tf.int64)
        return out

    def run(skip_errors):
        ds = reader.load(examples, with_masks=with_masks).map(
            summarise, num_parallel_calls=tf.data.AUTOTUNE)
        if skip_errors:
            ds = ds.ignore_errors()
        return list(ds.batch(_BATCH).as_numpy_iterator())

    try:
        batches = run(skip_errors=False)
    except tf.errors.OpError:
        batches = run(skip_errors=True)
    position = {example_id: k for k, example_id in enumerate(examples.ids)}
    stats = {"sizes": {}, "histograms": {}}
    seen = set()
    for batch in batches:
        for row in range(len(batch["id"])):
            k = position[batch["id"][row].decode("utf-8")]
            seen.add(k)
            if with_masks:
                stats["sizes"][k] = (*batch["image_hw"][row], *batch["mask_hw"][row])
                stats["histograms"][k] = batch["histogram"][row]
    failed = [k for k in range(len(examples)) if k not in seen]
    return stats, failed


def _unreadable(reader, examples, failed, with_masks, names) -> List[str]:
    """Names the file behind each failed example by decoding it eagerly on its own."""
    lines = []
    for k in failed:
        culprits = []
        if reader.file_based:
            checks = [("image", examples.images[k], base.decode_image)]
            if with_masks:
                checks.append(("mask", examples.masks[k], reader.decode_mask))
            for kind, path, decode in checks:
                try:
                    decode(tf.constant(path))
                except tf.errors.OpError as error:
                    text = _op_error_text(error)
                    if text.endswith(path):  # our own messages name the file already
                        text = text[:-len(path)].rstrip(": ")
                    culprits.append(f"{kind} {path}: {text}")
        lines.extend(culprits or [f"example {names.image(k)} could not be decoded"])
    return lines


def _bad_values(reader, histograms, num_classes, names, max_listed):
    """(lines for out-of-range values, lines for unknown palette colours)."""
    valid = np.zeros([256], bool)
    valid[:num_classes] = True
    valid[IGNORE_LABEL] = True
    palette = reader.info.mask_palette
    bad_lines, colour_lines = [], []
    for k, histogram in histograms.items():
        bad = [int(v) for v in np.nonzero((histogram > 0) & ~valid)[0]]
        shown, sixteen_bit = bad, []
        if palette is None and UNKNOWN_COLOUR in bad and names.mask_path(k) is not None:
            sixteen_bit = _values_above_255(names.mask_path(k))
            if sixteen_bit:  # the real values, not the 254 they were decoded to
                shown = [v for v in bad if v != UNKNOWN_COLOUR] + sixteen_bit
        if palette is not None and UNKNOWN_COLOUR in bad:
            bad.remove(UNKNOWN_COLOUR)
            colours = (_unknown_colours(names.mask_path(k), palette)
                       if len(colour_lines) < max_listed else "")
            colour_lines.append(f"{names.mask(k)}: {int(histogram[UNKNOWN_COLOUR])} pixels "
                                f"of unknown colours{colours}")
        if bad:
            pixels = int(histogram[bad].sum())
            hint = ""
            if sixteen_bit:
                hint = " (a 16-bit PNG: class ids must be below 256)"
            elif palette is None and UNKNOWN_COLOUR in bad:
                hint = (f" ({UNKNOWN_COLOUR} is also what a pixel whose R, G, B differ reads "
                        f"as: colour-coded masks need a mask palette)")
            bad_lines.append(f"{names.mask(k)}: values {shown} in {pixels} pixels{hint}")
    return bad_lines, colour_lines


def _values_above_255(path: str, listed: int = 10) -> list:
    """The stored values above 255 of a 16-bit greyscale PNG mask, which decoding folds
    into UNKNOWN_COLOUR (at most `listed`); [] for any other file."""
    contents = tf.io.read_file(path)
    header = base._header(contents).numpy()
    if (bytes(header[:8]) != base._PNG_SIGNATURE or header[24] != 16
            or header[25] not in (0, 4)):  # greyscale, or greyscale with alpha
        return []
    values = np.unique(tf.io.decode_png(contents, channels=1, dtype=tf.uint16).numpy())
    return [int(v) for v in values[values > 255][:listed]]


def _unknown_colours(path: Optional[str], palette: np.ndarray, listed: int = 5) -> str:
    """' e.g. (R, G, B) x N px, ...' for the commonest colours of a mask not in palette."""
    if path is None:
        return ""
    rgb = base.decode_mask_rgb(tf.io.read_file(path)).numpy().reshape(-1, 3)
    colours, counts = np.unique(rgb, axis=0, return_counts=True)
    known = {tuple(c) for c in np.asarray(palette).tolist()}
    unknown = [(int(n), tuple(int(v) for v in c)) for c, n in zip(colours, counts)
               if tuple(c.tolist()) not in known]
    unknown.sort(reverse=True)
    return ": " + ", ".join(f"{c} x {n}" for n, c in unknown[:listed]) + (
        " ..." if len(unknown) > listed else "")


def _report(reader, examples, stats, with_masks, num_classes, what, source):
    report = ValidationReport(what=what, count=len(examples))
    if with_masks and stats["histograms"]:
        total = np.sum(list(stats["histograms"].values()), axis=0)
        report.class_pixels = total[:num_classes]
        report.ignored_pixels = int(total[IGNORE_LABEL])
        report.absent_classes = tuple(int(c) for c in np.nonzero(total[:num_classes] == 0)[0])
        class_names = reader.info.class_names
        if report.absent_classes:
            logging.warning(
                "%s set (%s): classes %s have no pixel in any mask, so they cannot be "
                "learnt (wrong value map, or 255 used for a class?)", what, source,
                [class_names[c] if c < len(class_names) else c
                 for c in report.absent_classes])
        all_ignored = [k for k, h in stats["histograms"].items() if h[IGNORE_LABEL] == h.sum()]
        if all_ignored:
            logging.warning("%s set (%s): %d masks are entirely ignore (255), e.g. %s", what,
                            source, len(all_ignored), examples.masks[all_ignored[0]])
    logging.info("data check: %d %s examples from %s OK%s", len(examples), what, source,
                 "" if not with_masks else f", {report.ignored_pixels} ignored pixels")
    return report


# -- messages ---------------------------------------------------------------------------
class _NameOf:
    """How messages name an example's files: paths for file readers, ids otherwise."""

    def __init__(self, reader, examples):
        self.file_based = reader.file_based
        self.examples = examples

    def image(self, k):
        return self.examples.images[k] if self.file_based else self.examples.ids[k]

    def mask_path(self, k):
        return self.examples.masks[k] if self.file_based else None

    def mask(self, k):
        return (self.examples.masks[k] if self.file_based
                else f"mask of {self.examples.ids[k]}")


def _listing(first_line: str, lines: List[str], max_listed: int) -> str:
    shown = [f"  {line}" for line in lines[:max_listed]]
    if len(lines) > max_listed:
        shown.append(f"  ... and {len(lines) - max_listed} more")
    return "\n".join([first_line.rstrip(":") + ":"] + shown)


def _op_error_text(error: tf.errors.OpError) -> str:
    """The useful line of a TensorFlow error, without graph and stack context."""
    text = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]|\[\[.*?\]\]| name: *$", "",
                  error.message or str(error), flags=re.M)
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("Graph execution error", "Detected at node",
                                        "File \"")):
            continue
        # tf.debugging.Assert prints its data as "[text] [value]".
        line = re.sub(r"^assertion failed: \[(.*?):?\] \[(.*)\]$", r"\1: \2", line)
        return line[:300]
    return type(error).__name__
