"""The fit driver: one configured training run, its callbacks, and the stage loop.

`train(workdir)` (gin name `train`) is what `bin/train` runs: it chooses the strategy
(`kssl.distribution`), sets up the data and the method from the configured building
blocks (`kssl.configured`, `kssl.optimizers.build_optimizer`), fits with the callbacks
below and writes the run's files. A staged method runs each stage in turn
(`train_stages`). `prepare_run` and `build_training` are the set-up `kssl.throughput`
measures too.

  train.*       the method, steps, steps per epoch, strategy, precision, seed
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Optional

import gin
import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kssl import config as kssl_config
from kssl import evaluation, pseudo_label_monitor
from kssl import run_files
from kssl.checks import check_whole_epochs
from kssl.configured import (build_model, check_run, dataset_setup, evaluation_settings,
                             labelled_subset, method_pool, monitor_settings,
                             pipeline_settings, prepare_data, record_model_layout, scorer,
                             supervised_loss_settings, training_stream, unlabelled_source)
from kssl.data import class_balance, validate
from kssl.data.examples import Examples
from kssl.data.pseudo_masks import PseudoMaskStore, stability_against, write_pseudo_masks
from kssl.distribution import (WorkerBackupAndRestore, chief_values, choose_strategy,
                               distribute_training_data, is_chief, worker_scratch_dir)
from kssl.methods import Supervised
from kssl.methods.base import SegmentationMethod
from kssl.methods.pseudo_label_controls import select_reliable
from kssl.optimizers import build_optimizer


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


# -- the driver --------------------------------------------------------------------------
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
    """Deletes an earlier run (the folder's content: the folder stays, locked by the run
    about to train in it), refusing, with the culprits named, a folder that holds
    anything kssl did not write (see `run_files.foreign_files`)."""
    if not os.path.isdir(workdir):
        return
    foreign = run_files.foreign_files(workdir)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise kssl_config.ConfigError(
            f"--overwrite refuses to clear {workdir}: it holds files kssl did not write "
            f"({', '.join(foreign[:5])}{more}); move them away first")
    run_files.clear_run_directory(workdir)


def check_no_foreign_metrics(workdir: str) -> None:
    """Refuses to train into `workdir` when it holds a metrics.json that is not a finished
    run's: training would overwrite it at the end."""
    path = os.path.join(workdir, "metrics.json")
    if os.path.exists(path) and not run_files.finished_run(workdir):
        raise kssl_config.ConfigError(
            f"{path} exists, but {workdir} holds no finished kssl run (no config.gin and "
            "model.weights.h5 beside it): move the file away or choose another --workdir")


# -- one run's set-up, shared with kssl.throughput -----------------------------------------
@dataclasses.dataclass
class RunData:
    """The data side of one run (or one stage of a staged method), checked and listed."""

    method: type
    stage: Optional[int]
    reader: object
    train_split: str
    eval_split: str
    settings: dict  # pipeline.*
    labelled: Examples
    unlabelled: Optional[Examples]
    unlabelled_reader: object  # the reader of a separate unlabelled pool, or None
    pool: Optional[Examples]  # what the second sub-batch is drawn from, or None
    method_factory: object  # builds the method from the segmenter
    class_weights: Optional[object]
    class_prior: Optional[object]

    @property
    def num_classes(self) -> int:
        """Classes of the dataset."""
        return self.reader.info.num_classes

    @property
    def stage_text(self) -> str:
        """' stage N of M' for one stage of a staged method, else ''."""
        return "" if self.stage is None else f" stage {self.stage} of {self.method.stages}"

    @property
    def unlabelled_per_step(self) -> int:
        """Images of the second sub-batch in one step (0 without one)."""
        if self.pool is None:
            return 0
        return self.settings["unlabelled_batch_size"] or self.settings["batch_size"]

    @property
    def images_per_step(self) -> int:
        """Training images (labelled + second sub-batch) one step reads."""
        return self.settings["batch_size"] + self.unlabelled_per_step


