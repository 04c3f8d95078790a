"""Configured values are checked before a run starts, and the tools' errors are one line
naming the culprit: bad bindings, weight files, run directories, file names and images."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import gin

from kssl import config, evaluation, models, training
from kssl.cli import common
from kssl.config import ConfigError
from kssl.data import validate
from kssl.data.pseudo_masks import write_pseudo_masks
from kssl.data.readers.base import DataError
from kssl.data.readers.folder import Folder
from kssl.data.readers.shapes import Shapes
from kssl.predict import predict_folder
from tiny import REPO, error_lines, run_tool, tiny_run_config, tiny_segmenter, write_png

RUN_CONFIG = tiny_run_config()


# -- every configured value, before anything is read or written --------------------------
BAD_BINDINGS = [
    (["model.arch = 'deeplabv9'"], "model.arch = 'deeplabv9': expected one of"),
    (["model.backbone = 'resnet999'"], "model.backbone = 'resnet999': expected one of"),
    (["optimizer.name = 'adagrad'"], "optimizer.name = 'adagrad': expected one of"),
    (["dataset.train_split = 'trian'"], "no split 'trian'"),
    (["dataset.eval_split = 'vall'"], "no split 'vall'"),
    (["train.steps = 'twenty'"], "train.steps = 'twenty': expected an integer >= 1"),
    (['train.steps = "20"'], "write the number without quotes"),
    (["pipeline.batch_size = -4"], "pipeline.batch_size = -4: expected an integer >= 1"),
    (["pipeline.crop_size = (48, 'x')"], "pipeline.crop_size"),
    (["labels.fraction = 0.5"], "labels.count and labels.fraction are both set"),
    (["evaluation.mode = 'wholee'"], "evaluation.mode = 'wholee': expected one of"),
    (["optimizer.name = 'adam'", "optimizer.nesterov = True"], "an SGD option"),
    (["shapes.num_train = 'x'"], "num_train must be an integer"),
    (["model.weights = 'weights/deeplabv2_resnet101_coco.weights.h5'"],
     "bin/convert_weights --from FILE.pth --arch deeplabv2_resnet101 --output "
     "weights/deeplabv2_resnet101_coco.weights.h5"),
    # A staged method's later stage is checked before its first stage trains.
    (["train.method = @ThreeStage", "stage_3/evaluation.mode = 'wholee'"],
     "stage 3: evaluation.mode = 'wholee'"),
]


@pytest.mark.parametrize("bindings,expected", BAD_BINDINGS,
                         ids=[b[-1].split(" =")[0] for b, _ in BAD_BINDINGS])
def test_a_bad_value_fails_in_one_line_before_anything_is_read(tmp_path, monkeypatch,
                                                               bindings, expected):
    monkeypatch.chdir(tmp_path)
    workdir = str(tmp_path / "run")
    config.parse([], [RUN_CONFIG] + bindings)
    with pytest.raises((ConfigError, DataError)) as caught:
        config.call_configured(training.train, workdir)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message and "In call to configurable" not in message
    assert not os.path.exists(workdir)  # failed before the run directory was made


def test_a_method_option_fails_in_one_line_before_training(tmp_path):
    config.parse([], [RUN_CONFIG, "train.method = @ClassMix", "ClassMix.weighting = 'x'"])
    with pytest.raises(ConfigError, match=r"^ClassMix: .*weighting.*'x'$"):
        config.call_configured(training.train, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "backup")  # no epoch was trained


def test_a_workdir_that_is_a_file_is_named(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    config.parse([], [RUN_CONFIG])
    with pytest.raises(ConfigError, match=f"--workdir {path} is a file"):
        config.call_configured(training.train, str(path))
    assert path.read_text() == "mine"


def test_train_cli_reads_an_including_config_from_another_directory(tmp_path):
    """The shipped config includes 'configs/supervised_camvid.gin' (repository-relative);
    from another directory it still parses, so the error is the bad binding's."""
    result = run_tool("train", "--config", os.path.join(REPO, "configs", "classmix_camvid.gin"),
                      "--gin_param", "train.steps = 'twenty'", "--workdir",
                      str(tmp_path / "run"), cwd=str(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert error_lines(result) == [
        "error: train.steps = 'twenty': expected an integer >= 1 (a string here: write the "
        "number without quotes)"]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run")


# -- trained weights -------------------------------------------------------------------
def fake_run(tmp_path, weights_from=None, truncate=False):
    """A run directory with the tiny config and weights of another network, or cut short."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.gin").write_text(RUN_CONFIG)
    path = str(workdir / "model.weights.h5")
    (weights_from or models.build_segmenter(
        "deeplabv3plus", "small", num_classes=7, aspp_channels=16,
        decoder_channels=16)).save_weights(path)
    if truncate:
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    return str(workdir), path


@pytest.mark.parametrize("other,expected", [
    (dict(arch="deeplabv3plus", num_classes=3, aspp_channels=16, decoder_channels=16),
     "(1, 1, 16, 3) in the file, (1, 1, 16, 7) in the network (a classifier for 3 classes"),
    (dict(arch="deeplabv3", num_classes=7, aspp_channels=16), "another architecture"),
], ids=["class_count", "arch"])
def test_weights_of_another_network_are_named(tmp_path, other, expected):
    other = models.build_segmenter(backbone="small", **other)
    workdir, path = fake_run(tmp_path, weights_from=other)
    with pytest.raises(ConfigError) as caught:
        common.load_trained(workdir)
    message = str(caught.value)
    assert message.startswith(f"{path} does not fit the network {workdir}/config.gin")
    assert expected in message and "\n" not in message


@pytest.mark.parametrize("tool", ["evaluate", "export"])
def test_a_truncated_weight_file_is_named_in_one_line(tmp_path, tool):
    workdir, path = fake_run(tmp_path, truncate=True)
    args = ["--output", str(tmp_path / "exported")] if tool == "export" else []
    result = run_tool(tool, "--workdir", workdir, *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(
        f"error: {path} is not a readable Keras weight file (")
    assert "truncated file" in lines[0]
    assert not os.path.exists(tmp_path / "exported")


# -- file names, images and masks -------------------------------------------------------
def test_a_file_name_that_is_not_utf8_is_named(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_png(str(images / "ok.png"), np.zeros((32, 32, 3)))
    write_png(os.path.join(os.fsencode(images), b"caf\xe9.png"), np.zeros((32, 32, 3)))
    with pytest.raises(DataError, match=r"not valid UTF-8: .*caf\\xe9\.png"):
        Folder(str(images)).examples("all")
    output = tmp_path / "masks"
    with pytest.raises(DataError, match=r"not valid UTF-8: .*caf\\xe9\.png"):
        predict_folder(tiny_segmenter(0, 2), str(images), str(output), [[0] * 3, [255] * 3])
    assert not output.exists()


def test_predict_names_a_file_that_is_not_an_image_before_writing(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_png(str(images / "a.png"), np.zeros((32, 32, 3)))
    (images / "b.jpg").write_text("a shopping list, not a photo")
    output = tmp_path / "masks"
    with pytest.raises(DataError) as caught:
        predict_folder(tiny_segmenter(0, 2), str(images), str(output), [[0] * 3, [255] * 3])
    assert str(caught.value).startswith(f"{images / 'b.jpg'} is not an image kssl can read")
    assert not output.exists()  # not even a.png's mask was written


def test_a_16_bit_mask_reports_its_real_values(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    write_png(str(images / "a.png"), np.zeros((8, 8, 3)))
    mask = np.zeros((8, 8, 1), np.uint16)
    mask[0, 0], mask[1, :2], mask[2, 2] = 300, 65000, 2
    tf.io.write_file(str(masks / "a.png"), tf.io.encode_png(tf.constant(mask)))
    reader = Folder(str(images), str(masks), num_classes=3)
    with pytest.raises(DataError) as caught:
        validate.validate(reader, reader.examples("all"), with_masks=True, num_classes=3)
    message = str(caught.value)
    assert f"{masks / 'a.png'}: values [300, 65000] in 3 pixels" in message
    assert "254" not in message


# -- progress in log files ----------------------------------------------------------------
def test_evaluation_progress_is_one_line_when_not_a_terminal(capsys):
    images = tf.zeros([5, 16, 16, 3])
    masks = tf.zeros([5, 16, 16], tf.int32)
    dataset = tf.data.Dataset.from_tensor_slices((images, masks))
    evaluation.evaluate(tiny_segmenter(0, 2), dataset, 2, progress=True)
    out = capsys.readouterr().out
    assert "\r" not in out and "\b" not in out
    assert len([line for line in out.splitlines() if "mean_iou" in line]) == 1
    # A stream of unknown length still prints its line.
    unknown = dataset.filter(lambda image, mask: True)
    evaluation.evaluate(tiny_segmenter(0, 2), unknown, 2, progress=True)
    out = capsys.readouterr().out
    assert "\r" not in out and len([l for l in out.splitlines() if "mean_iou" in l]) == 1


def test_pseudo_mask_progress_is_one_line_when_not_a_terminal(tmp_path, capsys):
    reader = Shapes(num_train=5, num_val=0, height=32, width=32)
    pool = reader.examples("train")
    write_pseudo_masks(str(tmp_path / "pl"), tiny_segmenter(0, 7), reader,
                       [("unlabelled", pool.without_masks())], 7, batch_size=2)
    out = capsys.readouterr().out
    assert "\r" not in out and "\b" not in out
    assert len([line for line in out.splitlines() if "5/5" in line]) == 1


# -- help and Nesterov ------------------------------------------------------------------
TOOL_FLAGS = {"train": ["--config", "--gin_param", "--workdir", "--overwrite"],
              "evaluate": ["--workdir", "--split", "--gin_param"],
              "compare": ["--workdir", "--split", "--output"],
              "export": ["--workdir", "--output", "--format", "--input_size"],
              "predict": ["--workdir", "--input", "--output", "--write_ids"],
              "benchmark": ["--config", "--table", "--record", "--pipeline_only"],
              "convert_weights": ["--from", "--arch", "--output", "--key"]}


def test_help_shows_each_tools_own_flags(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    running = {tool: subprocess.Popen([sys.executable, os.path.join(REPO, "bin", tool),
                                       "--help"], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, env=env,
                                      cwd=str(tmp_path))
               for tool in TOOL_FLAGS}
    for tool, process in running.items():
        out, _ = process.communicate(timeout=300)
        assert f"bin/{tool}" in out.splitlines()[0] and "--help`" not in out, (tool, out)
        for flag in TOOL_FLAGS[tool]:
            assert f"  {flag}" in out or f"  --[no]{flag[2:]}" in out, (tool, flag, out)


@pytest.mark.parametrize("name", ["classmix_voc.gin", "classmix_cityscapes.gin"])
def test_classmix_paper_configs_train_with_nesterov_momentum(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config.parse([os.path.join(REPO, "configs", name)])
    optimizer = training.build_optimizer(10, batch_size=training.pipeline_settings()[
        "batch_size"])
    assert optimizer.nesterov is True and optimizer.momentum == pytest.approx(0.9)
    gin.clear_config()
    config.parse([os.path.join(REPO, "configs", name)], ["optimizer.nesterov = False"])
    assert training.build_optimizer(10).nesterov is False
