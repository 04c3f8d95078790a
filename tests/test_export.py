"""Export in every format (SavedModel, TFLite, ONNX) and reload, colorize and
predict_folder."""

import importlib.util
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from kssl import export
from kssl.export import export_saved_model, load_saved_model
from kssl.predict import colorize, predict_folder
from tiny import (NUM_CLASSES, error_lines, one_hot_model, run_tool, softmax, strided_model,
                  tiny_segmenter, write_png, write_untrained_run)

HAVE_ONNX = all(importlib.util.find_spec(name) is not None
                for name in ("tf2onnx", "onnxruntime"))
NO_ONNX = "tf2onnx and onnxruntime are not installed (pip install kssl[onnx])"

PALETTE = np.array([[0, 0, 0], [200, 30, 40], [20, 180, 60], [10, 20, 250]], np.uint8)


def test_exported_signature_matches_the_keras_model(tmp_path):
    model = strided_model(3)
    path = export_saved_model(model, str(tmp_path / "exported"), num_classes=3)
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    rng = np.random.default_rng(0)
    for size in [(20, 28), (33, 17)]:
        images = rng.integers(0, 256, (2, *size, 3)).astype(np.uint8)
        outputs = serve(images=tf.constant(images))
        assert outputs["class_ids"].dtype == tf.int32
        assert outputs["class_ids"].shape == (2, *size)
        assert outputs["probabilities"].shape == (2, *size, 3)
        expected = np.argmax(model(images.astype(np.float32)).numpy(), -1)
        np.testing.assert_array_equal(outputs["class_ids"].numpy(), expected)
        np.testing.assert_allclose(outputs["probabilities"].numpy().sum(-1), 1.0, rtol=1e-5)

    predict = load_saved_model(path)
    images = rng.integers(0, 256, (15, 22, 3)).astype(np.uint8)
    by_uint8 = predict(images)                      # one image, no batch axis
    by_float = predict(images[None].astype(np.float32))
    assert by_uint8["class_ids"].shape == (15, 22)
    np.testing.assert_array_equal(by_uint8["class_ids"].numpy(), by_float["class_ids"][0])


def test_export_checks_num_classes(tmp_path):
    with pytest.raises(ValueError, match="num_classes is 5"):
        export_saved_model(strided_model(3), str(tmp_path / "m"), num_classes=5)
    with pytest.raises(FileNotFoundError, match="saved_model.pb"):
        load_saved_model(str(tmp_path / "missing"))


def test_colorize():
    ids = np.array([[0, 1, 3], [255, 7, -1]])
    np.testing.assert_array_equal(
        colorize(ids, PALETTE),
        [[PALETTE[0], PALETTE[1], PALETTE[3]], [[255, 255, 255], [0, 0, 0], [0, 0, 0]]])


def test_predict_folder_writes_palette_coloured_masks(tmp_path):
    input_dir, output_dir = tmp_path / "in", tmp_path / "out"
    input_dir.mkdir()
    first = np.array([[0, 1, 2], [2, 2, 0]])
    second = np.array([[1], [0], [2], [1]])
    write_png(input_dir / "b.PNG", (np.eye(3)[second] * 255).astype(np.uint8))
    write_png(input_dir / "a.png", (np.eye(3)[first] * 255).astype(np.uint8))
    (input_dir / "notes.txt").write_text("not an image")

    written = predict_folder(one_hot_model(), str(input_dir), str(output_dir), PALETTE,
                             write_ids=True, progress=False)
    assert [os.path.basename(p) for p in written] == ["a.png", "a_ids.png", "b.png",
                                                      "b_ids.png"]
    for stem, ids in [("a", first), ("b", second)]:
        colour = tf.io.decode_png(tf.io.read_file(str(output_dir / f"{stem}.png"))).numpy()
        np.testing.assert_array_equal(colour, PALETTE[ids])
        raw = tf.io.decode_png(tf.io.read_file(str(output_dir / f"{stem}_ids.png"))).numpy()
        np.testing.assert_array_equal(raw[..., 0], ids)


