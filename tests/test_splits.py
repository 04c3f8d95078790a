"""Labelled subset selection: count, fraction, seeds, split files, unlabelled lists, errors."""

import os

import pytest

from kssl.data.examples import Examples
from kssl.data.readers.base import DataError
from kssl.data.readers.cityscapes import Cityscapes
from kssl.data.splits import labelled_split
from tiny import write_lines


def make_examples(n=20, order=None, source="train.txt"):
    ids = [f"img_{k:03d}" for k in range(n)]
    if order is not None:
        ids = [ids[k] for k in order]
    return Examples(tuple(ids), tuple(f"/d/images/{i}.jpg" for i in ids),
                    tuple(f"/d/masks/{i}.png" for i in ids), source=source)


def test_count_is_deterministic_order_independent_and_nested():
    examples = make_examples()
    labelled, unlabelled = labelled_split(examples, count=5, seed=3)
    assert len(labelled) == 5 and len(unlabelled) == 15
    assert labelled.has_masks and unlabelled.masks is None
    assert set(labelled.ids).isdisjoint(unlabelled.ids)
    assert set(labelled.ids) | set(unlabelled.ids) == set(examples.ids)
    # Both sets keep list order.
    assert list(labelled.ids) == sorted(labelled.ids)
    assert list(unlabelled.ids) == sorted(unlabelled.ids)
    assert labelled_split(examples, count=5, seed=3)[0].ids == labelled.ids
    reversed_list = make_examples(order=range(19, -1, -1))
    assert set(labelled_split(reversed_list, count=5, seed=3)[0].ids) == set(labelled.ids)
    assert set(labelled.ids) <= set(labelled_split(examples, count=10, seed=3)[0].ids)
    other_seeds = {labelled_split(examples, count=5, seed=s)[0].ids for s in range(4, 8)}
    assert any(ids != labelled.ids for ids in other_seeds)
    # Paths follow their ids.
    k = examples.ids.index(labelled.ids[0])
    assert labelled.images[0] == examples.images[k] and labelled.masks[0] == examples.masks[k]


def test_fraction_rounds_with_at_least_one():
    examples = make_examples(20)
    assert len(labelled_split(examples, fraction=0.125)[0]) == 3  # 2.5 rounds up
    assert len(labelled_split(examples, fraction=0.12)[0]) == 2
    assert len(labelled_split(examples, fraction=0.01)[0]) == 1
    assert len(labelled_split(examples, fraction=1.0)[0]) == 20
    assert (labelled_split(examples, fraction=0.25, seed=1)[0].ids
            == labelled_split(examples, count=5, seed=1)[0].ids)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        labelled_split(examples, fraction=0)


def test_no_selection_labels_everything():
    examples = make_examples(4)
    labelled, unlabelled = labelled_split(examples)
    assert labelled.ids == examples.ids and len(unlabelled) == 0
    with pytest.raises(DataError, match="unlabelled pool is empty"):
        labelled_split(examples, require_unlabelled=True)


def test_split_file_with_ids_and_paths(tmp_path):
    examples = make_examples()
    path = write_lines(tmp_path / "labeled.txt", [
        "img_007", "# a comment", "", "/SegNet/CamVid/train/img_003.jpg",
        "/JPEGImages/img_012.jpg /SegmentationClassAug/img_012.png"])
    labelled, unlabelled = labelled_split(examples, split_file=path)
    assert labelled.ids == ("img_003", "img_007", "img_012")
    assert len(unlabelled) == 17


def test_split_file_through_reader_ids(tmp_path):
    ids = ("aachen_000000_000019", "bremen_000001_000019")
    examples = Examples(ids, ("a.png", "b.png"), ("a_m.png", "b_m.png"))
    path = write_lines(tmp_path / "split.txt", [
        "leftImg8bit/train/bremen/bremen_000001_000019_leftImg8bit.png "
        "gtFine/train/bremen/bremen_000001_000019_gtFine_labelIds.png"])
    labelled, unlabelled = labelled_split(examples, split_file=path,
                                          reader=Cityscapes("/nowhere"))
    assert labelled.ids == ("bremen_000001_000019",)
    assert unlabelled.ids == ("aachen_000000_000019",)


def test_split_file_ids_with_slashes(tmp_path):
    examples = Examples(("train/0", "train/1", "train/2"), ("0", "1", "2"), ("0", "1", "2"))
    path = write_lines(tmp_path / "split.txt", ["train/2"])
    assert labelled_split(examples, split_file=path)[0].ids == ("train/2",)


def test_unlabelled_file(tmp_path):
    examples = make_examples(10)
    pool = write_lines(tmp_path / "unlabeled.txt", ["img_001", "img_002", "img_009"])
    labelled, unlabelled = labelled_split(examples, count=3, seed=0, unlabelled_file=pool)
    assert unlabelled.ids == ("img_001", "img_002", "img_009") and unlabelled.masks is None
    labelled, unlabelled = labelled_split(examples, unlabelled_file=pool)
    assert len(labelled) == 10 and len(unlabelled) == 3


def test_errors_name_the_file_and_ids(tmp_path):
    examples = make_examples(6)
    with pytest.raises(DataError, match=r"count 7 is larger than the 6 examples of train.txt"):
        labelled_split(examples, count=7)
    with pytest.raises(DataError, match="count must be a positive integer"):
        labelled_split(examples, count=0)
    with pytest.raises(ValueError, match="at most one of count, fraction, split_file"):
        labelled_split(examples, count=2, fraction=0.5)
    bad = write_lines(tmp_path / "bad.txt", ["img_001", "img_777", "x/img_888.jpg"])
    with pytest.raises(DataError, match=r"bad.txt: 2 of its lines name examples that are not "
                                        r"in train.txt: \['img_777', 'x/img_888.jpg'\]"):
        labelled_split(examples, split_file=bad)
    twice = write_lines(tmp_path / "twice.txt", ["img_001", "img_001.jpg"])
    with pytest.raises(DataError, match="twice.txt: example 'img_001' is listed twice"):
        labelled_split(examples, split_file=twice)
    empty = write_lines(tmp_path / "empty.txt", ["# nothing"])
    with pytest.raises(DataError, match="empty.txt: the labelled split file lists no examples"):
        labelled_split(examples, split_file=empty)
    with pytest.raises(DataError, match=r"split list file .*missing.txt does not exist"):
        labelled_split(examples, split_file=os.path.join(tmp_path, "missing.txt"))
    bad_pool = write_lines(tmp_path / "pool.txt", ["img_999"])
    with pytest.raises(DataError, match=r"pool.txt: 1 of its lines .*img_999"):
        labelled_split(examples, count=1, unlabelled_file=bad_pool)
    with pytest.raises(DataError, match="training split is empty"):
        labelled_split(Examples((), (), (), source="empty.txt"), count=1)
    with pytest.raises(DataError, match="the unlabelled pool is empty"):
        labelled_split(examples, count=6, require_unlabelled=True)
