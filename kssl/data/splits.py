"""Choosing the labelled subset of a training split; the rest is the unlabelled pool.

Random selection ranks every id by a SHA-256 hash of "<seed>:<id>" and labels the lowest
ranked. That choice is
  * stable: the same ids and seed give the same subset on any machine, Python or
    TensorFlow version (no dependence on a random-number generator);
  * independent of list order: shuffling or re-sorting the list file changes nothing;
  * nested: with one seed, the 1/16 subset is inside the 1/8 subset, which is inside
    the 1/4 subset, so results across label budgets differ only by the added labels.
It does not stratify by class; for published protocols use the committed split files.
Both returned sets keep the order of the input list.
"""

from __future__ import annotations

import hashlib
from typing import List, Optional, Tuple

from absl import logging

from kssl.data.examples import Examples
from kssl.data.readers import base
from kssl.data.readers.base import DataError, Reader

_LISTED = 5  # ids quoted in an error message


def hash_rank(example_id: str, seed: int) -> bytes:
    """The sort key of an id for random selection under `seed`."""
    return hashlib.sha256(f"{seed}:{example_id}".encode("utf-8")).digest()


def labelled_split(examples: Examples, count: Optional[int] = None,
                   fraction: Optional[float] = None, seed: int = 0,
                   split_file: Optional[str] = None, unlabelled_file: Optional[str] = None,
                   reader: Optional[Reader] = None, require_unlabelled: bool = False
                   ) -> Tuple[Examples, Examples]:
    """Splits a training split into (labelled, unlabelled) Examples.

    Args:
      examples: the whole training split.
      count: label this many examples, chosen by hash rank (see the module docstring).
      fraction: label fraction * len(examples) examples, rounded half up, at least 1.
      seed: the selection seed for count/fraction.
      split_file: label exactly the examples this list file names (ids, image paths or
        "IMAGE MASK" lines; paths become ids through `reader.id_from_path`).
      unlabelled_file: the unlabelled pool is the examples this list file names, instead
        of every example not labelled. Its ids must be in `examples` too.
      reader: turns list-file paths into ids (default: the file stem).
      require_unlabelled: raise if the unlabelled pool comes out empty (methods that
        learn from unlabelled images need one).
    At most one of count, fraction, split_file; none of them labels every example and
    leaves the unlabelled pool empty (unless unlabelled_file gives one).

    Returns:
      (labelled with masks, unlabelled without masks), each in the order of `examples`.
    Raises:
      DataError: an empty labelled set, an empty unlabelled pool when required, a count
        larger than the split, or list-file ids that are not in the split.
    """
    chosen = [name for name, value in (("count", count), ("fraction", fraction),
                                       ("split_file", split_file)) if value is not None]
    if len(chosen) > 1:
        raise ValueError(f"labelled_split: give at most one of count, fraction, split_file; "
                         f"got {', '.join(chosen)}")
    source = examples.source or "the training split"
    total = len(examples)
    if total == 0:
        raise DataError(f"{source}: the training split is empty, so nothing can be labelled")

    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"labelled_split: fraction must be in (0, 1], got {fraction}")
        count = max(1, int(fraction * total + 0.5))  # halves round up, not to even
    if count is not None:
        if int(count) != count or count < 1:
            raise DataError(f"labelled_split: count must be a positive integer, got {count!r}")
        if count > total:
            raise DataError(f"labelled_split: count {count} is larger than the "
                            f"{total} examples of {source}")
        ranked = sorted(examples.ids, key=lambda i: hash_rank(i, seed))
        labelled_ids = set(ranked[:int(count)])
        what = f"{count} of {total} chosen with seed {seed}"
    elif split_file is not None:
        labelled_ids = set(_ids_in_file(split_file, examples, reader))
        if not labelled_ids:
            raise DataError(f"{split_file}: the labelled split file lists no examples")
        what = f"from {split_file}"
    else:
        labelled_ids = set(examples.ids)
        what = "all"

    labelled = _subset(examples, labelled_ids)
    if unlabelled_file is not None:
        pool_ids = set(_ids_in_file(unlabelled_file, examples, reader))
        overlap = pool_ids & labelled_ids
        if overlap:
            logging.warning("%s: %d unlabelled id(s) are also labelled, e.g. %s",
                            unlabelled_file, len(overlap), sorted(overlap)[:_LISTED])
    else:
        pool_ids = set(examples.ids) - labelled_ids
    unlabelled = _subset(examples, pool_ids).without_masks()
    if require_unlabelled and len(unlabelled) == 0:
        raise DataError(
            f"{unlabelled_file or source}: the unlabelled pool is empty ({len(labelled)} of "
            f"{total} examples are labelled); label fewer or give an unlabelled_file")
    logging.info("labelled split of %s: %d labelled (%s), %d unlabelled", source,
                 len(labelled), what, len(unlabelled))
    return labelled, unlabelled


def _subset(examples: Examples, ids) -> Examples:
    return examples.select([i for i in examples.ids if i in ids])


def _ids_in_file(path: str, examples: Examples, reader: Optional[Reader]) -> List[str]:
    """The example ids a list file names, in file order; errors name the file."""
    known = set(examples.ids)
    to_id = (reader or Reader()).id_from_path
    ids, unknown, seen = [], [], set()
    for columns in base.read_list_file(path):
        token = columns[0]
        # An exact id wins over path parsing: tfds ids ("train/12") contain a slash.
        example_id = token if token in known else to_id(token)
        if example_id not in known:
            unknown.append(token)
        elif example_id in seen:
            raise DataError(f"{path}: example {example_id!r} is listed twice")
        else:
            seen.add(example_id)
            ids.append(example_id)
    if unknown:
        raise DataError(f"{path}: {len(unknown)} of its lines name examples that are not in "
                        f"{examples.source or 'the training split'}: {unknown[:_LISTED]}"
                        + (" ..." if len(unknown) > _LISTED else ""))
    return ids
