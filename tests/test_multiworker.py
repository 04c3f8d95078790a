"""Multi-worker training on one machine: two worker processes on loopback ports.

One run of a tiny ClassMix job (4 steps, a backup after each) is driven like a cluster
manager would drive it, and compared with the same job in this process on one device:

1. Both workers start (`train.strategy = 'multi_worker'`, TF_CONFIG per process). When
   epoch 2 begins (backups of epochs 0 and 1 written) they save their weights; worker 1
   then hangs and is killed with SIGKILL. Worker 0, blocked in the next step's all-reduce,
   must then fail by itself rather than wait forever.
2. Worker 1's scratch copy is deleted (as if it came back on another machine) and both
   workers start again. They must resume from the chief's backup and run epochs 2-3.

The reference is the same job as a plain one-device run that crashes when epoch 2 begins
and is resumed. Each worker must see its half of each global batch (the same examples as
the reference's batch), and the weights must equal the reference's, before the kill and
at the end. The unsupervised loss counts every pixel (confidence threshold 0): with a
threshold, float noise between one and two replicas can flip pixels across it.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import gin
import numpy as np
import pytest

from kssl import config, distribution, training
from tiny import TINY_SHAPES_CONFIG

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
STOP_EPOCH = 2
STEPS = 4

# The small backbone with a DeepLab-v2 head, ClassMix without strong augmentation: the
# cheapest semi-supervised step to trace (each worker traces it on one CPU core).
CONFIG = TINY_SHAPES_CONFIG + f"""
shapes.num_val = 2
model.arch = 'deeplabv2'
model.aspp_rates = (1, 2)
model.aspp_channels = None
model.decoder_channels = None
train.method = @RecordingClassMix
RecordingClassMix.confidence_threshold = 0.0
train.steps = {STEPS}
train.steps_per_epoch = 1
"""
LABELLED_BATCH = 4  # pipeline.batch_size in TINY_SHAPES_CONFIG, also the unlabelled one


def free_ports(count):
    """Ports the kernel hands out now (held together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Cluster:
    """Two worker processes of one job, their logs and output folders."""

    def __init__(self, root, name, config_path, workdir, stop_modes=(None, None)):
        ports = free_ports(2)
        cluster = [f"127.0.0.1:{port}" for port in ports]
        self.outs = [os.path.join(root, f"{name}_out{i}") for i in range(2)]
        self.logs = [os.path.join(root, f"{name}_log{i}.txt") for i in range(2)]
        self.procs = []
        os.makedirs(os.path.join(root, "tmp"), exist_ok=True)
        for index in range(2):
            env = dict(os.environ)
            env.update(
                TF_CONFIG=('{"cluster": {"worker": [%s]}, "task": {"type": "worker", '
                           '"index": %d}}' % (", ".join(f'"{a}"' for a in cluster), index)),
                TMPDIR=os.path.join(root, "tmp"),  # the workers' scratch copies
                TF_CPP_MIN_LOG_LEVEL="2",
                PYTHONPATH=os.pathsep.join([REPO, TESTS, env.get("PYTHONPATH", "")]),
                # gRPC honours proxy variables: loopback traffic must not go to a proxy.
                no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost",
                STOP_AT_EPOCH=str(STOP_EPOCH),
            )
            env.pop("STOP_MODE", None)
            if stop_modes[index]:
                env["STOP_MODE"] = stop_modes[index]
            with open(self.logs[index], "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, os.path.join(TESTS, "multiworker_worker.py"),
                     config_path, workdir, self.outs[index]],
                    env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))

    def describe(self) -> str:
        """Every worker's exit status and the end of its log, for a failure message."""
        parts = []
        for index, (proc, path) in enumerate(zip(self.procs, self.logs)):
            with open(path) as f:
                tail = "".join(f.readlines()[-40:])
            parts.append(f"--- worker {index} (exit {proc.poll()}) ---\n{tail}")
        return "\n".join(parts)

    def wait(self, index, timeout):
        """Worker `index`'s exit status; kills the job if it runs past `timeout` seconds."""
        try:
            return self.procs[index].wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"worker {index} still running after {timeout} s\n{self.describe()}")

    def wait_for_file(self, path, timeout):
        """Waits until `path` exists, failing early if a worker has exited."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{path} was not written\n{self.describe()}")
            time.sleep(0.2)

    def kill(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def read_ids(path):
    """{step: (labelled ids, unlabelled ids)} from a RecordingClassMix ids file."""
    steps = {}
    with open(path) as f:
        for line in f:
            match = re.match(r"(\d+) L \[(.*)\] U \[(.*)\]$", line.strip())
            assert match, line
            steps[int(match[1])] = tuple(re.findall(r'"([^"]*)"', match[k]) for k in (2, 3))
    return steps


def read_weights(path):
    with np.load(path) as data:
        return [data[f"w{i}"] for i in range(len(data.files) - 1)], int(data["steps"])


def read_epochs(path):
    with open(path) as f:
        return [int(line) for line in f]


def assert_same_weights(got, want, exact=False):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if exact:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Runs the killed-and-restarted two-worker job and the one-device reference."""
    from multiworker_worker import Crash, install_hooks

    root = str(tmp_path_factory.mktemp("multiworker"))
    workdir = os.path.join(root, "run")
    cluster_config = os.path.join(root, "cluster.gin")
    with open(cluster_config, "w") as f:
        f.write(CONFIG + "train.strategy = 'multi_worker'\n")

    first = Cluster(root, "first", cluster_config, workdir, stop_modes=(None, "hang"))
    try:
        first.wait_for_file(os.path.join(first.outs[1], "hanging"), timeout=240)
        # Worker 1 writes its copy of the run into its own temporary folder; the chief
        # has none. (Autograph writes its own temporary files there too.)
        scratch_dirs = sorted(d for d in os.listdir(os.path.join(root, "tmp"))
                              if d.startswith("kssl-"))
        assert len(scratch_dirs) == 1 and scratch_dirs[0].endswith("-worker1"), scratch_dirs
        scratch = os.path.join(root, "tmp", scratch_dirs[0])
        worker1_backup_written = os.path.exists(
            os.path.join(scratch, training.BACKUP_DIR, "latest.weights.h5"))
        first.procs[1].send_signal(signal.SIGKILL)
        first.wait(1, timeout=30)
        killed_at = time.monotonic()

        # The reference runs while worker 0 waits for its dead peer.
        reference = {name: os.path.join(root, f"reference_{name}") for name in ("a", "b")}
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("TF_CONFIG", raising=False)  # 'auto': one device
            gin.clear_config()
            config.parse([], [CONFIG])
            install_hooks(reference["a"], patch.setattr, STOP_EPOCH, stop="crash")
            with pytest.raises(Crash):
                training.train(os.path.join(root, "reference"))
            install_hooks(reference["b"], patch.setattr)
            reference_metrics = training.train(os.path.join(root, "reference"))
            gin.clear_config()

        survivor_exit = first.wait(0, timeout=120)
        survivor_seconds = time.monotonic() - killed_at
        with open(first.logs[0]) as f:
            survivor_log = f.read()
    finally:
        first.kill()

    shutil.rmtree(scratch)  # worker 1 comes back on "another machine"
    second = Cluster(root, "second", cluster_config, workdir)
    try:
        exits = [second.wait(i, timeout=240) for i in range(2)]
        assert exits == [0, 0], second.describe()
    finally:
        second.kill()
    return dict(workdir=workdir, scratch=scratch, first=first, second=second,
                reference=reference, reference_metrics=reference_metrics,
                worker1_backup_written=worker1_backup_written, survivor_exit=survivor_exit,
                survivor_seconds=survivor_seconds, survivor_log=survivor_log)


