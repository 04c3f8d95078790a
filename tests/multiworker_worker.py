"""One worker process of tests/test_multiworker.py, and the hooks that test shares.

    python tests/multiworker_worker.py CONFIG.gin WORKDIR OUT_DIR

trains the run of CONFIG.gin into WORKDIR through `kssl.training.train`; the config says
`train.strategy = 'multi_worker'` and TF_CONFIG names the cluster and this worker's task.
The hooks write into OUT_DIR, this worker's own folder: `ids.txt` (step and example ids of
every batch this worker trained on), `epochs.txt` (the epochs this process began) and
`weights.npz` (every weight of the model and the step counter when fit ends). With
STOP_AT_EPOCH=N in the environment they also write `stop_weights.npz` when epoch N begins
(after the backup of epoch N-1 was written); with STOP_MODE=hang the worker then writes
OUT_DIR/hanging and sleeps, to be killed.

Importing the module runs nothing: a multi-worker strategy must be created before any
TensorFlow operation, which `kssl.training.train` does first.
"""

import json
import os
import sys
import time

import gin
import numpy as np
import tensorflow as tf

from kssl.methods import ClassMix
from kssl.methods.base import unpack_batch


class RecordingClassMix(ClassMix):
    """ClassMix that appends the step and example ids of each batch it trains on to
    `ids_path` (when set)."""

    ids_path = None

    def train_step(self, data):
        if self.ids_path:
            labelled, unlabelled = unpack_batch(data)
            tf.print(self.optimizer.iterations, "L", labelled["id"], "U", unlabelled["id"],
                     output_stream="file://" + self.ids_path, summarize=-1)
        return super().train_step(data)


gin.external_configurable(RecordingClassMix, module="tests")


class Crash(Exception):
    """Raised by the single-process stand-in for a killed worker."""


def install_hooks(out_dir, setattr_=setattr, stop_at_epoch=None, stop=None):
    """Makes `kssl.training.train` record into `out_dir` (see the module docstring);
    when epoch `stop_at_epoch` begins it saves the weights, then hangs (`stop="hang"`),
    raises Crash (`stop="crash"`) or goes on (`stop=None`)."""
    from kssl import training

    os.makedirs(out_dir, exist_ok=True)
    RecordingClassMix.ids_path = os.path.join(out_dir, "ids.txt")

    def save_weights(model, name):
        arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
        arrays["steps"] = np.array(int(model.optimizer.iterations.numpy()))
        np.savez(os.path.join(out_dir, name), **arrays)

    def on_epoch_begin(self, epoch, logs=None):
        with open(os.path.join(out_dir, "epochs.txt"), "a") as f:
            f.write(f"{epoch}\n")
        if epoch == stop_at_epoch:
            save_weights(self.model, "stop_weights.npz")
            if stop == "crash":
                raise Crash()
            if stop == "hang":
                open(os.path.join(out_dir, "hanging"), "w").close()
                time.sleep(600)

    def on_train_end(self, logs=None):
        save_weights(self.model, "weights.npz")

    setattr_(training.ThroughputMeter, "on_epoch_begin", on_epoch_begin)
    setattr_(training.ThroughputMeter, "on_train_end", on_train_end)


def main(argv):
    config_path, workdir, out_dir = argv[1:4]
    from kssl import config, training

    config.parse([config_path])
    stop_at = os.environ.get("STOP_AT_EPOCH")
    install_hooks(out_dir, stop_at_epoch=None if stop_at is None else int(stop_at),
                  stop=os.environ.get("STOP_MODE"))
    metrics = training.train(workdir)
    print("METRICS " + json.dumps({k: metrics.get(k) for k in ("steps", "mean_iou")}),
          flush=True)


if __name__ == "__main__":
    main(sys.argv)
