"""Strategies and multi-worker training: which devices a run uses and how its workers agree.

`choose_strategy` turns `train.strategy` into a tf.distribute strategy (checking TF_CONFIG
for multi-worker training, patching Keras's multi-worker logs once); `chief_values`
broadcasts the chief's values to every worker; `distribute_training_data` gives each
worker its rows of the global batches; `WorkerBackupAndRestore` resumes every worker from
the chief's backup. The fit driver (`kssl.training`) uses them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import keras
import tensorflow as tf

from kssl import config as kssl_config
from kssl import run_files

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
                f"kssl.distribution.choose_strategy('multi_worker') at the start of the script")
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
        return dataset.map(without_ids)
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


def without_ids(*element):
    """A training element without its string example ids (TPUs and XLA take no strings)."""
    def strip(part):
        return {k: v for k, v in part.items() if k != "id"} if isinstance(part, dict) else part
    element = element[0] if len(element) == 1 else element
    return (tuple(strip(part) for part in element) if isinstance(element, tuple)
            else strip(element))


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
