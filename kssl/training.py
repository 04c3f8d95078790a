"""The training driver: gin-configured pieces, the strategy, callbacks and the fit loop.

`train(workdir)` is what `bin/train` runs. Everything it builds is configured in gin by the
names below (see `configs/*.gin` and the README's configuration reference):

  dataset.*     which reader (`@camvid()`, `@voc()`, ...), the train and eval splits
  labels.*      the labelled subset: count, fraction, or split file; the unlabelled pool
  pipeline.*    batch sizes, crop, scale range, flip, resize, cache
  model.*       architecture, backbone, pretrained weights, output stride, norm layer
  optimizer.*   SGD/Adam, learning rate, poly schedule, weight decay
  evaluation.*  whole-image or sliding-window scoring, reduced input size, flip
  train.*       the method, steps, steps per epoch, strategy, precision, seed
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Optional

import gin
import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kssl import checks
from kssl import config as kssl_config
from kssl import evaluation, models, optimizers, pseudo_label_monitor
from kssl import run_files
from kssl.data import class_balance, pipeline, splits, validate
from kssl.data.examples import Examples
from kssl.data.pseudo_masks import PseudoMaskStore, write_pseudo_masks
from kssl.data.readers import base as reader_base
from kssl.data.readers.camvid import CamVid
from kssl.data.readers.cityscapes import Cityscapes
from kssl.data.readers.folder import Folder
from kssl.data.readers.shapes import Shapes
from kssl.data.readers.tfds_reader import Tfds
from kssl.data.readers.voc import VOC
from kssl.augment.randaugment import RandAugmentCutout
from kssl.augment.strong import ColorJitterGrayscaleBlur, StrongAugment
from kssl.methods import (ClassMix, FixMatch, GuidedMix, GuidedMixReleased, MKD, Supervised,
                          ThreeStage, UniMatch)
from kssl.methods.base import SegmentationMethod

# Readers and methods are referenced from gin files as @camvid(), @Supervised, ...
for _cls, _name in [(CamVid, "camvid"), (Cityscapes, "cityscapes"), (Folder, "folder"),
                    (Shapes, "shapes"), (Tfds, "tfds"), (VOC, "voc")]:
    gin.external_configurable(_cls, name=_name, module="kssl.data")
gin.external_configurable(Supervised, module="kssl.methods")
gin.external_configurable(ClassMix, module="kssl.methods")
gin.external_configurable(ThreeStage, module="kssl.methods")
gin.external_configurable(MKD, module="kssl.methods")
gin.external_configurable(GuidedMix, module="kssl.methods")
gin.external_configurable(GuidedMixReleased, module="kssl.methods")
gin.external_configurable(UniMatch, module="kssl.methods")
gin.external_configurable(FixMatch, module="kssl.methods")
# `ClassMix.strong_augment = @StrongAugment()` with `StrongAugment.per_image = True`, ...
gin.external_configurable(StrongAugment, module="kssl.augment")
gin.external_configurable(RandAugmentCutout, module="kssl.augment")
gin.external_configurable(ColorJitterGrayscaleBlur, module="kssl.augment")


# -- configured pieces -------------------------------------------------------------------
@gin.configurable("dataset")
def dataset_setup(reader=gin.REQUIRED, train_split="train", eval_split="val"):
    """The reader and the split names for training and evaluation."""
    return reader, train_split, eval_split


@gin.configurable("unlabelled")
def unlabelled_source(reader=None, split="all"):
    """An optional separate unlabelled pool, e.g. `unlabelled.reader = @folder()` with
    `folder.images_dir = 'extra_images'`: then the whole training split is labelled
    unless `labels.*` chooses a subset, and these images are the unlabelled pool."""
    if reader is None:
        return None, None
    return reader, reader.examples(split)


@gin.configurable("labels")
def labelled_subset(examples, reader, count=None, fraction=None, split_file=None,
                    unlabelled_file=None, seed=0):
    """The labelled subset and the unlabelled pool of the training split."""
    return splits.labelled_split(examples, count=count, fraction=fraction, seed=seed,
                                 split_file=split_file, unlabelled_file=unlabelled_file,
                                 reader=reader)


@gin.configurable("pipeline")
def pipeline_settings(batch_size=8, unlabelled_batch_size=None, crop_size=(321, 321),
                      scale_range=(0.5, 2.0), flip=True, resize=None, cache=False, seed=0,
                      validate_data=True, unlabelled_views=1, unlabelled_padding=False):
    """The tf.data settings; `batch_size` is the global labelled batch.

    `unlabelled_views`: independently augmented views of each unlabelled image, in
    consecutive rows; `unlabelled_padding`: mark crop padding on unlabelled images
    (see `kssl.data.pipeline.augmented_stream`; UniMatch and FixMatch read both).
    """
    return dict(batch_size=batch_size, unlabelled_batch_size=unlabelled_batch_size,
                crop_size=tuple(crop_size), scale_range=tuple(scale_range), flip=flip,
                resize=None if resize is None else tuple(resize), cache=cache, seed=seed,
                validate_data=validate_data, unlabelled_views=unlabelled_views,
                unlabelled_padding=unlabelled_padding)


@gin.configurable("supervised_loss")
def supervised_loss_settings(class_weights=None):
    """The supervised loss of every method: `class_weights` is None (unweighted, as the
    papers train), 'median_frequency' (SegNet's CamVid protocol: computed from the
    labelled masks, see `kssl.data.class_balance`), or one weight per class."""
    return class_weights


@gin.configurable("pseudo_label_monitor")
def monitor_settings(images=16, every_steps=None):
    """The pseudo-label monitor of semi-supervised runs (`kssl.pseudo_label_monitor`):
    `images` unlabelled images spread over the pool (0 turns it off), scored every
    `every_steps` optimizer steps (default: train.steps_per_epoch) and at the end."""
    return images, every_steps


@gin.configurable("model")
def build_model(num_classes, arch="deeplabv3plus", backbone="resnet50", weights=None,
                norm="auto", output_stride=None, aspp_rates=None, aspp_channels=None,
                low_level_channels=None, decoder_channels=None, dropout=None,
                separable=None, psp_channels=None, mitrans=None, stride_on=None,
                stem_pool=None, preprocess=None, align_corners=False):
    """The segmentation network (see `kssl.models.build_segmenter` for each argument).

    `norm="auto"` is batch norm on one replica and synchronised batch norm on several, so
    multi-replica training matches single-device training; on several replicas the head's
    norm layers are synchronised too, whatever the backbone's norm.
    `stride_on`, `stem_pool`, `preprocess` (ResNet layout) follow `weights` when unset;
    `train` records the values used in the run's config.gin.
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if norm == "auto":
        norm = "sync_batch" if replicas > 1 else "batch"
    elif norm == "batch" and replicas > 1:
        logging.warning("model.norm = 'batch' on %d replicas: batch statistics and moving "
                        "averages will differ per replica; 'sync_batch' keeps them equal",
                        replicas)
    head_norm = "sync_batch" if replicas > 1 else None
    return models.build_segmenter(
        arch=arch, backbone=backbone, num_classes=num_classes, weights=weights, norm=norm,
        head_norm=head_norm, output_stride=output_stride, aspp_rates=aspp_rates,
        aspp_channels=aspp_channels, low_level_channels=low_level_channels,
        decoder_channels=decoder_channels, dropout=dropout, separable=separable,
        psp_channels=psp_channels, mitrans=mitrans, stride_on=stride_on,
        stem_pool=stem_pool, preprocess=preprocess, align_corners=align_corners)


