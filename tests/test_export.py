"""SavedModel export / reload, colorize and predict_folder."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kssl.export import export_saved_model, load_saved_model
from kssl.predict import colorize, predict_folder

PALETTE = np.array([[0, 0, 0], [200, 30, 40], [20, 180, 60], [10, 20, 250]], np.uint8)


class ResizeLike(keras.layers.Layer):
    """Resizes its first input to the spatial size of its second (bilinear)."""

    def call(self, x, reference):
        return tf.image.resize(x, tf.shape(reference)[1:3], method="bilinear")


def strided_model(num_classes=3, seed=0):
    keras.utils.set_random_seed(seed)
    images = keras.Input((None, None, 3))
    features = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(
        images / 127.5 - 1.0)
    logits = keras.layers.Conv2D(num_classes, 1)(features)
    return keras.Model(images, ResizeLike()(logits, images))


def one_hot_model():
    """Predicts class k where channel k is brightest (class 3 never)."""
    model = keras.Sequential([keras.Input((None, None, 3)),
                              keras.layers.Conv2D(4, 1, use_bias=False)])
    kernel = np.array([[1, 0, 0, -9], [0, 1, 0, -9], [0, 0, 1, -9]], np.float32)
    model.layers[0].set_weights([kernel[None, None]])
    return model


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


def write_png(path, image):
    tf.io.write_file(str(path), tf.io.encode_png(image))


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
