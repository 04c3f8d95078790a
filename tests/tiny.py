"""Shared test helpers: tiny networks and Shapes configs, test files and images, numpy
references, the command-line tools, and the harness every training method's tests run."""

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from kssl import config, training
from kssl.constants import IGNORE_LABEL

NUM_CLASSES = 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- networks -------------------------------------------------------------------------------
def tiny_segmenter(seed, num_classes=NUM_CLASSES):
    """conv -> synchronised BN -> relu -> 1x1 classifier, logits at input size."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization(synchronized=True)(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.Conv2D(num_classes, 1)(x)
    return keras.Model(inputs, outputs)


class ResizeLike(keras.layers.Layer):
    """Resizes its first input to the spatial size of its second (bilinear)."""

    def call(self, x, reference):
        return tf.image.resize(x, tf.shape(reference)[1:3], method="bilinear")


def pixel_model(kernel):
    """A 1x1 convolution with a fixed [3, C] kernel: each pixel's logits depend on it alone."""
    kernel = np.asarray(kernel, np.float32)
    model = keras.Sequential([keras.Input((None, None, 3)),
                              keras.layers.Conv2D(kernel.shape[1], 1, use_bias=False)])
    model.layers[0].set_weights([kernel[None, None]])
    return model


def one_hot_model():
    """Predicts class k where channel k is brightest; class 3 is never predicted."""
    return pixel_model([[1, 0, 0, -9], [0, 1, 0, -9], [0, 0, 1, -9]])


def strided_model(num_classes=NUM_CLASSES, seed=0):
    """A 3x3 stride-2 convolution, a 1x1 classifier, then a resize back: logits depend on
    the neighbourhood, so tiling and padding show in them."""
    keras.utils.set_random_seed(seed)
    images = keras.Input((None, None, 3))
    features = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(
        images / 127.5 - 1.0)
    logits = keras.layers.Conv2D(num_classes, 1)(features)
    return keras.Model(images, ResizeLike()(logits, images))


# -- Shapes configs -------------------------------------------------------------------------
def shapes_reader_config(num_train, height, width):
    """The gin lines of a synthetic Shapes data set of `num_train` images."""
    return f"""
dataset.reader = @shapes()
shapes.num_train = {num_train}
shapes.height = {height}
shapes.width = {width}
"""


# A Shapes run small enough for a test: 24 training images of 48x64, 8 of them labelled,
# the small backbone with narrow heads. Tests append the method and step bindings.
TINY_SHAPES_CONFIG = shapes_reader_config(24, 48, 64) + """
labels.count = 8
pipeline.batch_size = 4
pipeline.crop_size = (48, 64)
pipeline.scale_range = (1.0, 1.0)
model.arch = 'deeplabv3plus'
model.backbone = 'small'
model.aspp_channels = 16
model.decoder_channels = 16
optimizer.learning_rate = 0.01
train.verbose = 0
"""


def tiny_run_config(method="Supervised", steps=2, steps_per_epoch=1, num_val=2):
    """TINY_SHAPES_CONFIG trained by `method` for `steps` steps, validated on `num_val`
    images; tests append their own bindings."""
    return TINY_SHAPES_CONFIG + f"""
shapes.num_val = {num_val}
train.method = @{method}
train.steps = {steps}
train.steps_per_epoch = {steps_per_epoch}
"""


def write_untrained_run(workdir):
    """A run directory as bin/train leaves it (config.gin, model.weights.h5) for
    TINY_SHAPES_CONFIG, without the training; returns the network its weights hold.
    Untrained weights serve every tool that only reads a run."""
    os.makedirs(workdir)
    path = os.path.join(workdir, "config.gin")
    with open(path, "w") as f:
        f.write(TINY_SHAPES_CONFIG)
    config.parse([path])
    try:
        reader, _, _ = config.call_configured(training.dataset_setup)
        keras.utils.set_random_seed(0)
        network = training.build_model(reader.info.num_classes, weights=None)
        network.save_weights(os.path.join(workdir, "model.weights.h5"))
    finally:
        gin.clear_config()
    return network