def record_model_layout(path, segmenter) -> None:
    """Appends to the config file at `path` the ResNet layout `segmenter` was built with,
    where it was taken from the weights rather than configured.

    bin/evaluate, export and predict rebuild the network without its pretrained weights
    (`build_model(weights=None)`), which alone would give the default layout: a network
    trained from converted torchvision or DeepLab-v2 weights needs theirs. A later binding
    overrides an earlier one in gin, so the appended lines win.
    """
    from kssl.models.backbones.resnet import DEFAULT_LAYOUT

    lines = []
    for key, value in sorted(models.backbone_layout(segmenter).items()):
        try:
            configured = gin.query_parameter(f"model.{key}")
        except ValueError:  # not bound
            configured = None
        # The default needs no line: a rebuild without weights gets it anyway.
        if configured is None and value != DEFAULT_LAYOUT[key]:
            lines.append(f"model.{key} = {value!r}")
    if lines:
        with open(path, "a") as f:
            f.write("\n# The ResNet layout the weights (model.weights) need, as built:\n"
                    + "\n".join(lines) + "\n")


BATCH_SCALING_RULES = ("linear", "sqrt", "none")


def scaled_learning_rate(learning_rate: float, batch_size: Optional[int],
                         reference_batch_size: Optional[int], rule: str = "linear") -> float:
    """`learning_rate`, given for a global labelled batch of `reference_batch_size`, for a
    batch of `batch_size`: times batch / reference ("linear", the usual rule for SGD),
    times its square root ("sqrt", often used with Adam), or unchanged ("none", and
    whenever either size is None)."""
    if rule not in BATCH_SCALING_RULES:
        raise ValueError(f"optimizer.batch_scaling must be one of {BATCH_SCALING_RULES}, "
                         f"got {rule!r}")
    if reference_batch_size is not None and reference_batch_size <= 0:
        raise ValueError("optimizer.reference_batch_size must be a positive number of "
                         f"images, got {reference_batch_size!r}")
    if not batch_size or not reference_batch_size or rule == "none":
        return learning_rate
    ratio = batch_size / reference_batch_size
    return learning_rate * (ratio if rule == "linear" else math.sqrt(ratio))


@gin.configurable("optimizer")
def build_optimizer(total_steps, name="sgd", learning_rate=0.01, momentum=0.9,
                    weight_decay=1e-4, schedule="poly", power=0.9, end_learning_rate=0.0,
                    reference_batch_size=None, batch_scaling="linear", batch_size=None,
                    nesterov=False):
    """SGD (momentum; Nesterov momentum with `nesterov`, as ClassMix trains) or
    Adam/AdamW with a poly or constant schedule.

    The optimizers take per-variable learning-rate multipliers (`kssl.optimizers`), which a
    method sets (e.g. `ThreeStage.backbone_lr_multiplier`). Weight decay is decoupled
    (applied by the optimizer) and skips biases and norm layers.

    `reference_batch_size`: the global labelled batch `learning_rate` was tuned for (the
    paper configs give the paper's). When the run's `batch_size` (`pipeline.batch_size`,
    passed by `train`) differs, e.g. on fewer or smaller GPUs, the rate (and the poly
    schedule's end rate) follows `batch_scaling` (see `scaled_learning_rate`).
    """
    scaled = scaled_learning_rate(learning_rate, batch_size, reference_batch_size,
                                  batch_scaling)
    if scaled != learning_rate:
        print(f"kssl: learning rate {learning_rate:g} scaled to {scaled:g} for a global "
              f"batch of {batch_size} (tuned for {reference_batch_size}; "
              f"optimizer.batch_scaling = {batch_scaling!r})", flush=True)
        end_learning_rate *= scaled / learning_rate
        learning_rate = scaled
    if schedule == "poly":
        lr = keras.optimizers.schedules.PolynomialDecay(
            learning_rate, total_steps, end_learning_rate=end_learning_rate, power=power)
    elif schedule == "constant":
        lr = learning_rate
    else:
        raise ValueError(f"optimizer.schedule must be 'poly' or 'constant', got {schedule!r}")
    if nesterov and name != "sgd":
        raise ValueError(f"optimizer.nesterov is an SGD option; optimizer.name is {name!r}")
    if name == "sgd":
        opt = optimizers.SGD(lr, momentum=momentum, nesterov=nesterov,
                             weight_decay=weight_decay or None)
    elif name == "adam":
        opt = optimizers.Adam(lr)
    elif name == "adamw":
        opt = optimizers.AdamW(lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer.name must be 'sgd', 'adam' or 'adamw', got {name!r}")
    if weight_decay:
        opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return opt


@gin.configurable("evaluation")
def evaluation_settings(mode="whole", input_size=None, window=None, stride=None, flip=False):
    """How the final model is scored: see `kssl.evaluation.predict_logits`."""
    checks.check_evaluation(dict(mode=mode, input_size=input_size, window=window,
                                 stride=stride, flip=flip))
    return dict(mode=mode, input_size=None if input_size is None else tuple(input_size),
                window=None if window is None else tuple(window),
                stride=None if stride is None else tuple(stride), flip=flip)


STRATEGIES = ("auto", "mirrored", "one_device", "multi_worker", "tpu")
TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}')
# MultiWorkerMirroredStrategy configures the collective runtime once per process, and a
# TPU system is initialised once: later calls (e.g. each stage of a staged method) reuse it.
_PROCESS_STRATEGIES = {}