def test_predict_folder_names_an_empty_or_missing_folder(tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    (empty / "readme.md").write_text("no images")
    with pytest.raises(ValueError, match="nothing_here: no images"):
        predict_folder(one_hot_model(), str(empty), str(tmp_path / "out"), PALETTE)
    with pytest.raises(FileNotFoundError, match="absent"):
        predict_folder(one_hot_model(), str(tmp_path / "absent"), str(tmp_path / "out"),
                       PALETTE)


# -- TFLite and ONNX ------------------------------------------------------------------
def segmenter_with_statistics(seed=0):
    """The tiny segmenter with non-trivial batch-norm statistics, so a converter that
    dropped or mis-folded the batch norm would change the predictions."""
    model = tiny_segmenter(seed)
    rng = np.random.default_rng(seed)
    norm = next(layer for layer in model.layers
                if isinstance(layer, keras.layers.BatchNormalization))
    gamma, beta, mean, variance = norm.get_weights()
    norm.set_weights([rng.uniform(0.5, 2.0, gamma.shape), rng.normal(0, 1, beta.shape),
                      rng.normal(0, 20, mean.shape), rng.uniform(50, 400, variance.shape)])
    return model


def assert_predicts_like(outputs, logits):
    """Class ids equal the argmax of the Keras logits wherever the top two logits differ by
    more than 1e-3 (elsewhere float rounding may flip them), and probabilities agree."""
    top_two = np.sort(logits, axis=-1)[..., -2:]
    clear = top_two[..., 1] - top_two[..., 0] > 1e-3
    assert clear.mean() > 0.95  # the comparison covers almost every pixel
    class_ids = np.asarray(outputs["class_ids"])
    assert class_ids.shape == logits.shape[:-1] and class_ids.dtype == np.int32
    np.testing.assert_array_equal(class_ids[clear], logits.argmax(-1)[clear])
    np.testing.assert_allclose(outputs["probabilities"], softmax(logits), atol=1e-4)


def loader(format):
    return {"saved_model": load_saved_model, "tflite": export.load_tflite,
            "onnx": export.load_onnx}[format]


@pytest.mark.parametrize("format", [
    "saved_model", "tflite",
    pytest.param("onnx", marks=pytest.mark.skipif(not HAVE_ONNX, reason=NO_ONNX))])
def test_every_format_predicts_the_keras_class_ids(tmp_path, format):
    model = segmenter_with_statistics()
    size = (24, 32)
    path = export.export_model(model, str(tmp_path / f"model.{format}"), NUM_CLASSES,
                               format=format, input_size=size)
    predict = loader(format)(path)
    images = np.random.default_rng(1).integers(0, 256, (3, *size, 3)).astype(np.uint8)
    logits = model(images.astype(np.float32), training=False).numpy()
    outputs = {key: np.asarray(value) for key, value in predict(images).items()}
    assert_predicts_like(outputs, logits)
    single = predict(images[1])  # one image without a batch axis
    np.testing.assert_array_equal(single["class_ids"], outputs["class_ids"][1])


def test_tflite_model_takes_its_fixed_size_only(tmp_path):
    model = segmenter_with_statistics()
    path = export.export_tflite(model, str(tmp_path / "sub" / "m.tflite"), NUM_CLASSES,
                                input_size=(16, 20))
    predict = export.load_tflite(path)
    assert predict.input_size == (16, 20)
    with pytest.raises(ValueError, match="takes images of 16x20, got 20x16"):
        predict(np.zeros((1, 20, 16, 3), np.uint8))


@pytest.mark.skipif(not HAVE_ONNX, reason=NO_ONNX)
def test_onnx_model_takes_any_size_and_resizes_to_the_input_size(tmp_path):
    model = segmenter_with_statistics()
    path = export.export_onnx(model, str(tmp_path / "m.onnx"), NUM_CLASSES,
                              input_size=(24, 32))
    predict = export.load_onnx(path)
    rng = np.random.default_rng(2)
    for size in [(20, 28), (33, 17)]:
        images = rng.integers(0, 256, (2, *size, 3)).astype(np.uint8)
        # The network runs at 24x32 and its logits are resized back, both bilinear.
        resized = tf.image.resize(images.astype(np.float32), (24, 32), method="bilinear")
        logits = tf.image.resize(model(resized, training=False), size,
                                 method="bilinear").numpy()
        assert_predicts_like(predict(images), logits)


def test_export_errors_name_the_fix(tmp_path, monkeypatch):
    model = tiny_segmenter(0)
    with pytest.raises(export.ExportError, match="input_size"):
        export.export_model(model, str(tmp_path / "m.tflite"), NUM_CLASSES, format="tflite")
    with pytest.raises(export.ExportError, match="format must be one of"):
        export.export_model(model, str(tmp_path / "m"), NUM_CLASSES, format="coreml")
    # A module set to None in sys.modules cannot be imported: tf2onnx is "not installed".
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    assert not export.onnx_available()
    with pytest.raises(ImportError, match=r"pip install kssl\[onnx\]"):
        export.export_onnx(model, str(tmp_path / "m.onnx"), NUM_CLASSES)
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture
def untrained_run(tmp_path):
    """A run directory as bin/train leaves it (config.gin, model.weights.h5), without the
    training: (workdir, the network its weights hold)."""
    workdir = str(tmp_path / "run")
    return workdir, write_untrained_run(workdir)


def test_cli_exports_tflite_at_the_given_size(tmp_path, untrained_run):
    workdir, network = untrained_run
    output = str(tmp_path / "m.tflite")
    result = run_tool("export", "--workdir", workdir, "--output", output, "--format", "tflite")
    assert result.returncode == 2  # the run has no evaluation.input_size
    errors = error_lines(result)
    assert len(errors) == 1 and "--input_size H,W" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "m.tflite").exists()

    result = run_tool("export", "--workdir", workdir, "--output", output, "--format", "tflite",
                      "--input_size", "40,56")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote TFLite model" in result.stdout
    predict = export.load_tflite(str(tmp_path / "m.tflite"))
    images = np.random.default_rng(3).integers(0, 256, (2, 40, 56, 3)).astype(np.uint8)
    logits = network(images.astype(np.float32), training=False).numpy()
    assert_predicts_like(predict(images), logits)