# -- files ----------------------------------------------------------------------------------
def write_bytes(path, data):
    """Writes `data` to `path` (str, bytes or Path), making its folder first."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_png(path, array):
    """A PNG of a uint8 [H, W, C] array; `path` may be bytes (for non-UTF-8 names)."""
    write_bytes(path, tf.io.encode_png(np.asarray(array, np.uint8)).numpy())


def write_image(path, seed, fmt="jpg", size=(8, 12)):
    """A random RGB image of `size` as JPEG or PNG; returns the pixels drawn."""
    image = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    encoded = tf.io.encode_jpeg(image) if fmt == "jpg" else tf.io.encode_png(image)
    write_bytes(path, encoded.numpy())
    return image


def random_mask(seed, values, size=(8, 12)):
    """A uint8 mask of `size` with values drawn from `values`."""
    return np.random.default_rng(seed).choice(np.asarray(values, np.uint8), size)


def write_mask(path, mask):
    """A single-channel PNG of a class-id mask; returns the mask."""
    write_png(path, np.asarray(mask, np.uint8)[..., None])
    return mask


def write_lines(path, lines):
    """A text file of `lines`; returns its path as a string."""
    write_bytes(path, ("\n".join(lines) + "\n").encode())
    return str(path)


def decode_all(reader, examples, with_masks=True):
    """Every example a reader loads, as numpy dictionaries."""
    return list(reader.load(examples, with_masks=with_masks).as_numpy_iterator())


def table_cells(row):
    """The stripped cells of one Markdown table row."""
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


# -- data -----------------------------------------------------------------------------------
def random_images(shape, seed=0, integer=False):
    """Float32 images of `shape` with uniform values in [0, 255); with `integer`, whole
    numbers, so that sums of integer weights on them are exact floats."""
    images = np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)
    return np.floor(images) if integer else images


def random_batches(n=4, size=(16, 16), seed=0, num_classes=NUM_CLASSES, n_unlabelled=None,
                   ignored_columns=None):
    """A (labelled, unlabelled) pair of random batches: `n` labelled images with masks and
    `n_unlabelled` (default `n`) unlabelled images. The second half of the labelled masks
    ignores its first `ignored_columns` columns (default half the width), so that the two
    replicas of a distributed step count different numbers of pixels."""
    rng = np.random.default_rng(seed)
    labelled = {"image": rng.uniform(0, 255, (n, *size, 3)).astype(np.float32),
                "mask": rng.integers(0, num_classes, (n, *size)).astype(np.int32)}
    ignored = size[1] // 2 if ignored_columns is None else ignored_columns
    labelled["mask"][n // 2:, :ignored] = IGNORE_LABEL
    shape = (n if n_unlabelled is None else n_unlabelled, *size, 3)
    unlabelled = {"image": rng.uniform(0, 255, shape).astype(np.float32)}
    return labelled, unlabelled


# -- numpy references -----------------------------------------------------------------------
def log_softmax(logits):
    """Log-probabilities of numpy logits [..., C], in their own float precision (tests at
    a threshold's edge compare float32 values as the library computes them)."""
    z = np.asarray(logits)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def softmax(logits):
    """Probabilities of numpy logits [..., C]."""
    return np.exp(log_softmax(logits))


def pixel_cross_entropy(logits, labels):
    """Per-pixel CE of numpy logits [..., C] against labels; ignored pixels are scored
    against class 0, for the caller to mask."""
    safe = np.where(labels == IGNORE_LABEL, 0, labels)
    return -np.take_along_axis(log_softmax(logits), safe[..., None], -1)[..., 0]


def mean_cross_entropy(logits, labels):
    """Mean CE over the pixels whose label is not ignored, in float64."""
    logits = np.asarray(logits, np.float64)
    return pixel_cross_entropy(logits, labels)[labels != IGNORE_LABEL].mean()


# -- the command-line tools -----------------------------------------------------------------
def _run_tool_in_child(path, args, cwd, env, stdout_path, stderr_path):
    """The body of a `run_tool` process: bin/<name> as `__main__`, fds 1 and 2 to files."""
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    for fd, name in ((1, stdout_path), (2, stderr_path)):
        handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    sys.argv = [path, *args]
    runpy.run_path(path, run_name="__main__")


_tool_processes = None


def _tool_context():
    """A forkserver that has imported TensorFlow, Keras and kssl once: each tool run forks
    from it, which saves the few seconds of those imports per run (the suite runs the
    tools a few dozen times). The fork happens before any TensorFlow op runs, so each
    run starts with a fresh runtime, as a new process would."""
    global _tool_processes
    if _tool_processes is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # read as the server imports TF
        _tool_processes = multiprocessing.get_context("forkserver")
        _tool_processes.set_forkserver_preload(["tensorflow", "keras", "kssl.training", "tiny"])
    return _tool_processes


def run_tool(name, *args, cwd=None, timeout=600):
    """Runs bin/<name> with `args` in its own process, as the shell would (exit status,
    stdout and stderr as text, in a `subprocess.CompletedProcess`); forked from a process
    that has TensorFlow imported already (`_tool_context`)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    path = os.path.join(REPO, "bin", name)
    with tempfile.TemporaryDirectory() as outputs:
        stdout_path, stderr_path = (os.path.join(outputs, n) for n in ("stdout", "stderr"))
        process = _tool_context().Process(
            target=_run_tool_in_child, args=(path, args, cwd, env, stdout_path, stderr_path))
        process.start()
        try:
            process.join(timeout)
        finally:  # as subprocess.run: no tool outlives its call, whatever stops the wait
            timed_out = process.exitcode is None
            if timed_out:
                process.kill()
                process.join()
        with open(stdout_path) as out, open(stderr_path) as err:
            stdout, stderr = out.read(), err.read()
        if timed_out:
            raise subprocess.TimeoutExpired([path, *args], timeout, stdout, stderr)
        return subprocess.CompletedProcess([path, *args], process.exitcode, stdout, stderr)


def error_lines(result):
    """The `error:` lines a tool wrote to stderr."""
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# -- training -------------------------------------------------------------------------------
class Crash(Exception):
    """Stops a training run from inside a callback, as a killed process would."""


def crash_and_resume(workdir, monkeypatch, snapshot=lambda meter, epoch: epoch,
                     crash_epoch=1):
    """Trains the parsed config in `workdir`, crashes it as epoch `crash_epoch` starts,
    then trains again, which resumes from the backup.

    `snapshot(meter, epoch)` is taken as every epoch starts (`meter.model` is the method).
    Returns (the crashed run's snapshots, the resumed run's snapshots, the resumed run's
    metrics)."""
    original = training.ThroughputMeter.on_epoch_begin
    taken = []

    def begin(self, epoch, logs=None):
        taken.append(snapshot(self, epoch))
        if crashing and epoch == crash_epoch:
            raise Crash()
        return original(self, epoch, logs)

    monkeypatch.setattr(training.ThroughputMeter, "on_epoch_begin", begin)
    crashing = True
    with pytest.raises(Crash):
        training.train(workdir)
    assert not os.path.exists(os.path.join(workdir, "metrics.json"))
    before = list(taken)
    taken.clear()
    crashing = False
    metrics = training.train(workdir)
    return before, list(taken), metrics


def eager_steps(strategy, model, batches) -> list:
    """Runs one `model.train_step` per global batch in `batches`, eagerly, and returns
    each step's logs as floats.

    Under a multi-replica strategy each replica gets its slice of the global batch, as in
    `fit`, and runs the same replica code with the same all-reduces and merge calls as the
    compiled step. Tracing a method of several networks once per replica costs a minute
    on two cores, where a few eager steps take seconds; the compiled two-replica path is
    covered by ClassMix's test (`tests/test_classmix.py`)."""
    dataset = tf.data.Dataset.from_tensors(batches[0])
    for data in batches[1:]:
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(data))
    if strategy.num_replicas_in_sync > 1:
        dataset = strategy.experimental_distribute_dataset(dataset)
    logs = []
    for data in dataset:
        out = strategy.run(model.train_step, args=(data,))
        # Reported values are global (all-reduced), identical on every replica.
        logs.append({name: float(strategy.experimental_local_results(value)[0])
                     for name, value in out.items()})
    return logs