def prepare_run(method, stage=None, pseudo_masks=None) -> RunData:
    """Reads, splits and checks the configured data of a run of `method` (of one stage
    of a staged method, reading the `pseudo_masks` store of the stage before), and
    derives the class weights and prior the method is built with. Prints a summary."""
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
    weight_setting = supervised_loss_settings()
    # The labelled masks are read once for both uses of their class counts: median
    # frequency weights and the class prior below.
    counts = None
    if training_pool is not None or weight_setting in class_balance.CLASS_WEIGHTINGS:
        counts = class_balance.class_pixel_counts(reader, labelled, num_classes)
    try:
        class_weights = class_balance.resolve_class_weights(
            weight_setting, reader, labelled, num_classes, counts=counts)
    except ValueError as error:
        raise kssl_config.ConfigError(str(error)) from None
    # The labelled masks' class distribution: the target of distribution alignment and
    # the reference of the pseudo-label monitor.
    class_prior = None
    if training_pool is not None:
        class_prior = pseudo_label_monitor.labelled_prior(counts[0])
    if class_weights is not None:
        print("kssl: supervised loss class weights: " + class_balance.format_weights(
            class_weights, reader.info.class_names), flush=True)
    if training_pool is not None and pseudo_masks is not None:
        pseudo_masks.check_matches(num_classes, settings["resize"])
        pseudo_masks.check_covers(training_pool, "training")
    return RunData(method, stage, reader, train_split, eval_split, settings, labelled,
                   unlabelled, unlabelled_reader, training_pool, method_factory,
                   class_weights, class_prior)


def build_training(data: RunData, dist: tf.distribute.Strategy, steps: int, data_seed: int,
                   pseudo_masks=None, jit_compile: bool = False):
    """The global training stream (not yet distributed, see `distribute_training_data`)
    and the compiled method of the run `data` describes: (stream, method, segmenter).

    Checks that the batch sizes split evenly over `dist`'s replicas; the method and its
    optimizer (for `steps` optimizer steps) are built in `dist`'s scope.
    """
    settings = data.settings
    for key in ("batch_size", "unlabelled_batch_size"):
        if settings[key] and settings[key] % dist.num_replicas_in_sync:
            raise kssl_config.ConfigError(
                f"pipeline.{key} ({settings[key]}) must be a multiple of the number of "
                f"replicas ({dist.num_replicas_in_sync})")
    train_ds = training_stream(
        data.reader, data.labelled, data.pool, data.unlabelled_reader, settings, data_seed,
        attach=None if pseudo_masks is None else pseudo_masks.attach, jit_compile=jit_compile)
    with dist.scope():
        segmenter = build_model(data.num_classes)
        try:
            model = data.method_factory(segmenter, num_classes=data.num_classes,
                                        class_weights=data.class_weights,
                                        class_prior=data.class_prior)
        except ValueError as error:  # the method's check of its own options
            raise kssl_config.ConfigError(
                f"{data.method.__name__}: {kssl_config.without_gin_context(error)}") from None
        model.compile(optimizer=build_optimizer(steps, batch_size=settings["batch_size"]),
                      jit_compile=jit_compile)
    return train_ds, model, segmenter


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
    settings = dict(steps=steps, steps_per_epoch=steps_per_epoch,
                    mixed_precision=mixed_precision, jit_compile=jit_compile, seed=seed,
                    eval_every_epochs=eval_every_epochs, overwrite=overwrite, verbose=verbose)
    if stage is not None:  # one stage of a staged run: the run's own call holds the folder
        check_whole_epochs(steps, steps_per_epoch)  # this stage's steps
        return _train_one(workdir, None, dist, method, stage, pseudo_masks, **settings)
    check_run(workdir, train, method.stages)  # every stage's values, before any data
    if method.stages == 1:  # the arguments themselves: a script may pass them without gin
        check_whole_epochs(steps, steps_per_epoch)
    chief_workdir = None
    if not is_chief(dist):
        # Only the chief's files are the run's: this worker runs the same code (saves
        # included) on a scratch copy that is deleted at the end (see worker_scratch_dir).
        chief_workdir, workdir = workdir, worker_scratch_dir(
            workdir, dist.cluster_resolver.task_type, dist.cluster_resolver.task_id)
    with run_files.exclusive_use(workdir):
        if method.stages > 1:
            return _worker_done(chief_workdir, workdir, train_stages(
                workdir, method, overwrite=overwrite, start_stage=start_stage,
                chief_workdir=chief_workdir))
        return _train_one(workdir, chief_workdir, dist, method, None, None, **settings)