def read_tf_config() -> dict:
    """The cluster and this process's task from the TF_CONFIG environment variable.

    Checks what MultiWorkerMirroredStrategy needs (it would otherwise fail late or wait
    forever for a peer that was never configured) and raises ConfigError naming TF_CONFIG.
    """
    text = os.environ.get("TF_CONFIG", "").strip()
    expected = f"expected JSON like {TF_CONFIG_EXAMPLE}, with this process's task index"
    if not text:
        raise kssl_config.ConfigError(
            f"train.strategy = 'multi_worker' needs the TF_CONFIG environment variable: "
            f"{expected} (see the README, 'Distributed training')")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as error:
        raise kssl_config.ConfigError(f"TF_CONFIG is not valid JSON ({error}): {expected}")
    cluster = spec.get("cluster") if isinstance(spec, dict) else None
    task = spec.get("task") if isinstance(spec, dict) else None
    if not isinstance(cluster, dict) or not cluster or not isinstance(task, dict):
        raise kssl_config.ConfigError(
            f"TF_CONFIG needs a 'cluster' and a 'task' entry: {expected}; got {text}")
    for job, addresses in cluster.items():
        if job not in ("chief", "worker"):
            raise kssl_config.ConfigError(
                f"TF_CONFIG cluster job {job!r} is not used by multi-worker training (only "
                f"'chief' and 'worker'): {expected}")
        if (not isinstance(addresses, list) or not addresses
                or not all(_is_address(a) for a in addresses)):
            raise kssl_config.ConfigError(
                f"TF_CONFIG cluster.{job} must be a list of 'host:port' strings: {expected}; "
                f"got {addresses!r}")
    kind, index = task.get("type"), task.get("index")
    if kind not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise kssl_config.ConfigError(
            f"TF_CONFIG task {task!r} does not name a task of the cluster (type one of "
            f"{sorted(cluster)}, index from 0): {expected}")
    return spec


def _is_address(address) -> bool:
    host, _, port = str(address).rpartition(":")
    return isinstance(address, str) and bool(host) and port.isdigit()