def train_steps(strategy, make_method, batches, weights=None, optimizer=None,
                compiled=False, on_step=None):
    """Builds `make_method()` under `strategy`, starting from `weights`, and trains one
    step per global batch in `batches`: eagerly (`eager_steps`), or through a compiled
    `fit` of one step per epoch. Returns (method, logs: name -> the value of each step).

    `on_step(method)` is called before the first step and after each one. Every step's
    logs are its own: the metrics are reset between steps."""
    with strategy.scope():
        model = make_method()
        if weights is not None:
            model.set_weights(weights)
        model.compile(optimizer=optimizer() if optimizer else keras.optimizers.SGD(0.05))
    if on_step:
        on_step(model)
    if compiled:
        dataset = tf.data.Dataset.from_tensors(batches[0])
        for data in batches[1:]:
            dataset = dataset.concatenate(tf.data.Dataset.from_tensors(data))
        callbacks = [keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: on_step(model))] if on_step else []
        history = model.fit(dataset.repeat(), epochs=len(batches), steps_per_epoch=1,
                            verbose=0, callbacks=callbacks)
        return model, history.history
    steps = []
    for data in batches:
        for metric in model.metrics:
            metric.reset_state()
        steps += eager_steps(strategy, model, [data])
        if on_step:
            on_step(model)
    return model, {name: [step[name] for step in steps] for name in steps[0]}