def _train_one(workdir, chief_workdir, dist, method, stage, pseudo_masks, *, steps,
               steps_per_epoch, mixed_precision, jit_compile, seed, eval_every_epochs,
               overwrite, verbose):
    """`train`'s run (or one stage of a staged run) in `workdir`, once the strategy exists
    and the folder is this process's; `chief_workdir` is set on a non-chief worker."""
    metrics_path = os.path.join(workdir, "metrics.json")
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

    data = prepare_run(method, stage, pseudo_masks)
    reader, train_split, eval_split = data.reader, data.train_split, data.eval_split
    labelled, unlabelled = data.labelled, data.unlabelled
    settings, num_classes = data.settings, data.num_classes
    stage_text = data.stage_text

    eval_examples = reader.examples(eval_split)
    if settings["validate_data"]:
        validate.validate(reader, eval_examples, with_masks=True, num_classes=num_classes,
                          what="evaluation")
    # A resumed run draws a fresh shuffle and fresh augmentations rather than replaying the
    # batches its first part already trained on.
    data_seed = settings["seed"] + 7919 * done_epochs
    train_ds, model, segmenter = build_training(data, dist, steps, data_seed, pseudo_masks,
                                                jit_compile=jit_compile)
    train_ds = distribute_training_data(dist, train_ds)
    eval_settings = evaluation_settings()
    # Saved once every configurable has been called, so the file rebuilds the whole run
    # (bin/evaluate, bin/export and bin/predict read it).
    kssl_config.save_operative_config(os.path.join(workdir, "config.gin"))
    record_model_layout(os.path.join(workdir, "config.gin"), segmenter)

    meter = ThroughputMeter(data.images_per_step)
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
                            data.unlabelled_reader, settings, steps_per_epoch, workdir,
                            data.class_prior)
    if monitor is not None:
        callbacks.append(monitor)
    writer = None
    if stage is not None and stage < method.stages:
        scored_pool = with_ground_truth(unlabelled, reader, train_split,
                                        settings["validate_data"])
        selection = None
        if stage == 1 and model.reliable_share is not None and len(unlabelled):
            selection = ReliableSelection(
                os.path.join(workdir, run_files.RELIABILITY_DIR), reader, scored_pool,
                num_classes, steps, model.reliable_share, model.reliable_checkpoints,
                resize=settings["resize"])
            callbacks.append(selection)
        writer = PseudoMaskWriter(os.path.join(workdir, PSEUDO_MASK_DIR), reader,
                                  [("labelled", labelled), ("unlabelled", scored_pool)],
                                  num_classes, resize=settings["resize"],
                                  progress=verbose == 1, selection=selection)
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
        result["pseudo_label_monitor_ids"] = monitor.ids
    run_files.write_json(metrics_path, result)
    # The workers leave together: a worker that exits while another still runs is
    # reported by the other as crashed.
    chief_values(dist, [0])
    return _worker_done(chief_workdir, workdir, result)


def _worker_done(chief_workdir, workdir, result):
    """Deletes a non-chief worker's scratch copy (`workdir`) once its run is over."""
    if chief_workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


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
        every_steps or steps_per_epoch, directory=workdir,
        ids=pseudo_label_monitor.subset_ids(pool, count))


def monitored_subset():
    """The pseudo-label monitor's subset under the parsed config, as `build_monitor`
    chooses it: (reader, example ids, float images, ground-truth masks, the labelled
    masks' class prior), or None where there is nothing to score (the monitor off, no
    unlabelled pool, a separate unlabelled source, or a pool without ground truth). Reads
    the unscoped bindings: a staged method's `stage_N/` bindings of the monitor or the
    pipeline are not applied."""
    reader, train_split, _ = kssl_config.call_configured(dataset_setup)
    count, _ = monitor_settings()
    _, extra = unlabelled_source()
    if not count or extra is not None:
        return None
    labelled, unlabelled = kssl_config.call_configured(
        labelled_subset, reader.examples(train_split), reader)
    if unlabelled is None or len(unlabelled) == 0:
        return None
    pool = with_ground_truth(unlabelled, reader, train_split, check=False)
    if not pool.has_masks:
        return None
    images, truth = pseudo_label_monitor.load_subset(
        reader, pool, count, pipeline_settings()["resize"], with_masks=True)
    counts = class_balance.class_pixel_counts(reader, labelled, reader.info.num_classes)
    return (reader, pseudo_label_monitor.subset_ids(pool, count), images, truth,
            pseudo_label_monitor.labelled_prior(counts[0]))


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