def test_each_worker_trains_on_its_half_of_the_reference_batches(job):
    """Worker w's batch at each step is rows [w*b, (w+1)*b) of the one-device run's
    global batch, before and after the restart (so per-replica batch = global / 2)."""
    half = LABELLED_BATCH // 2
    for run, ref, steps in (("first", "a", range(STOP_EPOCH)),
                            ("second", "b", range(STOP_EPOCH, STEPS))):
        reference = read_ids(os.path.join(job["reference"][ref], "ids.txt"))
        workers = [read_ids(os.path.join(out, "ids.txt")) for out in job[run].outs]
        assert sorted(reference) == list(steps)
        for step in steps:
            for part in range(2):  # labelled, unlabelled
                want = reference[step][part]
                assert len(want) == LABELLED_BATCH
                for index, worker in enumerate(workers):
                    assert worker[step][part] == want[index * half:(index + 1) * half]


def test_workers_match_the_single_process_run_before_the_kill(job):
    reference, steps = read_weights(os.path.join(job["reference"]["a"], "stop_weights.npz"))
    assert steps == STOP_EPOCH
    chief, chief_steps = read_weights(os.path.join(job["first"].outs[0], "stop_weights.npz"))
    other, _ = read_weights(os.path.join(job["first"].outs[1], "stop_weights.npz"))
    assert chief_steps == STOP_EPOCH
    assert_same_weights(other, chief, exact=True)
    assert_same_weights(chief, reference)
    start, _ = read_weights(os.path.join(job["reference"]["b"], "weights.npz"))
    assert any(not np.allclose(a, b) for a, b in zip(start, reference))  # it trained on


def test_the_surviving_worker_fails_instead_of_waiting(job):
    assert job["survivor_exit"] != 0
    assert "unhealthy" in job["survivor_log"] or "UNAVAILABLE" in job["survivor_log"]
    assert job["survivor_seconds"] < 120