def run_method_test(make_method, batches, two_replicas, tmp_path, optimizer=None,
                    compiled=False, on_step=None, rtol=2e-4, atol=2e-5, log_rtol=1e-4,
                    log_atol=1e-6):
    """The checks every training method's tests share.

    Builds `make_method()` (which seeds its own initialisation), trains it from the same
    start on one replica and on `two_replicas` (`train_steps`), and asserts that it
    trained, that both runs end with the same variables (every network, teacher and
    running statistic; each replica holding the same copy) and log the same values, and
    that `save_weights` then `load_weights` into a fresh method restores every variable.
    Returns (one-replica method, its logs, two-replica method, its logs) for the method's
    own assertions."""
    start = make_method().get_weights()
    one, logs = train_steps(tf.distribute.get_strategy(), make_method, batches, start,
                            optimizer, compiled, on_step)
    two, two_logs = train_steps(two_replicas, make_method, batches, start, optimizer,
                                compiled, on_step)
    assert two.distribute_strategy.num_replicas_in_sync == 2
    moved = max(np.abs(a - b).max() for a, b in zip(start, one.get_weights()))
    assert moved > 1e-3
    for x, y in zip(one.weights, two.weights):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=rtol, atol=atol, err_msg=x.path)
        copies = two_replicas.experimental_local_results(y.value)
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy.numpy(), copies[0].numpy(), err_msg=y.path)
    assert set(two_logs) == set(logs)
    for name in logs:
        np.testing.assert_allclose(two_logs[name], logs[name], rtol=log_rtol, atol=log_atol,
                                   err_msg=name)
    path = str(tmp_path / "method.weights.h5")
    one.save_weights(path)
    restored = make_method()
    restored.load_weights(path)
    assert len(restored.weights) == len(one.weights)
    for x, y in zip(one.weights, restored.weights):
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.path)
    return one, logs, two, two_logs