class ReliableSelection(keras.callbacks.Callback):
    """ST++'s reliable-image selection (`ThreeStage.reliable_share`).

    At `checkpoints` - 1 evenly spaced steps before the end, stores the argmax of the
    model's `pseudo_mask_network` on the unlabelled `pool` (a pseudo-mask store per step
    in `directory`, so a resumed run still has them); `choose` then scores each image's
    stability against the final network and keeps the most stable `share`.
    """

    def __init__(self, directory, reader, pool, num_classes, steps, share, checkpoints,
                 resize=None):
        super().__init__()
        self.directory = directory
        self.reader = reader
        self.pool = pool
        self.num_classes = num_classes
        self.share = share
        self.resize = resize
        # ST++ keeps a model after epochs // 3 and 2 * epochs // 3 of training (K = 3).
        self.snapshot_steps = sorted({max(1, steps * k // checkpoints)
                                      for k in range(1, checkpoints)})

    def snapshot(self, step) -> PseudoMaskStore:
        return PseudoMaskStore(os.path.join(self.directory, f"step_{step:06d}"))

    def on_train_begin(self, logs=None):
        # Read once, after the backup is restored: reading the counter every step would
        # wait for each step to finish.
        self.step = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        snapshot = self.snapshot(self.step)
        if self.step in self.snapshot_steps and not snapshot.complete:
            write_pseudo_masks(snapshot.directory, self.model.pseudo_mask_network, self.reader,
                               [("unlabelled", self.pool)], self.num_classes,
                               resize=self.resize, progress=False)

    def choose(self, network) -> tuple:
        """(the unlabelled ids whose pseudo-masks are dropped, what the report records),
        `network` being the final checkpoint."""
        taken = [s for s in self.snapshot_steps if self.snapshot(s).complete]
        if len(taken) < len(self.snapshot_steps):
            missing = sorted(set(self.snapshot_steps) - set(taken))
            print(f"kssl: reliable images: no prediction snapshot of step(s) {missing} in "
                  f"{self.directory} (resumed without it); scoring stability against "
                  f"step(s) {taken or 'none (every image alike, pool order)'}", flush=True)
        ids, scores = stability_against([self.snapshot(s) for s in taken], network,
                                        self.reader, self.pool, self.num_classes,
                                        resize=self.resize)
        kept, dropped = select_reliable(ids, scores, self.share)
        print(f"kssl: reliable images: keeping the pseudo-masks of the {len(kept)} most "
              f"stable of {len(ids)} unlabelled images", flush=True)
        return dropped, {"reliable_share": self.share, "reliable_images": len(kept),
                         "reliability_snapshot_steps": taken}


class PseudoMaskWriter(keras.callbacks.Callback):
    """At the end of training, stores the model's `pseudo_mask_network` argmax on every
    training image (see `kssl.data.pseudo_masks`) and reports their quality against the
    ground truth where it exists. A set that is already complete is kept. With a
    `selection` (`ReliableSelection`), the unreliable unlabelled images' masks are stored
    all-ignore."""

    def __init__(self, directory, reader, pools, num_classes, resize=None, progress=True,
                 selection=None):
        super().__init__()
        self.store = PseudoMaskStore(directory)
        self.reader = reader
        self.pools = pools
        self.num_classes = num_classes
        self.resize = resize
        self.progress = progress
        self.selection = selection
        self.report = None

    def on_train_end(self, logs=None):
        if self.store.complete:
            self.report = self.store.index.get("scores")
            return
        network = self.model.pseudo_mask_network
        dropped, notes = None, None
        if self.selection is not None:
            dropped, notes = self.selection.choose(network)
        total = sum(len(examples) for _, examples in self.pools)
        print(f"kssl: writing {total} pseudo-masks to {self.store.directory}", flush=True)
        self.report = write_pseudo_masks(
            self.store.directory, network, self.reader, self.pools,
            self.num_classes, resize=self.resize, progress=self.progress,
            confidence_threshold=self.model.pseudo_mask_threshold, dropped_ids=dropped,
            notes=notes)
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
    run_files.write_json(os.path.join(workdir, "metrics.json"), result)
    print(f"kssl: {method.__name__} by stage, the networks and their pseudo-masks "
          f"(scored against the ground truth):\n"
          + format_stage_table(summary, result.get("eval_split")), flush=True)
    return result


def format_stage_table(summary: dict, eval_split) -> str:
    """The closing table of a staged run: per stage (`summary` as in its metrics.json),
    the network's mean IoU on `eval_split`, that of the pseudo-masks it stored against
    the ground truth of the labelled and the unlabelled pool (their kept pixels), and
    that of its argmax on every unlabelled pixel, which compares stages whatever each
    kept ('-': none stored, or no ground truth)."""
    def percent(value):
        return "-" if value is None else f"{100 * value:.1f}"

    columns = (f"{eval_split} mIoU %", "pseudo-masks mIoU %: labelled", "unlabelled",
               "unlabelled argmax")
    lines = [f"{'stage':<6}" + "".join(f"{c:>{len(c) + 3}}" for c in columns)]
    lines.append("-" * len(lines[0]))
    for stage in sorted(summary, key=int):
        masks = summary[stage].get("pseudo_masks") or {}
        values = (summary[stage].get("mean_iou"), masks.get("labelled_mean_iou"),
                  masks.get("unlabelled_mean_iou"), masks.get("unlabelled_argmax_mean_iou"))
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