def test_restarted_job_resumes_from_the_chief_backup(job):
    """The restarted workers (worker 1 without a backup of its own) resume at epoch 2,
    finish at step 4 with equal weights, equal to the resumed one-device run."""
    second = job["second"]
    for out in second.outs:
        assert read_epochs(os.path.join(out, "epochs.txt")) == list(range(STOP_EPOCH, STEPS))
    chief, steps = read_weights(os.path.join(second.outs[0], "weights.npz"))
    other, other_steps = read_weights(os.path.join(second.outs[1], "weights.npz"))
    assert steps == other_steps == STEPS
    assert_same_weights(other, chief, exact=True)
    reference, _ = read_weights(os.path.join(job["reference"]["b"], "weights.npz"))
    assert_same_weights(chief, reference)
    assert read_epochs(os.path.join(job["reference"]["b"], "epochs.txt")) == [2, 3]


def test_only_the_chief_writes_the_run(job):
    workdir = job["workdir"]
    assert job["worker1_backup_written"]  # worker 1 saved its backup to its scratch copy
    assert not os.path.exists(job["scratch"])  # ... which is gone once the run finished
    assert sorted(os.listdir(workdir)) == ["backup", "config.gin", "logs", "metrics.json",
                                           "model.weights.h5", "pseudo_label_monitor.json"]
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["steps"] == STEPS and metrics["method"] == "RecordingClassMix"
    # Scored on weights equal to the reference's up to float noise.
    np.testing.assert_allclose(metrics["mean_iou"], job["reference_metrics"]["mean_iou"],
                               atol=1e-3)
    for log in job["second"].logs:
        with open(log) as f:
            assert "METRICS" in f.read()


# -- choosing the strategy (no cluster needed) ---------------------------------------------
CLUSTER = {"cluster": {"worker": ["host1:2222", "host2:2222"]},
           "task": {"type": "worker", "index": 1}}


@pytest.mark.parametrize("value, words", [
    (None, "needs the TF_CONFIG environment variable"),
    ("{'cluster': 1", "TF_CONFIG is not valid JSON"),
    (json.dumps({"cluster": CLUSTER["cluster"]}), "needs a 'cluster' and a 'task' entry"),
    (json.dumps({**CLUSTER, "task": {"type": "worker", "index": 2}}), "does not name a task"),
    (json.dumps({**CLUSTER, "task": {"type": "chief", "index": 0}}), "does not name a task"),
    (json.dumps({**CLUSTER, "cluster": {"worker": ["host1", "host2:2222"]}}),
     "must be a list of 'host:port' strings"),
    (json.dumps({**CLUSTER, "cluster": {"ps": ["h:1"], "worker": ["h:2"]}}), "job 'ps'"),
])
def test_a_bad_tf_config_is_named_with_the_expected_form(monkeypatch, value, words):
    if value is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", value)
    with pytest.raises(config.ConfigError) as error:
        distribution.read_tf_config()
    message = str(error.value)
    assert words in message and "TF_CONFIG" in message
    assert '{"cluster": {"worker": ["host1:12345", "host2:12345"]}' in message


def test_a_good_tf_config_is_read(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(CLUSTER))
    assert distribution.read_tf_config() == CLUSTER


def test_unknown_strategy_names_are_refused():
    with pytest.raises(config.ConfigError, match="'multi_worker', 'tpu', got 'horovod'"):
        training.choose_strategy("horovod")


def test_multi_worker_after_tensorflow_started_fails_clearly(monkeypatch):
    """In this process TensorFlow already runs (conftest split the CPU): the collective
    runtime can no longer be set up, and 'auto' picks multi_worker when TF_CONFIG is set."""
    import tensorflow as tf

    tf.constant(1.0) + 1
    ports = free_ports(2)
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
         "task": {"type": "worker", "index": 0}}))
    for name in ("multi_worker", "auto"):
        with pytest.raises(config.ConfigError, match="before TensorFlow runs any operation"):
            training.choose_strategy(name)


def test_tpu_without_a_tpu_fails_clearly(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(config.ConfigError, match="'tpu' found no TPU"):
        training.choose_strategy("tpu")


def test_worker_scratch_dirs_are_per_run_and_per_task(tmp_path):
    import tempfile

    first = training.worker_scratch_dir(str(tmp_path / "a"), "worker", 1)
    assert os.path.dirname(first) == tempfile.gettempdir()
    assert first == training.worker_scratch_dir(str(tmp_path / "a"), "worker", 1)
    others = {training.worker_scratch_dir(str(tmp_path / "b"), "worker", 1),
              training.worker_scratch_dir(str(tmp_path / "a"), "worker", 2),
              training.worker_scratch_dir(str(tmp_path / "a"), "chief", 1)}
    assert first not in others and len(others) == 3


def test_bin_train_strategy_flag_without_tf_config_fails_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    workdir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "bin", "train"), "--config",
         os.path.join(REPO, "configs", "quickstart.gin"), "--strategy", "multi_worker",
         "--workdir", str(workdir)],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "needs the TF_CONFIG environment variable" in errors[0]
    assert not workdir.exists()
