"""Dataset readers: every layout on tiny synthetic data written here, plus the real CamVid."""

import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf

from kssl.data import readers
from kssl.data.readers import base
from kssl.data.readers.base import DataError
from kssl.data.readers.camvid import CamVid
from kssl.data.readers.cityscapes import Cityscapes, label_id_to_train_id
from kssl.data.readers.folder import Folder
from kssl.data.readers.voc import VOC, voc_palette
from tiny import decode_all, random_mask, write_image, write_lines, write_mask

H, W = 8, 12
REAL_CAMVID = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                           "datasets", "camvid")


# -- writing test files -------------------------------------------------------------------
def write_png_raw(path, array, colour_type, bit_depth=8, palette=None):
    """A PNG written byte by byte: for the kinds tf.io.encode_png cannot make (indexed
    colour, 1/2/4-bit grey)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    height, width = array.shape[:2]
    rows = []
    for row in array.reshape(height, width, -1):
        if bit_depth < 8:
            per_byte = 8 // bit_depth
            packed = bytearray((width + per_byte - 1) // per_byte)
            for x, value in enumerate(row[:, 0]):
                packed[x // per_byte] |= int(value) << (8 - bit_depth * (x % per_byte + 1))
            rows.append(b"\0" + bytes(packed))
        else:
            rows.append(b"\0" + row.astype(">u2" if bit_depth == 16 else "u1").tobytes())
    data = b"\x89PNG\r\n\x1a\n" + chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))
    data += chunk(b"tEXt", b"Comment\0not a PLTE chunk")  # a chunk before PLTE
    if palette is not None:
        data += chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
    data += chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


# -- shared decoding ----------------------------------------------------------------------
def test_decode_label_png_kinds(tmp_path):
    mask = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
    palette = np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0], [0, 0, 0]], np.uint8)

    def decoded(name):
        path = str(tmp_path / name)
        return base.decode_label_png(tf.io.read_file(path), path).numpy()

    # Indexed colour: the palette index, even where the palette repeats a colour (0 and 3).
    write_png_raw(str(tmp_path / "indexed.png"), mask, colour_type=3, palette=palette)
    np.testing.assert_array_equal(decoded("indexed.png"), np.where(mask == 3, 0, mask))
    write_png_raw(str(tmp_path / "grey1.png"), mask % 2, colour_type=0, bit_depth=1)
    np.testing.assert_array_equal(decoded("grey1.png"), mask % 2)
    write_png_raw(str(tmp_path / "grey4.png"), mask * 5, colour_type=0, bit_depth=4)
    np.testing.assert_array_equal(decoded("grey4.png"), mask * 5)
    wide = mask.astype(np.uint16) * 200  # 0, 200, 400, 600: the last two do not fit a byte
    write_png_raw(str(tmp_path / "grey16.png"), wide, colour_type=0, bit_depth=16)
    np.testing.assert_array_equal(decoded("grey16.png"), np.where(wide > 255, 254, wide))
    rgb = np.stack([mask, mask, np.where(mask == 2, 9, mask)], -1)
    tf.io.write_file(str(tmp_path / "rgb.png"), tf.io.encode_png(rgb))
    np.testing.assert_array_equal(decoded("rgb.png"), np.where(mask == 2, 254, mask))
    tf.io.write_file(str(tmp_path / "mask.jpg"), tf.io.encode_jpeg(rgb))
    with pytest.raises(tf.errors.InvalidArgumentError, match="mask.jpg"):
        decoded("mask.jpg")


def test_rgb_to_class_ids_unknown_colour_is_254():
    rgb = tf.constant([[[10, 20, 30], [1, 2, 3], [0, 0, 0]]], tf.uint8)
    ids = base.rgb_to_class_ids(rgb, np.array([[0, 0, 0], [10, 20, 30]], np.uint8))
    np.testing.assert_array_equal(ids.numpy(), [[1, base.UNKNOWN_COLOUR, 0]])


# -- VOC ------------------------------------------------------------------------------------
VOC_IDS = ["2007_000032", "2007_000039", "2008_000002", "2009_000010"]
VOC_VALUES = list(range(21)) + [255]


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOC2012"
    masks = {}
    for k, example_id in enumerate(VOC_IDS):
        write_image(str(root / "JPEGImages" / f"{example_id}.jpg"), k)
        masks[example_id] = write_mask(str(root / "SegmentationClassAug" / f"{example_id}.png"),
                                       random_mask(k, VOC_VALUES))
    lists = root / "ImageSets" / "Segmentation"
    write_lines(str(lists / "train.txt"), VOC_IDS[:3])
    write_lines(str(lists / "val.txt"),
                [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in VOC_IDS[2:]])
    write_lines(str(lists / "unlabelled.txt"), [f"/JPEGImages/{i}.jpg" for i in VOC_IDS])
    return str(root), masks


def test_voc_id_list(voc_root):
    root, masks = voc_root
    reader = VOC(root)
    examples = reader.examples("train")
    assert examples.ids == tuple(VOC_IDS[:3])
    assert examples.images[0] == os.path.join(root, "JPEGImages", VOC_IDS[0] + ".jpg")
    rows = decode_all(reader, examples)
    for row in rows:
        example_id = row["id"].decode()
        assert row["image"].shape == (H, W, 3) and row["image"].dtype == np.uint8
        np.testing.assert_array_equal(row["mask"], masks[example_id])
    assert reader.info.num_classes == 21 and reader.info.class_names[15] == "person"


def test_voc_pair_and_image_only_lists(voc_root, tmp_path):
    root, masks = voc_root
    reader = VOC(root)
    val = reader.examples("val")
    assert val.ids == tuple(VOC_IDS[2:])
    assert val.masks[0] == os.path.join(root, "SegmentationClassAug", VOC_IDS[2] + ".png")
    np.testing.assert_array_equal(decode_all(reader, val)[1]["mask"], masks[VOC_IDS[3]])
    pool = reader.examples("unlabelled")
    assert pool.masks is None and len(pool) == 4 and not pool.has_masks
    assert len(decode_all(reader, pool, with_masks=False)) == 4
    # A list file given by path works like a named split.
    path = str(tmp_path / "mine.txt")
    write_lines(path, [VOC_IDS[1]])
    assert reader.examples(path).ids == (VOC_IDS[1],)


def test_voc_segmentation_class_indexed_pngs(voc_root):
    root, masks = voc_root
    for example_id in VOC_IDS:
        write_png_raw(os.path.join(root, "SegmentationClass", example_id + ".png"),
                      masks[example_id], colour_type=3, palette=voc_palette())
    reader = VOC(root, mask_dir="SegmentationClass")
    for row in decode_all(reader, reader.examples("train")):
        np.testing.assert_array_equal(row["mask"], masks[row["id"].decode()])


def test_voc_palette_formula():
    palette = voc_palette()
    assert palette.shape == (256, 3) and len({tuple(c) for c in palette.tolist()}) == 256
    assert palette[1].tolist() == [128, 0, 0]
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[255].tolist() == [224, 224, 192]  # boundary
    assert VOC("/nowhere").info.palette.shape == (21, 3)


def test_voc_unknown_split(voc_root):
    with pytest.raises(DataError, match=r"no split 'tain'.*train.*val"):
        VOC(voc_root[0]).examples("tain")


def test_list_file_with_three_columns_names_line(voc_root, tmp_path):
    path = str(tmp_path / "bad.txt")
    write_lines(path, ["a b", "a b c"])
    with pytest.raises(DataError, match=r"bad.txt:2: .*3 columns"):
        VOC(voc_root[0]).examples(path)


# -- Cityscapes ---------------------------------------------------------------------------
CITY_LABEL_IDS = [0, 1, 4, 7, 8, 11, 17, 21, 23, 24, 26, 31, 33, 34, 255]


@pytest.fixture
def cityscapes_root(tmp_path):
    root = tmp_path / "cityscapes"
    masks = {}
    frames = [("train", "aachen", "000000_000019"), ("train", "aachen", "000001_000019"),
              ("train", "bremen", "000002_000019"), ("val", "lindau", "000000_000019")]
    for k, (split, city, frame) in enumerate(frames):
        example_id = f"{city}_{frame}"
        write_image(str(root / "leftImg8bit" / split / city / f"{example_id}_leftImg8bit.png"),
                    k, fmt="png")
        masks[example_id] = write_mask(
            str(root / "gtFine" / split / city / f"{example_id}_gtFine_labelIds.png"),
            random_mask(k, CITY_LABEL_IDS))
    return str(root), masks


def test_cityscapes_label_ids_to_train_ids(cityscapes_root):
    root, masks = cityscapes_root
    reader = Cityscapes(root)
    train = reader.examples("train")
    assert train.ids == ("aachen_000000_000019", "aachen_000001_000019", "bremen_000002_000019")
    table = label_id_to_train_id()
    assert (table[7], table[26], table[0], table[33], table[8]) == (0, 13, 255, 18, 1)
    assert (table[34], table[255], table[-1]) == (255, 255, 255)
    expected = np.full([256], 255, np.uint8)  # written independently of the reader's table
    for label_id, train_id in {7: 0, 8: 1, 11: 2, 17: 5, 21: 8, 23: 10, 24: 11, 26: 13,
                               31: 16, 33: 18}.items():
        expected[label_id] = train_id
    for row in decode_all(reader, train):
        np.testing.assert_array_equal(row["mask"], expected[masks[row["id"].decode()]])
    assert reader.info.class_names[13] == "car" and reader.info.palette[0].tolist() == [
        128, 64, 128]
    assert reader.examples("val").ids == ("lindau_000000_000019",)


def test_cityscapes_list_files(cityscapes_root, tmp_path):
    root, _ = cityscapes_root
    reader = Cityscapes(root)
    ids = str(tmp_path / "ids.txt")
    write_lines(ids, ["bremen_000002_000019", "lindau_000000_000019"])
    examples = reader.examples(ids)
    assert examples.images[1].endswith(os.path.join("val", "lindau",
                                                    "lindau_000000_000019_leftImg8bit.png"))
    assert examples.masks[0].endswith("bremen_000002_000019_gtFine_labelIds.png")
    pairs = str(tmp_path / "pairs.txt")
    write_lines(pairs, [
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png "
        "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"])
    examples = reader.examples(pairs)
    assert examples.ids == ("aachen_000000_000019",)
    assert len(decode_all(reader, examples)) == 1
    assert reader.id_from_path(examples.masks[0]) == "aachen_000000_000019"


def test_cityscapes_errors(cityscapes_root, tmp_path):
    root, _ = cityscapes_root
    reader = Cityscapes(root)
    with pytest.raises(DataError, match=r"no split 'tset'.*\['train', 'val'\]"):
        reader.examples("tset")
    unknown = str(tmp_path / "unknown.txt")
    write_lines(unknown, ["aachen_000000_000019", "paris_000000_000001"])
    with pytest.raises(DataError, match=r"unknown.txt: 1 id.*paris_000000_000001"):
        reader.examples(unknown)
    train_ids = str(tmp_path / "train_ids.txt")
    write_lines(train_ids, ["leftImg8bit/train/a/a_0_0_leftImg8bit.png "
                            "gtFine/train/a/a_0_0_gtFine_labelTrainIds.png"])
    with pytest.raises(DataError, match="labelTrainIds file"):
        reader.examples(train_ids)


# -- CamVid -----------------------------------------------------------------------------------
@pytest.fixture
def camvid_root(tmp_path):
    root = tmp_path / "camvid"
    masks, lines = {}, {"train": [], "val": []}
    for k, (split, name) in enumerate([("train", "0001TP_006690"), ("train", "0001TP_006720"),
                                       ("train", "Seq05VD_f00000"), ("val", "0016E5_07959")]):
        write_image(str(root / split / f"{name}.jpg"), k)
        masks[name] = write_mask(str(root / f"{split}annot" / f"{name}.png"),
                                 random_mask(k, range(12)))
        lines[split].append(f"/SegNet/CamVid/{split}/{name}.jpg "
                            f"/SegNet/CamVid/{split}annot/{name}.png")
    for split, split_lines in lines.items():
        write_lines(str(root / f"{split}.txt"), split_lines)
    write_lines(str(root / "splits" / "1_2" / "labeled.txt"), lines["train"][:1])
    write_lines(str(root / "splits" / "1_2" / "unlabeled.txt"),
                [line.split()[0] for line in lines["train"][1:]])
    return str(root), masks


def test_camvid_void_to_ignore(camvid_root):
    root, masks = camvid_root
    reader = CamVid(root)
    train = reader.examples("train")
    assert train.ids == ("0001TP_006690", "0001TP_006720", "Seq05VD_f00000")
    assert train.images[0] == os.path.join(root, "train", "0001TP_006690.jpg")
    assert train.masks[0] == os.path.join(root, "trainannot", "0001TP_006690.png")
    for row in decode_all(reader, train):
        written = masks[row["id"].decode()]
        assert (written == 11).any()
        np.testing.assert_array_equal(row["mask"], np.where(written == 11, 255, written))
    assert reader.info.num_classes == 11 and reader.info.palette[4].tolist() == [60, 40, 222]


def test_camvid_split_lists(camvid_root):
    root, _ = camvid_root
    reader = CamVid(root)
    labelled = reader.examples(os.path.join(root, "splits", "1_2", "labeled.txt"))
    assert labelled.ids == ("0001TP_006690",) and labelled.has_masks
    pool = reader.examples(os.path.join(root, "splits", "1_2", "unlabeled.txt"))
    assert pool.masks is None and pool.ids == ("0001TP_006720", "Seq05VD_f00000")
    ids = os.path.join(root, "lists", "ids.txt")
    write_lines(ids, ["0016E5_07959"])
    assert reader.examples(ids).masks == (os.path.join(root, "valannot", "0016E5_07959.png"),)
    write_lines(ids, ["0016E5_99999"])
    with pytest.raises(DataError, match=r"ids.txt: 1 id.*0016E5_99999"):
        reader.examples(ids)
    with pytest.raises(DataError, match=r"no split 'test'.*\['train', 'val'\]"):
        reader.examples("test")


@pytest.mark.skipif(not os.path.isdir(REAL_CAMVID),
                    reason=f"real CamVid not present at {REAL_CAMVID}")
def test_real_camvid():
    reader = CamVid(REAL_CAMVID)
    train, val = reader.examples("train"), reader.examples("val")
    assert (len(train), len(val)) == (367, 101)
    assert all(os.path.exists(p) for p in train.images[:5] + train.masks[:5])
    labelled = reader.examples(os.path.join(REAL_CAMVID, "splits", "1_8", "labeled.txt"))
    assert len(labelled) == 46 and set(labelled.ids) <= set(train.ids)
    few = train.select([train.ids[0], train.ids[200]])
    for row in decode_all(reader, few):
        assert row["image"].shape == (360, 480, 3) and row["mask"].shape == (360, 480)
        values = set(np.unique(row["mask"]).tolist())
        assert values <= set(range(11)) | {255}, values


# -- Folder -----------------------------------------------------------------------------------
def test_folder_class_id_masks(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    written, arrays = {}, {}
    for k, stem in enumerate(["b", "a", "c"]):
        arrays[stem] = write_image(str(images / f"{stem}.png"), k, fmt="png")
        if stem != "c":  # c is unlabelled
            written[stem] = write_mask(str(masks / f"{stem}.png"), random_mask(k, [0, 1, 2, 255]))
    reader = Folder(str(images), str(masks), class_names=("bg", "cat", "dog"))
    everything = reader.examples("all")
    assert everything.ids == ("a", "b", "c") and everything.masks[2] is None
    labelled = everything.select(["a", "b"])
    for row in decode_all(reader, labelled):
        stem = row["id"].decode()
        np.testing.assert_array_equal(row["image"], arrays[stem])  # PNG: exact
        np.testing.assert_array_equal(row["mask"], written[stem])
    pool = Folder(str(images)).examples("all")
    assert pool.masks is None and len(pool) == 3 and Folder(str(images)).info.num_classes == 0


def test_folder_palette_masks_and_ignore_colours(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "labels"
    palette = [(0, 0, 255), (255, 0, 0), (0, 255, 0)]
    ignore = [(0, 0, 0)]
    colours = np.array(palette + ignore, np.uint8)
    expected = {}
    for k in range(3):
        write_image(str(images / f"img{k}.jpg"), k)
        index = np.random.default_rng(k).integers(0, 4, (H, W))
        os.makedirs(str(masks), exist_ok=True)
        tf.io.write_file(str(masks / f"img{k}_label.png"), tf.io.encode_png(colours[index]))
        expected[f"img{k}"] = np.where(index == 3, 255, index)
    reader = Folder(str(images), str(masks), class_names=("water", "fire", "grass"),
                    mask_palette=palette, ignore_colours=ignore, mask_suffix="_label")
    assert reader.info.palette.tolist() == [list(c) for c in palette]
    for row in decode_all(reader, reader.examples("all")):
        np.testing.assert_array_equal(row["mask"], expected[row["id"].decode()])


def test_folder_masks_beside_images_list_files_and_value_map(tmp_path):
    data = tmp_path / "data"
    expected = {}
    for k in range(4):
        write_image(str(data / f"{k:03d}.jpg"), k)
        written = write_mask(str(data / f"{k:03d}_mask.png"), random_mask(k, [0, 7, 200]))
        expected[f"{k:03d}"] = np.select([written == 7, written == 200], [255, 1], 0)
    splits = {"train": str(tmp_path / "train.txt"), "val": str(tmp_path / "val.txt")}
    write_lines(splits["train"], ["000", "data/001.jpg"])  # an id and a path
    write_lines(splits["val"], ["data/002.jpg data/002_mask.png"])
    reader = Folder(str(data), str(data), num_classes=2, mask_suffix="_mask",
                    ignore_values=(7,), value_map={200: 1}, splits=splits)
    assert reader.examples("all").ids == ("000", "001", "002", "003")
    train = reader.examples("train")
    assert train.ids == ("000", "001")
    assert train.masks[1] == os.path.join(str(data), "001_mask.png")
    val = reader.examples("val")
    assert val.ids == ("002",)
    for row in decode_all(reader, train) + decode_all(reader, val):
        np.testing.assert_array_equal(row["mask"], expected[row["id"].decode()])
    assert reader.info.class_names == ("class_0", "class_1")
    write_lines(splits["train"], ["000", "nope", "gone.jpg"])
    with pytest.raises(DataError, match=r"train.txt: 2 line\(s\) name no image.*nope.*gone"):
        reader.examples("train")
    with pytest.raises(DataError, match=r"split 'test' is not 'all'.*\['train', 'val'\]"):
        reader.examples("test")


def test_folder_recursive_and_constructor_errors(tmp_path):
    write_image(str(tmp_path / "im" / "street" / "1.jpg"), 0)
    write_image(str(tmp_path / "im" / "top.jpg"), 1)
    write_mask(str(tmp_path / "m" / "street" / "1.png"), random_mask(0, [0, 1]))
    reader = Folder(str(tmp_path / "im"), str(tmp_path / "m"), num_classes=2, recursive=True)
    examples = reader.examples("all")
    assert examples.ids == ("street/1", "top") and examples.masks[1] is None
    assert Folder(str(tmp_path / "im")).examples("all").ids == ("top",)
    write_mask(str(tmp_path / "im" / "labels" / "top.png"), random_mask(1, [0, 1]))
    nested = Folder(str(tmp_path / "im"), str(tmp_path / "im" / "labels"), num_classes=2,
                    recursive=True).examples("all")
    assert nested.ids == ("street/1", "top") and nested.masks == (
        None, str(tmp_path / "im" / "labels" / "top.png"))
    with pytest.raises(ValueError, match="mask_suffix"):
        Folder(str(tmp_path / "im"), str(tmp_path / "im"))
    with pytest.raises(ValueError, match=r"colour \(1, 2, 3\) is listed twice"):
        Folder(str(tmp_path / "im"), str(tmp_path / "m"), mask_palette=[(1, 2, 3)],
               ignore_colours=[(1, 2, 3)])
    with pytest.raises(ValueError, match="2 colours for 3 classes"):
        Folder(str(tmp_path / "im"), num_classes=3, mask_palette=[(0, 0, 0), (1, 1, 1)])
    write_image(str(tmp_path / "im" / "top.png"), 2, fmt="png")
    with pytest.raises(DataError, match=r"two images with id 'top'"):
        Folder(str(tmp_path / "im")).examples("all")


# -- registry ---------------------------------------------------------------------------------
def test_registry(camvid_root):
    reader = readers.get_reader("camvid", root=camvid_root[0])
    assert isinstance(reader, CamVid)
    assert readers.reader_names() == ["camvid", "cityscapes", "folder", "shapes", "tfds", "voc"]
    with pytest.raises(ValueError, match=r"^unknown dataset reader 'kitti'; known: camvid, "
                                         r"cityscapes, folder, shapes, tfds, voc$"):
        readers.get_reader("kitti")
    readers.register_reader("mine", lambda root: CamVid(root))
    assert isinstance(readers.get_reader("MINE", root=camvid_root[0]), CamVid)
