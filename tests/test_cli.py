"""The command-line tools end to end on a tiny Shapes run, and the training driver's resume."""

import json
import os
import shutil

import pytest
import tensorflow as tf

from kssl import config
from tiny import crash_and_resume, error_lines, run_tool, tiny_run_config

TINY_CONFIG = tiny_run_config(steps=6, steps_per_epoch=3, num_val=4) + """
evaluation.input_size = (40, 56)
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.gin"
    path.write_text(TINY_CONFIG)
    return str(path)


def test_train_evaluate_export_predict(tmp_path, config_file):
    workdir = str(tmp_path / "run")
    result = run_tool("train", "--config", config_file, "--workdir", workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mean IoU" in result.stdout  # the per-class table is printed
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    assert 0.0 <= metrics["mean_iou"] <= 1.0
    assert set(metrics["per_class_iou"]) == {"background", "disc", "ring", "square",
                                             "triangle", "cross", "stripes"}
    for key in ("pixel_accuracy", "train_images_per_second", "train_seconds"):
        assert metrics[key] is not None and metrics[key] >= 0
    assert metrics["steps"] == 6
    operative = open(os.path.join(workdir, "config.gin")).read()
    assert "shapes.num_train = 24" in operative and "train.steps = 6" in operative
    assert "evaluation.input_size = (40, 56)" in operative
    assert os.listdir(os.path.join(workdir, "logs"))  # TensorBoard events

    result = run_tool("evaluate", "--workdir", workdir, "--split", "val")
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.load(open(os.path.join(workdir, "eval_val.json")))
    assert scored["mean_iou"] == pytest.approx(metrics["mean_iou"], abs=1e-6)
    assert scored["mode"] == metrics["mode"] and "40x56" in scored["mode"]

    # Recomputed batch-norm statistics score into their own file; the weights stay.
    weights = open(os.path.join(workdir, "model.weights.h5"), "rb").read()
    result = run_tool("evaluate", "--workdir", workdir, "--split", "val",
                      "--recompute_batch_norm", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "recomputed from 2 batches" in result.stdout
    recomputed = json.load(open(os.path.join(workdir, "eval_val_recomputed_bn.json")))
    assert 0.0 <= recomputed["mean_iou"] <= 1.0
    assert json.load(open(os.path.join(workdir, "eval_val.json"))) == scored
    assert open(os.path.join(workdir, "model.weights.h5"), "rb").read() == weights

    # A copy of the run makes the same decisions, with the accuracy evaluate found.
    twin = str(tmp_path / "twin")
    shutil.copytree(workdir, twin)
    compared = str(tmp_path / "compare.json")
    result = run_tool("compare", "--workdir", workdir, "--workdir", twin, "--output", compared)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same class on 100.0 %" in result.stdout
    comparison = json.load(open(compared))
    assert comparison["networks"][twin]["pixel_accuracy"] == pytest.approx(
        metrics["pixel_accuracy"], abs=1e-6)

    export_dir = str(tmp_path / "exported")
    result = run_tool("export", "--workdir", workdir, "--output", export_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    serving = tf.saved_model.load(export_dir).signatures["serving_default"]
    images = tf.cast(tf.random.uniform([2, 37, 50, 3], 0, 255, tf.int32), tf.uint8)
    outputs = serving(images)
    assert outputs["class_ids"].shape == (2, 37, 50)
    assert outputs["probabilities"].shape == (2, 37, 50, 7)

    inputs = tmp_path / "images"
    inputs.mkdir()
    for k in range(2):
        png = tf.io.encode_png(tf.cast(tf.random.uniform([30, 40, 3], 0, 255, tf.int32),
                                       tf.uint8))
        tf.io.write_file(str(inputs / f"im{k}.png"), png)
    out_dir = tmp_path / "masks"
    result = run_tool("predict", "--workdir", workdir, "--input", str(inputs),
                      "--output", str(out_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(out_dir)) == ["im0.png", "im1.png"]


def test_mistyped_binding_fails_with_one_line(config_file, tmp_path):
    result = run_tool("train", "--config", config_file, "--gin_param", "train.stepz = 3",
                      "--workdir", str(tmp_path / "w"))
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and "stepz" in lines[0]
    assert "Traceback" not in result.stderr


def test_unknown_dataset_fails_with_one_line(config_file, tmp_path):
    result = run_tool("train", "--config", config_file, "--gin_param",
                      "dataset.reader = @no_such_dataset()", "--workdir", str(tmp_path / "w"))
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and "no_such_dataset" in lines[0]
    assert "Traceback" not in result.stderr


def test_training_resumes_after_a_crash(tmp_path, config_file, monkeypatch):
    """A run killed after its first epoch restarts from that epoch's checkpoint."""
    config.parse([config_file], ["train.steps = 9"])
    crashed, resumed, metrics = crash_and_resume(str(tmp_path / "run"), monkeypatch)
    assert crashed == [0, 1]
    assert resumed == [1, 2]  # epoch 0 was not trained again
    assert metrics["steps"] == 9  # the optimizer's step counter was restored too