def choose_strategy(name: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy for `train.strategy`.

    'auto': multi_worker when TF_CONFIG is set, else mirrored over every GPU when there
    are several, else the default (one device). 'mirrored': every local GPU (or the CPU).
    'one_device': the first GPU, or the CPU. 'multi_worker': MultiWorkerMirroredStrategy
    over the cluster in TF_CONFIG (every local GPU of every worker). 'tpu': TPUStrategy on
    the TPU that TPUClusterResolver finds (TPU_NAME, or 'local' on a TPU VM).

    multi_worker must be chosen before TensorFlow runs any operation in the process:
    `bin/train` does so; a script calls this first thing.
    """
    if name not in STRATEGIES:
        raise kssl_config.ConfigError(
            f"train.strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {name!r}")
    if name == "auto" and os.environ.get("TF_CONFIG", "").strip():
        name = "multi_worker"
    if name in _PROCESS_STRATEGIES:
        return _PROCESS_STRATEGIES[name]
    if name == "multi_worker":
        read_tf_config()
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as error:  # "Collective ops must be configured at program startup"
            raise kssl_config.ConfigError(
                f"train.strategy = 'multi_worker' must be set up before TensorFlow runs any "
                f"operation in the process ({error}): call "
                f"kssl.training.choose_strategy('multi_worker') at the start of the script")
        _fix_keras_multi_worker_logs()
        _PROCESS_STRATEGIES[name] = strategy
        return strategy
    if name == "tpu":
        _PROCESS_STRATEGIES[name] = _tpu_strategy()
        return _PROCESS_STRATEGIES[name]
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


def _fix_keras_multi_worker_logs() -> None:
    """Makes Keras's fit and evaluate work under MultiWorkerMirroredStrategy.

    Keras 3 (3.15 here) averages a step's logs over the workers with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on the scalar logs every step
    returns ("Invalid reduction dimension 0 for input with 0 dimensions"). This wraps its
    `reduce_per_replica` so that scalars are averaged over the replicas alone; other
    cases go to Keras unchanged. Applied once, when a multi-worker strategy is created.
    """
    try:
        from keras.src.backend.tensorflow import trainer as keras_tf_trainer
        keras_reduce = keras_tf_trainer.reduce_per_replica
    except (ImportError, AttributeError):  # another Keras layout: nothing to fix here
        return
    if getattr(keras_reduce, "kssl_fix", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not in_multi_worker_mode(strategy):
            return keras_reduce(values, strategy, reduction)

        def mean(value):
            local = value.values[0] if isinstance(value, tf.distribute.DistributedValues) \
                else value
            return strategy.reduce("MEAN", value, axis=0 if local.shape.rank else None)
        return tf.nest.map_structure(mean, values)

    reduce_per_replica.kssl_fix = True
    keras_tf_trainer.reduce_per_replica = reduce_per_replica


def _tpu_strategy() -> tf.distribute.Strategy:
    """TPUStrategy on the TPU named by TPU_NAME, else on this TPU VM's own chips."""
    tpu = os.environ.get("TPU_NAME") or "local"
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        if tpu != "local":  # a remote TPU (TPU node); a TPU VM's chips are local
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except (ValueError, tf.errors.OpError) as error:
        # TF's message goes on with the missing kernels; its first sentence says it all.
        first_line = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
        raise kssl_config.ConfigError(
            f"train.strategy = 'tpu' found no TPU (TPUClusterResolver(tpu={tpu!r}): "
            f"{first_line}); run on a Cloud TPU VM with TensorFlow's TPU build, or set "
            f"TPU_NAME to the TPU's name")


def in_multi_worker_mode(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` spans several processes (MultiWorkerMirroredStrategy over a
    cluster of more than one task)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    spec = strategy.cluster_resolver.cluster_spec().as_dict()
    return sum(len(spec.get(job, [])) for job in ("chief", "worker")) > 1


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's artefacts: TF's rule (the 'chief' task, or
    worker 0 when the cluster has no chief); always true outside multi-worker training."""
    return bool(strategy.extended.should_checkpoint)


def worker_scratch_dir(workdir: str, task_type: str, task_id: int) -> str:
    """Where a non-chief worker writes its copy of the run in `workdir`.

    TF's multi-worker rule: every worker runs every save (a save can read variables
    through collective ops), but only the chief's files are the run's; the others write
    to a temporary directory of their own and delete it at the end. It lies in the
    local temporary folder ($TMPDIR), named after the run and the task, so workers of one
    machine never share it, a restarted worker finds its own, and nothing is written next
    to the chief's files on a shared filesystem.
    """
    key = hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"kssl-{key}-{task_type}{task_id}")


def chief_values(strategy: tf.distribute.Strategy, values) -> list:
    """The chief's `values` (numbers, tensors or variables) on every worker.

    Outside multi-worker training: `values` as they are. Every worker must call this at
    the same point (it is a collective operation).
    """
    if not in_multi_worker_mode(strategy):
        return list(values)
    chief = is_chief(strategy)
    dtypes = [tf.convert_to_tensor(v).dtype for v in values]

    @tf.function
    def broadcast():
        def replica_fn():
            context = tf.distribute.get_replica_context()
            # The source is the first replica that lives on the chief; every other
            # replica adds zeros, so the sum is the chief's value exactly.
            flags = context.all_gather(tf.constant([1 if chief else 0], tf.int32), axis=0)
            source = tf.argmax(flags, output_type=tf.int32)
            mine = tf.equal(tf.cast(context.replica_id_in_sync_group, tf.int32), source)
            shares = []
            for value, dtype in zip(values, dtypes):
                x = tf.convert_to_tensor(value)
                x = tf.cast(x, tf.int32) if dtype == tf.bool else x
                shares.append(tf.where(mine, x, tf.zeros_like(x)))
            # One all-reduce per dtype: an all-reduce packs its tensors together.
            summed = [None] * len(shares)
            for dtype in sorted({share.dtype for share in shares}, key=lambda d: d.name):
                group = [i for i, share in enumerate(shares) if share.dtype == dtype]
                results = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                             [shares[i] for i in group])
                for i, result in zip(group, results):
                    summed[i] = result
            return summed
        return strategy.run(replica_fn)

    results = broadcast()
    return [tf.cast(strategy.experimental_local_results(r)[0], dtype)
            for r, dtype in zip(results, dtypes)]


def distribute_training_data(strategy: tf.distribute.Strategy,
                             dataset: tf.data.Dataset):
    """The training stream (global batches) as `strategy` should read it in `fit`.

    Multi-worker: every worker builds the same global stream (same seeds) and its
    replicas keep their own consecutive rows of each global batch, replica r rows
    [r * b, (r + 1) * b), as one process splits it over its devices. So the workers
    train together on exactly the batches a single process would (and the per-example
    randomness of `kssl.augment.seeds` stays keyed to the same global index). TF's
    automatic sharding would instead rebuild the pipeline from its graph, which loses
    the seeded reshuffle of each pass and gives each worker a different order.
    TPU: the string example ids are dropped (a TPU cannot take strings). Otherwise the
    dataset unchanged (Keras splits each batch over local replicas).
    """
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return dataset.map(_without_ids)
    if not in_multi_worker_mode(strategy):
        return dataset

    def per_worker(context: tf.distribute.InputContext):
        replicas = context.num_replicas_in_sync
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local

        def this_workers_rows(*element):
            def split(tensor):
                total = tensor.shape[0]  # static with drop_remainder batching
                rows = tf.shape(tensor)[0] // replicas if total is None else total // replicas
                mine = tf.reshape(tensor[first * rows:(first + local) * rows],
                                  tf.concat([[local, rows], tf.shape(tensor)[1:]], 0))
                mine.set_shape([local, None if total is None else rows]
                               + tensor.shape[1:].as_list())
                return mine
            element = element[0] if len(element) == 1 else element
            return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(split, element))

        return dataset.flat_map(this_workers_rows)

    return strategy.distribute_datasets_from_function(per_worker)


def _without_ids(*element):
    def strip(part):
        return {k: v for k, v in part.items() if k != "id"} if isinstance(part, dict) else part
    element = element[0] if len(element) == 1 else element
    return (tuple(strip(part) for part in element) if isinstance(element, tuple)
            else strip(element))


# -- callbacks ---------------------------------------------------------------------------
class ThroughputMeter(keras.callbacks.Callback):
    """Measures training images per second, leaving out the first (tracing) step."""

    def __init__(self, images_per_step: int):
        super().__init__()
        self.images_per_step = images_per_step
        self.start = None
        self.steps = 0
        self.seconds = 0.0

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        else:
            self.steps += 1
            self.seconds = now - self.start

    @property
    def images_per_second(self) -> Optional[float]:
        return self.steps * self.images_per_step / self.seconds if self.seconds else None


class PeriodicEvaluation(keras.callbacks.Callback):
    """Scores the inference network on the eval split every `every` epochs and adds
    `val_mean_iou` to the epoch logs (so TensorBoard and the progress line show it)."""

    def __init__(self, every: int, score):
        super().__init__()
        self.every = every
        self.score = score

    def on_epoch_end(self, epoch, logs=None):
        if self.every and (epoch + 1) % self.every == 0 and logs is not None:
            logs["val_mean_iou"] = self.score(progress=False)["mean_iou"]


class WorkerBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` (kept after training) that also follows TensorFlow's
    multi-worker rules.

    Every worker writes its backup at the end of each epoch into its own run directory:
    the chief into the run's `backup/`, the others into their scratch directory (see
    `worker_scratch_dir`). On a restart only the chief restores its backup; every other
    worker then takes the chief's weights, optimizer state and epoch through a broadcast.
    So all workers resume from the same step whether their own backups are on a shared
    filesystem, on local disks, missing (a worker moved to a new machine) or one epoch
    behind (a worker killed while saving).

    Backups are written atomically and the previous one is kept (see `kssl.run_files`):
    a damaged backup falls back to the one before it.
    """

    def __init__(self, backup_dir: str, strategy: tf.distribute.Strategy):
        super().__init__(backup_dir, delete_checkpoint=False)
        self.strategy = strategy

    def on_train_begin(self, logs=None):
        if is_chief(self.strategy):
            self._restore()
        if not in_multi_worker_mode(self.strategy):
            return
        epoch, = chief_values(self.strategy, [self.model._initial_epoch or 0])
        if int(epoch):  # a fresh run starts equal: variables are created from the chief's
            state = {id(v): v for v in self.model.weights + self.model.optimizer.variables
                     if v.synchronization != "on_read"}
            variables = list(state.values())
            for variable, value in zip(variables, chief_values(self.strategy, variables)):
                variable.assign(value)
            self.model._initial_epoch = int(epoch)

    def _restore(self):
        """Loads the newest backup that loads; none: a new run, starting at epoch 0."""
        backups = run_files.usable_backups(self.backup_dir, report=True)
        if backups and self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)  # so it is restored
        failures = []
        for weights, epoch in backups:
            try:
                self.model.load_weights(weights)
            except (OSError, ValueError, KeyError) as error:
                failures.append(f"{weights}: {str(error).splitlines()[0]}")
                continue
            if failures:
                print(f"kssl: resuming from the previous backup (epoch {epoch}): "
                      f"{failures[0]}", flush=True)
            self.model._initial_epoch = epoch
            return
        if failures:
            raise kssl_config.ConfigError(
                f"cannot restore the resume backup into this run's network ({failures[0]}):"
                " rerun with the configuration the run started with, or pass --overwrite "
                "to start afresh")

    def _save_model(self):
        # Replaces Keras's in-place save, which a kill leaves half-written.
        run_files.save_backup(self.model, self.backup_dir, self._current_epoch,
                              self._last_batch_seen)


# -- the driver --------------------------------------------------------------------------
def prepare_data(reader, train_split, uses_unlabelled: bool, settings):
    """Lists, splits and validates the training data; fails before any training.

    Returns (labelled, unlabelled or None, the reader of a separate unlabelled pool or None).
    """
    examples = reader.examples(train_split)
    labelled, unlabelled = labelled_subset(examples, reader)
    num_classes = reader.info.num_classes
    extra_reader, extra = unlabelled_source()
    if extra is not None:
        unlabelled = extra
    if len(labelled) == 0:
        raise reader_base.DataError(f"the labelled set of split {train_split!r} is empty")
    if uses_unlabelled and (unlabelled is None or len(unlabelled) == 0):
        raise reader_base.DataError(
            f"the unlabelled pool of split {train_split!r} is empty: choose a labelled "
            "subset (labels.count/fraction/split_file) or an unlabelled list")
    if settings["validate_data"]:
        validate.validate(reader, labelled, with_masks=True, num_classes=num_classes,
                          what="labelled")
        if uses_unlabelled:
            validate.validate(extra_reader or reader, unlabelled, with_masks=False,
                              num_classes=num_classes, what="unlabelled")
    return labelled, (unlabelled if uses_unlabelled else None), extra_reader


def scorer(network, reader, examples, settings):
    """A function that evaluates `network` on `examples` with the configured mode."""

    def score(progress=True):
        ds = pipeline.eval_dataset(reader, examples)
        return evaluation.evaluate(network, ds, reader.info.num_classes,
                                   class_names=list(reader.info.class_names),
                                   progress=progress, **settings)
    return score


BACKUP_DIR = "backup"
PSEUDO_MASK_DIR = "pseudo_masks"


def stage_dir(workdir: str, stage: int) -> str:
    """Where stage `stage` of a staged method runs (`workdir/stage_N`)."""
    return os.path.join(workdir, f"stage_{stage}")


def completed_epochs(workdir: str) -> int:
    """Epochs an interrupted run in `workdir` finished (0 for a new run): those of its
    newest complete backup (see `run_files.usable_backups`, which fails, saying how to
    recover, when backups exist but none is usable)."""
    backups = run_files.usable_backups(os.path.join(workdir, BACKUP_DIR))
    return backups[0][1] if backups else 0


def remove_run(workdir: str) -> None:
    """Deletes an earlier run, refusing, with the culprits named, a folder that holds
    anything kssl did not write (see `run_files.foreign_files`)."""
    if not os.path.isdir(workdir):
        return
    foreign = run_files.foreign_files(workdir)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise kssl_config.ConfigError(
            f"--overwrite refuses to clear {workdir}: it holds files kssl did not write "
            f"({', '.join(foreign[:5])}{more}); move them away first")
    shutil.rmtree(workdir)


def check_no_foreign_metrics(workdir: str) -> None:
    """Refuses to train into `workdir` when it holds a metrics.json that is not a finished
    run's: training would overwrite it at the end."""
    path = os.path.join(workdir, "metrics.json")
    if os.path.exists(path) and not run_files.finished_run(workdir):
        raise kssl_config.ConfigError(
            f"{path} exists, but {workdir} holds no finished kssl run (no config.gin and "
            "model.weights.h5 beside it): move the file away or choose another --workdir")


def method_pool(method, stage, labelled: Examples, unlabelled: Optional[Examples],
                unlabelled_reader):
    """(the pool of the second sub-batch or None, the method factory) for one run.

    A staged method in a stage that reads a second sub-batch draws it from all training
    images (each with its stored pseudo-mask; the labelled sub-batch carries its
    pseudo-mask too); otherwise the pool is the unlabelled one.
    """
    if stage is None:
        return unlabelled, method
    if unlabelled_reader is not None:
        raise kssl_config.ConfigError(
            f"{method.__name__} labels and trains on all training images of one reader; "
            "a separate unlabelled.reader is not supported")
    pool = concat_examples(labelled, unlabelled) if method.uses_unlabelled_in(stage) else None
    return pool, functools.partial(method, stage=stage)


def training_stream(reader, labelled: Examples, pool: Optional[Examples], unlabelled_reader,
                    settings: dict, seed: int, attach=None,
                    jit_compile: bool = False) -> tf.data.Dataset:
    """The global training stream of one run: labelled batches, zipped with batches of
    `pool` when it is given, augmented as `settings` (pipeline.*) say."""
    stream_args = {k: settings[k] for k in
                   ("crop_size", "scale_range", "flip", "resize", "cache")}
    if attach is not None:
        stream_args["attach"] = attach
    train_ds = pipeline.train_dataset(
        reader, labelled, pool, batch_size=settings["batch_size"],
        unlabelled_batch_size=settings["unlabelled_batch_size"], seed=seed,
        unlabelled_reader=unlabelled_reader,
        unlabelled_views=settings.get("unlabelled_views", 1),
        unlabelled_padding=settings.get("unlabelled_padding", False), **stream_args)
    if jit_compile:  # XLA takes no string arguments; the train steps read no ids
        train_ds = train_ds.map(_without_ids)
    return train_ds


@gin.configurable("train", denylist=["stage", "pseudo_masks"])
def train(workdir, method=Supervised, steps=1000, steps_per_epoch=100, strategy="auto",
          mixed_precision=None, jit_compile=False, seed=0, eval_every_epochs=0,
          overwrite=False, verbose=None, start_stage=None, stage=None, pseudo_masks=None):
    """Trains a method as configured and writes the run's artefacts into `workdir`.

    Writes `config.gin` (operative config), `backup/` (resume state, restored
    automatically after a crash), `logs/` (TensorBoard), `model.weights.h5` (the
    inference network) and `metrics.json`. Returns the metrics dict.

    A staged method (one with `stages > 1`, e.g. `@ThreeStage`) runs each stage as its own
    training run in `workdir/stage_N/` (see `train_stages`).

    Args:
      method: the method class (`@Supervised`, ...).
      steps: total optimizer steps, a multiple of `steps_per_epoch` (per stage for a
        staged method; `stage_1/train.steps = ...` sets one stage's).
      steps_per_epoch: steps between resume checkpoints and progress summaries.
      strategy: 'auto', 'mirrored', 'one_device', 'multi_worker' (the cluster in the
        TF_CONFIG environment variable) or 'tpu' (see `choose_strategy`). In
        multi-worker training only the chief writes `workdir`; every other worker writes
        a scratch copy it deletes at the end, and resumes from the chief's backup.
      mixed_precision: None, 'mixed_float16' or 'mixed_bfloat16' (Keras's global dtype
        policy; under 'mixed_float16' `compile` wraps the optimizer in a
        LossScaleOptimizer). Slower on CPUs, which lack native half precision.
      jit_compile: compile the train step with XLA (`model.compile(jit_compile=...)`).
        Off by default: it is several times slower on CPUs, and Keras's "auto" would turn
        it on by itself on a GPU.
      seed: seeds Python, numpy and TensorFlow (weights init, shuffling, augmentation).
      eval_every_epochs: score the eval split every N epochs during training (0: only
        at the end).
      overwrite: start afresh even if `workdir` holds a finished or interrupted run.
      verbose: Keras progress mode (1 bar, 2 a line per epoch); default 1 on a terminal.
      start_stage: staged methods: start at this stage from the stored pseudo-masks of the
        stage before (`workdir/stage_{N-1}/pseudo_masks`); default: resume where the run
        stopped.
      stage, pseudo_masks: set by `train_stages` for one stage (not configurable).
    """
    # First: MultiWorkerMirroredStrategy must exist before TensorFlow runs any operation.
    dist = choose_strategy(strategy)
    if stage is None:  # every configured value, every stage's included, before any data
        checks.check_run(workdir, getattr(method, "stages", 1))
    chief_workdir = None
    if stage is None and not is_chief(dist):
        # Only the chief's files are the run's: this worker runs the same code (saves
        # included) on a scratch copy that is deleted at the end (see worker_scratch_dir).
        chief_workdir, workdir = workdir, worker_scratch_dir(
            workdir, dist.cluster_resolver.task_type, dist.cluster_resolver.task_id)
    if getattr(method, "stages", 1) > 1 and stage is None:
        return _worker_done(chief_workdir, workdir, train_stages(
            workdir, method, overwrite=overwrite, start_stage=start_stage,
            chief_workdir=chief_workdir))
    metrics_path = os.path.join(workdir, "metrics.json")
    if steps % steps_per_epoch:
        raise kssl_config.ConfigError(
            f"train.steps ({steps}) must be a multiple of train.steps_per_epoch "
            f"({steps_per_epoch})")
    if overwrite:
        remove_run(workdir)
    # Every worker follows the chief's run: whether it has finished and how far it got
    # (the chief's values replace the others', so only the chief reads its backup).
    chief = is_chief(dist)
    if chief:
        check_no_foreign_metrics(workdir)
    finished, done_epochs = (int(value) for value in chief_values(
        dist, [run_files.finished_run(workdir), completed_epochs(workdir) if chief else 0]))
    if finished:
        logging.info("%s already holds a finished run; pass --overwrite to train again",
                     workdir)
        result = {}
        if os.path.exists(metrics_path):  # a non-chief worker's scratch copy may not
            with open(metrics_path) as f:
                result = json.load(f)
        return _worker_done(chief_workdir, workdir, result)
    os.makedirs(workdir, exist_ok=True)
    keras.utils.set_random_seed(seed)
    if mixed_precision:
        keras.mixed_precision.set_global_policy(mixed_precision)

    reader, train_split, eval_split = dataset_setup()
    settings = pipeline_settings()
    # Every stage of a staged method checks the whole pool: it is labelled by
    # pseudo-masks at the end of a stage even when the stage trains on labels alone.
    needs_pool = method.uses_unlabelled if stage is None else True
    labelled, unlabelled, unlabelled_reader = prepare_data(reader, train_split, needs_pool,
                                                           settings)
    num_classes = reader.info.num_classes
    stage_text = "" if stage is None else f" stage {stage} of {method.stages}"
    print(f"kssl: {reader.info.name} {train_split}: {len(labelled)} labelled, "
          f"{0 if unlabelled is None else len(unlabelled)} unlabelled images; "
          f"{num_classes} classes; method {method.__name__}{stage_text}", flush=True)
    training_pool, method_factory = method_pool(method, stage, labelled, unlabelled,
                                                unlabelled_reader)
    try:
        class_weights = class_balance.resolve_class_weights(
            supervised_loss_settings(), reader, labelled, num_classes)
    except ValueError as error:
        raise kssl_config.ConfigError(str(error)) from None
    # The labelled masks' class distribution: the target of distribution alignment and
    # the reference of the pseudo-label monitor.
    class_prior = None
    if training_pool is not None:
        class_prior = pseudo_label_monitor.labelled_prior(
            class_balance.class_pixel_counts(reader, labelled, num_classes)[0])
    if class_weights is not None:
        print("kssl: supervised loss class weights: " + class_balance.format_weights(
            class_weights, reader.info.class_names), flush=True)
    if training_pool is not None and pseudo_masks is not None:
        pseudo_masks.check_matches(num_classes, settings["resize"])
        pseudo_masks.check_covers(training_pool, "training")

    eval_examples = reader.examples(eval_split)
    if settings["validate_data"]:
        validate.validate(reader, eval_examples, with_masks=True, num_classes=num_classes,
                          what="evaluation")
    for key in ("batch_size", "unlabelled_batch_size"):
        if settings[key] and settings[key] % dist.num_replicas_in_sync:
            raise kssl_config.ConfigError(
                f"pipeline.{key} ({settings[key]}) must be a multiple of the number of "
                f"replicas ({dist.num_replicas_in_sync})")
    # A resumed run draws a fresh shuffle and fresh augmentations rather than replaying the
    # batches its first part already trained on.
    data_seed = settings["seed"] + 7919 * done_epochs

    train_ds = training_stream(
        reader, labelled, training_pool, unlabelled_reader, settings, data_seed,
        attach=None if pseudo_masks is None else pseudo_masks.attach, jit_compile=jit_compile)
    train_ds = distribute_training_data(dist, train_ds)

    with dist.scope():
        segmenter = build_model(num_classes)
        try:
            model = method_factory(segmenter, num_classes=num_classes,
                                   class_weights=class_weights, class_prior=class_prior)
        except ValueError as error:  # the method's check of its own options
            raise kssl_config.ConfigError(
                f"{method.__name__}: {kssl_config.without_gin_context(error)}") from None
        model.compile(optimizer=build_optimizer(steps, batch_size=settings["batch_size"]),
                      jit_compile=jit_compile)
    eval_settings = evaluation_settings()
    # Saved once every configurable has been called, so the file rebuilds the whole run
    # (bin/evaluate, bin/export and bin/predict read it).
    kssl_config.save_operative_config(os.path.join(workdir, "config.gin"))
    record_model_layout(os.path.join(workdir, "config.gin"), segmenter)

    images_per_step = settings["batch_size"] + (
        0 if training_pool is None
        else settings["unlabelled_batch_size"] or settings["batch_size"])
    meter = ThroughputMeter(images_per_step)
    score = scorer(model.inference_network, reader, eval_examples, eval_settings)
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    callbacks = [
        WorkerBackupAndRestore(os.path.join(workdir, BACKUP_DIR), dist),
        meter,
        PeriodicEvaluation(eval_every_epochs, score),
        keras.callbacks.TensorBoard(os.path.join(workdir, "logs"), update_freq="epoch"),
    ]
    monitor = build_monitor(model, reader, train_split, labelled, unlabelled,
                            unlabelled_reader, settings, steps_per_epoch, workdir,
                            class_prior)
    if monitor is not None:
        callbacks.append(monitor)
    writer = None
    if stage is not None and stage < method.stages:
        pools = [("labelled", labelled),
                 ("unlabelled", with_ground_truth(unlabelled, reader, train_split,
                                                  settings["validate_data"]))]
        writer = PseudoMaskWriter(os.path.join(workdir, PSEUDO_MASK_DIR), reader, pools,
                                  num_classes, resize=settings["resize"],
                                  progress=verbose == 1)
        callbacks.append(writer)
    epochs = steps // steps_per_epoch
    model.fit(train_ds, epochs=epochs, steps_per_epoch=steps_per_epoch,
              callbacks=callbacks, verbose=verbose, shuffle=False)

    run_files.save_weights(model.inference_network, os.path.join(workdir, "model.weights.h5"))
    print(f"kssl: evaluating on {eval_split}{stage_text}", flush=True)
    result = score(progress=verbose == 1)
    print(evaluation.format_iou_table(result, list(reader.info.class_names)), flush=True)
    result.update(
        train_images_per_second=meter.images_per_second,
        train_seconds=meter.seconds,
        timed_steps=meter.steps,  # the steps train_seconds covers (this process's, less one)
        steps=int(model.optimizer.iterations.numpy()),
        method=method.__name__,
        labelled_images=len(labelled),
        unlabelled_images=0 if unlabelled is None else len(unlabelled),
        eval_split=eval_split,
        seed=seed,
    )
    if stage is not None:
        result["stage"] = stage
    if writer is not None:
        result["pseudo_masks"] = writer.report
    if monitor is not None and monitor.history:
        result["pseudo_label_monitor"] = monitor.history
    write_json(metrics_path, result)
    # The workers leave together: a worker that exits while another still runs is
    # reported by the other as crashed.
    chief_values(dist, [0])
    return _worker_done(chief_workdir, workdir, result)


def _worker_done(chief_workdir, workdir, result):
    """Deletes a non-chief worker's scratch copy (`workdir`) once its run is over."""
    if chief_workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def write_json(path: str, values: dict) -> None:
    """Writes strict JSON atomically: a run is finished when its metrics.json exists, so
    the file must never be seen half-written."""
    run_files.write_text(path, json.dumps(_jsonable(values), indent=2))


def concat_examples(first: Examples, second: Optional[Examples]) -> Examples:
    """Both pools as one unlabelled list (masks dropped)."""
    if second is None or len(second) == 0:
        return first.without_masks()
    return Examples(first.ids + second.ids, first.images + second.images, None,
                    f"{first.source} + {second.source}")


def build_monitor(model, reader, train_split, labelled, unlabelled, unlabelled_reader,
                  settings, steps_per_epoch, workdir, prior):
    """The pseudo-label monitor of a method that trains on pseudo-labels, or None (a
    supervised run, no unlabelled pool, or `pseudo_label_monitor.images = 0`)."""
    count, every_steps = monitor_settings()
    if not count or prior is None or unlabelled is None or len(unlabelled) == 0 or (
            type(model).pseudo_label_targets is SegmentationMethod.pseudo_label_targets):
        return None
    size = settings["resize"]
    if unlabelled_reader is None:
        pool = with_ground_truth(unlabelled, reader, train_split, settings["validate_data"])
    else:
        pool = unlabelled
    images, truth = pseudo_label_monitor.load_subset(
        unlabelled_reader or reader, pool, count, size, with_masks=pool.has_masks)
    partners, _ = pseudo_label_monitor.load_subset(reader, labelled, len(images),
                                                   images.shape[1:3])
    partners = np.resize(partners, images.shape)  # cycled when fewer labelled images
    return pseudo_label_monitor.PseudoLabelMonitor(
        images, truth, partners, prior, reader.info.class_names,
        every_steps or steps_per_epoch, directory=workdir)


def with_ground_truth(pool: Examples, reader, train_split, check: bool) -> Examples:
    """`pool` with its masks from the split when the split has one for every example (an
    unlabelled pool of a fully annotated dataset, e.g. CamVid), so the pseudo-masks made
    for it can be scored; otherwise `pool` as it is. The masks are validated first, so
    a bad one fails now rather than when the pseudo-masks are written."""
    split = reader.examples(train_split)
    known = set(split.ids)
    if not split.has_masks or not all(i in known for i in pool.ids):
        return pool
    scored = split.select(list(pool.ids))
    if check:
        validate.validate(reader, scored, with_masks=True, num_classes=reader.info.num_classes,
                          what="unlabelled (ground truth to score pseudo-masks)")
    return scored


class PseudoMaskWriter(keras.callbacks.Callback):
    """At the end of training, stores the model's `pseudo_mask_network` argmax on every
    training image (see `kssl.data.pseudo_masks`) and reports their quality against the
    ground truth where it exists. A set that is already complete is kept."""

    def __init__(self, directory, reader, pools, num_classes, resize=None, progress=True):
        super().__init__()
        self.store = PseudoMaskStore(directory)
        self.reader = reader
        self.pools = pools
        self.num_classes = num_classes
        self.resize = resize
        self.progress = progress
        self.report = None

    def on_train_end(self, logs=None):
        if self.store.complete:
            self.report = self.store.index.get("scores")
            return
        total = sum(len(examples) for _, examples in self.pools)
        print(f"kssl: writing {total} pseudo-masks to {self.store.directory}", flush=True)
        self.report = write_pseudo_masks(
            self.store.directory, self.model.pseudo_mask_network, self.reader, self.pools,
            self.num_classes, resize=self.resize, progress=self.progress,
            confidence_threshold=self.model.pseudo_mask_threshold)
        scores = ", ".join(f"{name[:-len('_mean_iou')]} {100 * value:.1f}%"
                           for name, value in self.report.items() if name.endswith("mean_iou"))
        print(f"kssl: pseudo-mask mean IoU against the ground truth: {scores or 'no labels'}",
              flush=True)
        # Per class, where the unlabelled pool's pseudo-labels go: the pool self-training
        # learns from, and where confirmation bias would show first.
        confusion = self.report.get("unlabelled_confusion_matrix")
        if confusion is not None:
            names = list(self.reader.info.class_names)
            print("kssl: pseudo-masks of the unlabelled pool against their ground truth:")
            print(evaluation.format_iou_table(
                evaluation.report_from_confusion(confusion, names), names), flush=True)


def train_stages(workdir, method, overwrite=False, start_stage=None,
                 chief_workdir=None) -> dict:
    """Runs the stages of a staged method in turn, each a `train` run in its own gin scope
    (`stage_N/...` bindings apply to stage N only) and directory `workdir/stage_N/`.

    Stage N (after the first) trains on the pseudo-masks stage N-1 stored. A finished stage
    (metrics.json written, so its pseudo-masks are complete) is not run again; an
    interrupted one resumes from its last checkpoint. `start_stage` N skips the stages
    before N (their pseudo-masks must be stored); with `overwrite`, only stages N.. are
    discarded and retrained. Writes `workdir/metrics.json` (the
    final stage's metrics plus a per-stage summary), `model.weights.h5` and `config.gin`, so
    bin/evaluate, bin/export and bin/predict read `workdir` like any run.

    `chief_workdir`: set on a non-chief worker of multi-worker training, whose `workdir`
    is its scratch copy; it then reads the chief's pseudo-masks where it has no complete
    set of its own (a shared filesystem), and writes no run-level files.
    """
    stages = method.stages
    first = 1
    if start_stage is not None:
        if not 1 <= int(start_stage) <= stages:
            raise kssl_config.ConfigError(
                f"train.start_stage must be in 1..{stages}, got {start_stage!r}")
        first = int(start_stage)
    if overwrite and first == 1:
        remove_run(workdir)
    elif overwrite:  # redo stages first.. and keep the pseudo-masks they start from
        for stage in range(first, stages + 1):
            remove_run(stage_dir(workdir, stage))
        for name in ("metrics.json", "model.weights.h5", "config.gin"):
            if os.path.exists(os.path.join(workdir, name)):
                os.remove(os.path.join(workdir, name))
    if chief_workdir is None:
        check_no_foreign_metrics(workdir)
    if first > 1:
        store = stored_masks(workdir, first - 1, chief_workdir)
        if not store.complete:
            raise kssl_config.ConfigError(
                f"--start_stage {first} needs the pseudo-masks of stage {first - 1} in "
                f"{store.directory}, which are missing or incomplete")
    os.makedirs(workdir, exist_ok=True)
    result = None
    for stage in range(first, stages + 1):
        previous = stored_masks(workdir, stage - 1, chief_workdir) if stage > 1 else None
        where = stage_dir(workdir, stage)
        if run_files.finished_run(where):
            print(f"kssl: {method.__name__} stage {stage} of {stages} already finished in "
                  f"{where} (--overwrite --start_stage {stage} retrains it)", flush=True)
        else:
            print(f"kssl: {method.__name__} stage {stage} of {stages} in {where}", flush=True)
        with gin.config_scope(f"stage_{stage}"):
            result = train(where, stage=stage, pseudo_masks=previous, overwrite=False)
    if chief_workdir is not None:
        return result
    # Every stage that has run in this directory, also those before --start_stage.
    summary = {}
    for stage in range(1, stages + 1):
        path = os.path.join(stage_dir(workdir, stage), "metrics.json")
        if os.path.exists(path):
            with open(path) as f:
                metrics = json.load(f)
            summary[str(stage)] = {k: metrics.get(k) for k in
                                   ("mean_iou", "steps", "timed_steps",
                                    "train_images_per_second", "train_seconds",
                                    "pseudo_masks")}
    final = stage_dir(workdir, stages)
    run_files.copy_file(os.path.join(final, "model.weights.h5"),
                        os.path.join(workdir, "model.weights.h5"))
    run_files.copy_file(os.path.join(final, "config.gin"), os.path.join(workdir, "config.gin"))
    result = {**result, "stages": summary,
              "train_seconds": sum(s["train_seconds"] or 0.0 for s in summary.values())}
    result.pop("stage", None)
    result.pop("pseudo_masks", None)
    write_json(os.path.join(workdir, "metrics.json"), result)
    print(f"kssl: {method.__name__} by stage, the networks and their pseudo-masks "
          f"(scored against the ground truth):\n"
          + format_stage_table(summary, result.get("eval_split")), flush=True)
    return result


def format_stage_table(summary: dict, eval_split) -> str:
    """The closing table of a staged run: per stage (`summary` as in its metrics.json),
    the network's mean IoU on `eval_split`, and that of the pseudo-masks it stored
    against the ground truth of the labelled and the unlabelled pool ('-': none stored,
    or no ground truth)."""
    def percent(value):
        return "-" if value is None else f"{100 * value:.1f}"

    columns = (f"{eval_split} mIoU %", "pseudo-masks mIoU %: labelled", "unlabelled")
    lines = [f"{'stage':<6}" + "".join(f"{c:>{len(c) + 3}}" for c in columns)]
    lines.append("-" * len(lines[0]))
    for stage in sorted(summary, key=int):
        masks = summary[stage].get("pseudo_masks") or {}
        values = (summary[stage].get("mean_iou"), masks.get("labelled_mean_iou"),
                  masks.get("unlabelled_mean_iou"))
        lines.append(f"{stage:<6}" + "".join(f"{percent(v):>{len(c) + 3}}"
                                             for c, v in zip(columns, values)))
    return "\n".join(lines)


def stored_masks(workdir: str, stage: int, chief_workdir=None) -> PseudoMaskStore:
    """The pseudo-masks stage `stage` of the run in `workdir` stored; for a non-chief
    worker (`chief_workdir` set) without a complete set of its own (e.g. restarted on
    another machine), the chief's when they are readable and complete."""
    store = PseudoMaskStore(os.path.join(stage_dir(workdir, stage), PSEUDO_MASK_DIR))
    if not store.complete and chief_workdir is not None:
        chiefs = PseudoMaskStore(os.path.join(stage_dir(chief_workdir, stage), PSEUDO_MASK_DIR))
        if chiefs.complete:
            return chiefs
    return store


def _jsonable(value):
    """Converts numpy scalars and NaN (-> null) so metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
