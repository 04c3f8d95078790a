"""bin/evaluate on a folder dataset: --gin_param bindings reach the reader, and the data
is checked as training checks it before anything is scored."""

import json
import os

import gin
import numpy as np
import pytest
import tensorflow as tf

from kssl import config, training
from tiny import run_tool

NUM_CLASSES = 3

RUN_CONFIG = """
dataset.reader = @folder()
dataset.train_split = 'all'
dataset.eval_split = 'all'
folder.images_dir = '{root}/images'
folder.masks_dir = '{root}/masks'
folder.num_classes = 3
model.arch = 'deeplabv3plus'
model.backbone = 'small'
model.aspp_channels = 16
model.decoder_channels = 16
"""


def write_dataset(root, count, seed):
    """`count` random 32x40 images with class-id masks; returns (images, masks) arrays."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 32, 40, 3), dtype=np.uint8)
    masks = rng.integers(0, NUM_CLASSES, (count, 32, 40), dtype=np.uint8)
    for folder in ("images", "masks"):
        os.makedirs(os.path.join(root, folder))
    for k in range(count):
        tf.io.write_file(os.path.join(root, "images", f"{k:02d}.png"),
                         tf.io.encode_png(images[k]))
        tf.io.write_file(os.path.join(root, "masks", f"{k:02d}.png"),
                         tf.io.encode_png(masks[k][..., None]))
    return images, masks


@pytest.fixture
def run(tmp_path):
    """A run directory as training leaves it (config.gin, model.weights.h5) for a folder
    dataset of 4 images; untrained weights score just as well."""
    data = str(tmp_path / "data")
    write_dataset(data, 4, seed=0)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.gin").write_text(RUN_CONFIG.format(root=data))
    config.parse([str(workdir / "config.gin")])
    network = training.build_model(NUM_CLASSES)
    network.save_weights(str(workdir / "model.weights.h5"))
    gin.clear_config()
    return str(workdir), data, network


def test_reader_bindings_choose_the_data_scored(run, tmp_path):
    workdir, _, network = run
    other = str(tmp_path / "other")
    images, masks = write_dataset(other, 2, seed=1)
    result = run_tool("evaluate", "--workdir", workdir,
                      "--gin_param", f"folder.images_dir = '{other}/images'",
                      "--gin_param", f"folder.masks_dir = '{other}/masks'")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "eval_all.json")) as f:
        scored = json.load(f)
    assert scored["num_images"] == 2
    # The network's own argmax on the two other images, scored here.
    predicted = np.argmax(network(images.astype(np.float32), training=False), -1)
    confusion = np.bincount(NUM_CLASSES * masks.ravel().astype(np.int64) + predicted.ravel(),
                            minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)
    assert scored["confusion_matrix"] == confusion.tolist()


def test_bad_data_is_named_before_scoring(run):
    workdir, data, _ = run
    # 01: a label out of range; 02: a mask of another size; 03: a truncated image.
    labels = np.zeros((32, 40, 1), np.uint8)
    labels[5, 5] = 7
    tf.io.write_file(os.path.join(data, "masks", "01.png"), tf.io.encode_png(labels))
    tf.io.write_file(os.path.join(data, "masks", "02.png"),
                     tf.io.encode_png(np.zeros((30, 40, 1), np.uint8)))
    truncated = os.path.join(data, "images", "03.png")
    with open(truncated, "rb") as f:
        head = f.read()[:200]
    with open(truncated, "wb") as f:
        f.write(head)

    result = run_tool("evaluate", "--workdir", workdir)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "evaluation data check failed: 3 bad file(s)" in errors[0]
    for path in (os.path.join(data, "masks", "01.png"), os.path.join(data, "masks", "02.png"),
                 truncated):
        assert any(path in line for line in lines), path
    assert any("7" in line and "01.png" in line for line in lines)  # the bad value
    assert not os.path.exists(os.path.join(workdir, "eval_all.json"))
