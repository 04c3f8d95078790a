"""The configured building blocks of a run and its data set-up.

Every tool that rebuilds a run from its config (bin/train, evaluate, export, predict,
compare, benchmark) imports this module: importing it registers the gin vocabulary, and
its configurables build the pieces by these names (see `configs/*.gin` and the README's
configuration reference):

  dataset.*               which reader (`@camvid()`, `@voc()`, ...), the train and eval splits
  unlabelled.*            an optional separate unlabelled pool
  labels.*                the labelled subset: count, fraction, or split file
  pipeline.*              batch sizes, crop, scale range, flip, resize, cache
  supervised_loss.*       class weights of the supervised loss
  pseudo_label_monitor.*  the monitor's images and how often it scores them
  model.*                 architecture, backbone, pretrained weights, output stride, norm layer
  evaluation.*            whole-image or sliding-window scoring, reduced input size, flip

`optimizer.*` is `kssl.optimizers.build_optimizer`; `train.*` is `kssl.training.train`.
"""

from __future__ import annotations

import functools
from typing import Optional

import gin
import tensorflow as tf
from absl import logging

from kssl import checks
from kssl import config as kssl_config
from kssl import evaluation, models
from kssl.augment.randaugment import RandAugmentCutout
from kssl.augment.strong import ColorJitterGrayscaleBlur, StrongAugment
from kssl.data import pipeline, splits, validate
from kssl.data.examples import Examples
from kssl.data.readers import base as reader_base
from kssl.data.readers.camvid import CamVid
from kssl.data.readers.cityscapes import Cityscapes
from kssl.data.readers.folder import Folder
from kssl.data.readers.shapes import Shapes
from kssl.data.readers.tfds_reader import Tfds
from kssl.data.readers.voc import VOC
from kssl.distribution import without_ids
from kssl.methods import (ClassMix, FixMatch, GuidedMix, GuidedMixReleased, MKD, Supervised,
                          ThreeStage, UniMatch)
from kssl.optimizers import build_optimizer

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


@gin.configurable("evaluation")
def evaluation_settings(mode="whole", input_size=None, window=None, stride=None, flip=False):
    """How the final model is scored: see `kssl.evaluation.predict_logits`."""
    checks.check_evaluation(dict(mode=mode, input_size=input_size, window=window,
                                 stride=stride, flip=flip))
    return dict(mode=mode, input_size=None if input_size is None else tuple(input_size),
                window=None if window is None else tuple(window),
                stride=None if stride is None else tuple(stride), flip=flip)


# -- data set-up ---------------------------------------------------------------------
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
        train_ds = train_ds.map(without_ids)
    return train_ds


def concat_examples(first: Examples, second: Optional[Examples]) -> Examples:
    """Both pools as one unlabelled list (masks dropped)."""
    if second is None or len(second) == 0:
        return first.without_masks()
    return Examples(first.ids + second.ids, first.images + second.images, None,
                    f"{first.source} + {second.source}")


# -- checks of a whole run -------------------------------------------------------------
def check_dataset():
    """`dataset.*`: builds the reader (its own argument checks) and lists both splits,
    so an unknown split fails now. Returns the reader."""
    try:
        reader, train_split, eval_split = dataset_setup()
    except reader_base.DataError as error:  # e.g. a missing dataset folder, already one line
        raise reader_base.DataError(kssl_config.without_gin_context(error)) from None
    except (ValueError, TypeError) as error:  # a reader's check of its own arguments
        raise kssl_config.ConfigError(
            f"dataset.reader: {' '.join(kssl_config.without_gin_context(error).split())}"
        ) from None
    checks.check_string("dataset.train_split", train_split)
    checks.check_string("dataset.eval_split", eval_split)
    reader.examples(train_split)  # DataError naming the split and the known ones
    if eval_split != train_split:
        reader.examples(eval_split)
    return reader


def check_settings(train) -> None:
    """Every configurable `train` (the driver's configurable) calls, in the active gin scope."""
    checks.check_train(checks.configured(train))
    checks.check_pipeline(checks.configured(pipeline_settings))
    checks.check_labels(checks.configured(labelled_subset))
    checks.check_model(checks.configured(build_model))
    checks.check_optimizer(checks.configured(build_optimizer))
    checks.check_evaluation(checks.configured(evaluation_settings))
    check_dataset()


def check_run(workdir: str, train, stages: Optional[int] = None) -> None:
    """Checks the run directory and every configured value of a run of `train` (the
    driver's configurable), in each stage's scope (`stage_N/...`) for a staged method of
    `stages` stages, before any data is read (see `kssl.checks`)."""
    checks.check_workdir(workdir)
    if not stages or stages == 1:
        check_settings(train)
        return
    for stage in range(1, stages + 1):
        with gin.config_scope(f"stage_{stage}"):
            try:
                check_settings(train)
            except kssl_config.ConfigError as error:
                raise kssl_config.ConfigError(f"stage {stage}: {error}") from None
