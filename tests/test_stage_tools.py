"""Every command-line tool on a finished three-stage run: the top-level directory (the
final network) and each stage directory, scored against the run's own metrics.json."""

import contextlib
import io
import json
import os

import gin
import numpy as np
import pytest
import tensorflow as tf

from kssl import config, training
from kssl.data.readers.shapes import Shapes
from tiny import run_tool, tiny_run_config

STAGED = tiny_run_config("ThreeStage", steps=2, steps_per_epoch=2, num_val=4) + """
pipeline.unlabelled_batch_size = 4
ThreeStage.backbone_lr_multiplier = 1.0
ThreeStage.seed = 0
stage_1/evaluation.input_size = (40, 56)
"""
# Stage 1 is scored at a reduced size and the later stages are not: a tool that read
# another stage's bindings than its directory's would score differently.
DIRECTORIES = ["", "stage_1", "stage_2", "stage_3"]  # "": the run's top level


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    """(run directory, what training printed) of a finished tiny ThreeStage run."""
    workdir = str(tmp_path_factory.mktemp("staged") / "run")
    gin.clear_config()
    config.parse([], [STAGED])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        training.train(workdir)
    gin.clear_config()
    return workdir, printed.getvalue()


def metrics(directory):
    with open(os.path.join(directory, "metrics.json")) as f:
        return json.load(f)


def val_set():
    """The run's val images (uint8) and masks, as the config builds them."""
    reader = Shapes(num_train=24, num_val=4, height=48, width=64)
    rows = list(reader.load(reader.examples("val")).as_numpy_iterator())
    return ([row["id"].decode() for row in rows], np.stack([row["image"] for row in rows]),
            np.stack([row["mask"] for row in rows]))


def scores(predicted, masks, num_classes=7):
    """(mean IoU over classes with a non-empty union, pixel accuracy), ignoring 255."""
    kept = masks != 255
    truth, guess = masks[kept].astype(np.int64), predicted[kept].astype(np.int64)
    confusion = np.bincount(num_classes * truth + guess,
                            minlength=num_classes ** 2).reshape(num_classes, num_classes)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    iou = np.diag(confusion)[union > 0] / union[union > 0]
    return iou.mean(), np.trace(confusion) / confusion.sum()


def test_a_saved_stage_config_binds_its_own_stage_unscoped(tmp_path):
    path = tmp_path / "config.gin"
    path.write_text("""
train.steps = 4
stage_1/evaluation.input_size = (40, 56)
stage_1/train.steps = 2
stage_2/evaluation.input_size = None
stage_2/model.stride_on = None
stage_2/train.steps = 4
stage_3/evaluation.input_size = (24, 32)
# The ResNet layout the weights (model.weights) need, as built:
model.stride_on = 'conv1'
""")
    config.parse_saved_run(str(path), ["train.seed = 3"], stage=2)
    assert training.evaluation_settings()["input_size"] is None  # stage 2's, not 1's or 3's
    assert gin.query_parameter("train.steps") == 4
    assert gin.query_parameter("model.stride_on") == "conv1"  # appended lines still win
    assert gin.query_parameter("train.seed") == 3
    gin.clear_config()
    config.parse_saved_run(str(path))  # a whole run's: the last stage's
    assert training.evaluation_settings()["input_size"] == (24, 32)


def test_the_closing_table_shows_each_stage(staged_run):
    workdir, printed = staged_run
    lines = printed.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("stage "))
    assert "val mIoU %" in lines[start] and "pseudo-masks mIoU %" in lines[start]
    rows = [line.split() for line in lines[start + 2:start + 5]]
    percent = lambda value: f"{100 * value:.1f}"
    for stage, row in zip((1, 2, 3), rows):
        stage_metrics = metrics(os.path.join(workdir, f"stage_{stage}"))
        masks = stage_metrics.get("pseudo_masks")
        expected = [str(stage), percent(stage_metrics["mean_iou"])] + (
            ["-", "-", "-"] if masks is None else
            [percent(masks["labelled_mean_iou"]), percent(masks["unlabelled_mean_iou"]),
             percent(masks["unlabelled_argmax_mean_iou"])])
        assert row == expected
    assert rows[2][2:] == ["-", "-", "-"]  # the last stage stores no pseudo-masks


@pytest.mark.parametrize("directory", DIRECTORIES)
def test_evaluate_reads_the_run_and_each_stage(staged_run, directory):
    where = os.path.join(staged_run[0], directory)
    result = run_tool("evaluate", "--workdir", where)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(where, "eval_val.json")) as f:
        scored = json.load(f)
    assert scored["mean_iou"] == pytest.approx(metrics(where)["mean_iou"], abs=1e-6)
    assert scored["pixel_accuracy"] == pytest.approx(metrics(where)["pixel_accuracy"],
                                                     abs=1e-6)


def test_compare_reads_the_run_and_each_stage(staged_run, tmp_path):
    workdirs = [os.path.join(staged_run[0], d) for d in DIRECTORIES]
    output = str(tmp_path / "compare.json")
    args = [a for w in workdirs for a in ("--workdir", w)]
    result = run_tool("compare", *args, "--output", output)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output) as f:
        networks = json.load(f)["networks"]
    for where in workdirs:
        assert networks[where]["pixel_accuracy"] == pytest.approx(
            metrics(where)["pixel_accuracy"], abs=1e-6), where


def test_export_of_the_final_network_scores_as_the_run(staged_run, tmp_path):
    workdir = staged_run[0]
    exported = str(tmp_path / "exported")
    result = run_tool("export", "--workdir", workdir, "--output", exported)
    assert result.returncode == 0, result.stderr[-3000:]
    serving = tf.saved_model.load(exported).signatures["serving_default"]
    _, images, masks = val_set()
    predicted = serving(tf.constant(images, tf.uint8))["class_ids"].numpy()
    mean_iou, accuracy = scores(predicted, masks)
    assert mean_iou == pytest.approx(metrics(workdir)["mean_iou"], abs=1e-6)
    assert accuracy == pytest.approx(metrics(workdir)["pixel_accuracy"], abs=1e-6)


def test_predict_with_a_stage_scores_as_that_stage(staged_run, tmp_path):
    where = os.path.join(staged_run[0], "stage_1")
    inputs, outputs = tmp_path / "images", tmp_path / "masks"
    inputs.mkdir()
    ids, images, masks = val_set()
    names = [f"im{k}" for k in range(len(ids))]
    for name, image in zip(names, images):
        tf.io.write_file(str(inputs / f"{name}.png"), tf.io.encode_png(image))
    result = run_tool("predict", "--workdir", where, "--input", str(inputs),
                      "--output", str(outputs), "--write_ids")
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = np.stack([tf.io.decode_png(tf.io.read_file(
        str(outputs / f"{name}_ids.png")))[..., 0].numpy() for name in names])
    mean_iou, accuracy = scores(predicted, masks)
    assert mean_iou == pytest.approx(metrics(where)["mean_iou"], abs=1e-6)
    assert accuracy == pytest.approx(metrics(where)["pixel_accuracy"], abs=1e-6)
