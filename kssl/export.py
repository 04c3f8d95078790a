"""Exporting a trained segmentation network for deployment: SavedModel, TFLite or ONNX.

Every format holds the inference network only (the model passed in, no optimizer,
teacher or training wrapper) and returns {"class_ids": int32 [B, H, W], "probabilities":
float32 [B, H, W, C]}.

  saved_model: two endpoints taking images of any H and W,
      "serving_default": images uint8 [B, H, W, 3] (RGB)
      "serve_float":     images float32 [B, H, W, 3] (RGB in [0, 255])
    uint8 is the default because it is what decoded image files are; the float endpoint
    is for callers who already hold float images.
  tflite: one signature "serving_default" taking uint8 images [B, h, w, 3] of exactly
    `input_size` (h, w): the interpreter and its delegates run fixed shapes best, so the
    caller resizes images to the size the network was trained at.
  onnx (needs `pip install kssl[onnx]`): one graph, input "images" uint8 [B, H, W, 3] of
    any H and W.

With `input_size` set, SavedModel and ONNX resize images to it inside the graph and resize
the logits back (bilinear), the way `kssl.evaluation` scores a network trained at reduced
resolution.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from kssl.evaluation import predict_logits

DEFAULT_SIGNATURE = "serving_default"
FLOAT_SIGNATURE = "serve_float"
FORMATS = ("saved_model", "tflite", "onnx")
ONNX_OPSET = 17


class ExportError(ValueError):
    """An export that cannot be made as asked (unknown format, missing input size)."""


class ConverterMissingError(ExportError, ImportError):
    """The converter or runtime a format needs is not installed."""


def _require(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConverterMissingError(
            f"{what} needs the {module} package, which is not installed: "
            "pip install kssl[onnx]") from error


def onnx_available() -> bool:
    """Whether the ONNX converter (tf2onnx) is installed."""
    return importlib.util.find_spec("tf2onnx") is not None


def _check_input_size(input_size):
    if input_size is None:
        return None
    size = tuple(int(v) for v in input_size)
    if len(size) != 2 or min(size) < 1:
        raise ExportError(f"input_size must be (height, width) > 0, got {input_size!r}")
    return size


def _check_num_classes(model, num_classes, input_size, who):
    probe_size = input_size if input_size is not None else (64, 64)
    probe = model(tf.zeros([1, *probe_size, 3], tf.float32), training=False)
    if probe.shape[-1] != num_classes:
        raise ValueError(f"{who}: the model outputs {probe.shape[-1]} channels "
                         f"but num_classes is {num_classes}")


def serving_function(model: keras.Model, num_classes: int, input_size=None):
    """`serve(images) -> {"class_ids", "probabilities"}` in tf ops, for images uint8 or
    float [B, H, W, 3]; with `input_size`, the network runs on images resized to it."""

    def serve(images):
        logits = predict_logits(model, images, input_size=input_size)
        logits.set_shape([None, None, None, num_classes])
        return {"class_ids": tf.argmax(logits, axis=-1, output_type=tf.int32),
                "probabilities": tf.nn.softmax(logits, axis=-1)}
    return serve


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
    input_size = _check_input_size(input_size)
    _check_num_classes(model, num_classes, input_size, "export_saved_model")
    serve = serving_function(model, num_classes, input_size)
    archive = keras.export.ExportArchive()
    archive.track(model)
    # The first endpoint registered becomes "serving_default"; naming it so is explicit.
    archive.add_endpoint(DEFAULT_SIGNATURE, serve, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    archive.add_endpoint(FLOAT_SIGNATURE, serve, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
    archive.write_out(os.fspath(path), verbose=verbose)
    return os.fspath(path)


def export_tflite(model: keras.Model, path: str, num_classes: int, input_size,
                  verbose: bool = False) -> str:
    """Writes `model` as a TFLite flatbuffer file at `path`: signature "serving_default",
    images uint8 [B, h, w, 3] -> {"class_ids", "probabilities"} at (h, w) = `input_size`
    (required: TFLite models take a fixed image size). Returns the path."""
    input_size = _check_input_size(input_size)
    if input_size is None:
        raise ExportError("a TFLite export takes images of one fixed size: give input_size "
                          "(bin/export --input_size H,W, e.g. the training crop size)")
    _check_num_classes(model, num_classes, input_size, "export_tflite")
    archive = keras.export.ExportArchive()
    archive.track(model)
    # Images come at the network's size already: no resizing in the graph.
    archive.add_endpoint(DEFAULT_SIGNATURE, serving_function(model, num_classes),
                         input_signature=[tf.TensorSpec([None, *input_size, 3], tf.uint8,
                                                        name="images")])
    with tempfile.TemporaryDirectory() as scratch:
        # Converting a concrete function directly gives NaN outputs for Keras 3 models here
        # (TF 2.21: the variables are not frozen); the SavedModel route converts them right.
        archive.write_out(scratch, verbose=verbose)
        converter = tf.lite.TFLiteConverter.from_saved_model(scratch)
        flatbuffer = converter.convert()
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return os.fspath(path)


def export_onnx(model: keras.Model, path: str, num_classes: int, input_size=None,
                opset: int = ONNX_OPSET) -> str:
    """Writes `model` as an ONNX file at `path` with tf2onnx: input "images" uint8
    [B, H, W, 3] of any size, outputs "class_ids" and "probabilities"; `input_size` as in
    `export_saved_model`. Raises ConverterMissingError without tf2onnx. Returns the path."""
    tf2onnx = _require("tf2onnx", "ONNX export")
    input_size = _check_input_size(input_size)
    _check_num_classes(model, num_classes, input_size, "export_onnx")
    signature = [tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")]
    serve = tf.function(serving_function(model, num_classes, input_size),
                        input_signature=signature)
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    tf2onnx.convert.from_function(serve, input_signature=signature, opset=opset,
                                  output_path=os.fspath(path))
    return os.fspath(path)


def export_model(model: keras.Model, path: str, num_classes: int,
                 format: str = "saved_model", input_size=None, verbose: bool = False) -> str:
    """Writes `model` in `format` ("saved_model", "tflite" or "onnx"; see the module
    docstring) at `path`. Returns the path."""
    if format == "saved_model":
        return export_saved_model(model, path, num_classes, input_size, verbose=verbose)
    if format == "tflite":
        return export_tflite(model, path, num_classes, input_size, verbose=verbose)
    if format == "onnx":
        return export_onnx(model, path, num_classes, input_size)
    raise ExportError(f"format must be one of {FORMATS}, got {format!r}")


def check_output_path(path: str, format: str, overwrite: bool = False) -> None:
    """Raises ExportError when writing `format` at `path` would replace something: an
    existing model unless `overwrite`; even with it, a folder where a file goes, a file
    where a SavedModel folder goes, or a folder holding anything but a SavedModel."""
    path = os.fspath(path)
    if format == "saved_model":
        if os.path.exists(path) and not os.path.isdir(path):
            raise ExportError(f"--output {path} is a file; a SavedModel is written as a folder")
        if os.path.isdir(path) and os.listdir(path):
            if not os.path.exists(os.path.join(path, "saved_model.pb")):
                raise ExportError(f"--output {path} is a folder that holds files but no "
                                  "SavedModel; choose a new or empty folder")
            if not overwrite:
                raise ExportError(f"--output {path} already holds a SavedModel; pass "
                                  "--overwrite to replace it")
    elif os.path.isdir(path):
        raise ExportError(f"--output {path} is a folder; --format {format} writes one file "
                          f"(e.g. model.{format})")
    elif os.path.exists(path) and not overwrite:
        raise ExportError(f"--output {path} already exists; pass --overwrite to replace it")


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


def _uint8_batch(images):
    """(uint8 batch [B, H, W, 3], whether one image was given); other dtypes are rounded
    and clipped to [0, 255], as the TFLite and ONNX models take uint8 only."""
    images = np.asarray(images)
    single = images.ndim == 3
    if single:
        images = images[None]
    if images.dtype != np.uint8:
        images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    return images, single


def _unbatch(outputs: dict, single: bool) -> dict:
    return {key: value[0] for key, value in outputs.items()} if single else outputs


def _tflite_interpreter(path: str):
    try:  # LiteRT is TFLite's successor; tf.lite.Interpreter is deprecated but still works
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = None
    if Interpreter is not None:
        return Interpreter(model_path=path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return tf.lite.Interpreter(model_path=path)


def load_tflite(path: str):
    """Loads an exported TFLite file; returns `predict(images) -> {"class_ids",
    "probabilities"}` (numpy) taking images [B, h, w, 3] (or one [h, w, 3]) of the size the
    model was exported at (`predict.input_size`)."""
    if not os.path.isfile(os.fspath(path)):
        raise FileNotFoundError(f"{path}: no such TFLite file")
    interpreter = _tflite_interpreter(os.fspath(path))
    runner = interpreter.get_signature_runner(DEFAULT_SIGNATURE)
    shape = interpreter.get_input_details()[0]["shape_signature"]
    input_size = (int(shape[1]), int(shape[2]))

    def predict(images):
        images, single = _uint8_batch(images)
        if images.shape[1:3] != input_size:
            raise ValueError(f"this TFLite model takes images of {input_size[0]}x"
                             f"{input_size[1]}, got {images.shape[1]}x{images.shape[2]}")
        return _unbatch(runner(images=images), single)

    predict.input_size = input_size
    predict.interpreter = interpreter  # the runner needs it alive
    return predict


def load_onnx(path: str):
    """Loads an exported ONNX file with onnxruntime; returns `predict(images) ->
    {"class_ids", "probabilities"}` (numpy) taking images [B, H, W, 3] (or one [H, W, 3])."""
    ort = _require("onnxruntime", "Running an ONNX model")
    if not os.path.isfile(os.fspath(path)):
        raise FileNotFoundError(f"{path}: no such ONNX file")
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_names = [output.name for output in session.get_outputs()]

    def predict(images):
        images, single = _uint8_batch(images)
        outputs = session.run(output_names, {input_name: images})
        return _unbatch(dict(zip(output_names, outputs)), single)

    predict.session = session
    return predict
