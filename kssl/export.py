"""Exporting a trained segmentation network as a TensorFlow SavedModel for deployment.

The SavedModel holds the inference network only (the model passed in, no optimizer,
teacher or training wrapper) and two endpoints:

  "serving_default": images uint8 [B, H, W, 3] (RGB, any H and W)
  "serve_float":     images float32 [B, H, W, 3] (RGB in [0, 255], any H and W)

both returning {"class_ids": int32 [B, H, W], "probabilities": float32 [B, H, W, C]} at the
input size. uint8 is the default because it is what decoded image files are; the float
endpoint is for callers who already hold float images.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from kssl.evaluation import predict_logits

DEFAULT_SIGNATURE = "serving_default"
FLOAT_SIGNATURE = "serve_float"


def export_saved_model(model: keras.Model, path: str, num_classes: int, input_size=None,
                       verbose: bool = False) -> str:
    """Writes `model` as a SavedModel at `path` (see the module docstring for the endpoints).

    Args:
      model: the inference network: float32 images [B, H, W, 3] in [0, 255] -> logits
        [B, H, W, num_classes].
      num_classes: checked against the model's output channels before writing.
      input_size: optional (h, w): images are resized to it inside the graph and the
        logits resized back (bilinear), for a network trained at reduced resolution.
    Returns the path.
    """
    probe_size = tuple(input_size) if input_size is not None else (64, 64)
    probe = model(tf.zeros([1, *probe_size, 3], tf.float32), training=False)
    if probe.shape[-1] != num_classes:
        raise ValueError(f"export_saved_model: the model outputs {probe.shape[-1]} channels "
                         f"but num_classes is {num_classes}")

    def serve(images):
        logits = predict_logits(model, images, input_size=input_size)
        logits.set_shape([None, None, None, num_classes])
        return {"class_ids": tf.argmax(logits, axis=-1, output_type=tf.int32),
                "probabilities": tf.nn.softmax(logits, axis=-1)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    # The first endpoint registered becomes "serving_default"; naming it so is explicit.
    archive.add_endpoint(DEFAULT_SIGNATURE, serve, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    archive.add_endpoint(FLOAT_SIGNATURE, serve, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
    archive.write_out(os.fspath(path), verbose=verbose)
    return os.fspath(path)


def load_saved_model(path: str):
    """Loads an exported SavedModel; returns `predict(images) -> {"class_ids",
    "probabilities"}` taking uint8 or float images [B, H, W, 3] (or one [H, W, 3])."""
    if not tf.io.gfile.exists(os.path.join(os.fspath(path), "saved_model.pb")):
        raise FileNotFoundError(f"{path}: no saved_model.pb; expected a directory written "
                                "by export_saved_model")
    loaded = tf.saved_model.load(os.fspath(path))
    endpoints = {tf.uint8: getattr(loaded, DEFAULT_SIGNATURE),
                 tf.float32: getattr(loaded, FLOAT_SIGNATURE)}

    def predict(images):
        images = tf.convert_to_tensor(images)
        single = images.shape.rank == 3
        if single:
            images = images[None]
        if images.dtype not in endpoints:
            images = tf.cast(images, tf.float32)
        outputs = endpoints[images.dtype](images)
        return {key: value[0] for key, value in outputs.items()} if single else outputs

    predict.loaded = loaded  # keeps the restored object (and its variables) alive
    return predict
