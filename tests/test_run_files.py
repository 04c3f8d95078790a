"""What kssl may delete or replace, and resume from damaged or half-written backups."""

import json
import os
import shutil
import subprocess
import sys

import gin
import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from kssl import config, export, run_files, training
from kssl.predict import predict_folder
from tiny import error_lines, run_tool, tiny_run_config, write_untrained_run

# Three epochs of one step each: a crash, a save and a resume cost a few steps.
RESUME_CONFIG = tiny_run_config(steps=3)


def write(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


# -- --overwrite ---------------------------------------------------------------------------
def fake_run(root):
    """Every kind of file a finished three-stage run, evaluated, holds."""
    scores = json.dumps({"mean_iou": 0.5})
    for where in ("", "stage_1", "stage_3"):
        base = os.path.join(root, where)
        write(os.path.join(base, "config.gin"), "train.steps = 3\n")
        write(os.path.join(base, "model.weights.h5"))
        write(os.path.join(base, "metrics.json"), scores)
        for name in ("latest.weights.h5", "training_metadata.json",
                     "previous.weights.h5", "previous_training_metadata.json"):
            write(os.path.join(base, "backup", name))
        write(os.path.join(base, "logs", "train", "events.out.tfevents.1.host.2.v2"))
        write(os.path.join(base, "logs", "pseudo_labels", "events.out.tfevents.1.host.3.v2"))
        write(os.path.join(base, "pseudo_label_monitor.json"), "{}")
    write(os.path.join(root, "stage_1", "pseudo_masks", "index.json"), "{}")
    write(os.path.join(root, "stage_1", "pseudo_masks", "000000.png"))
    for snapshot in ("step_000003", "step_000006.partial"):  # ST++'s selection
        write(os.path.join(root, "stage_1", "reliability", snapshot, "index.json"), "{}")
        write(os.path.join(root, "stage_1", "reliability", snapshot, "000000.png"))
    write(os.path.join(root, "eval_val.json"), scores)
    write(os.path.join(root, "stage_1", "eval_test.json"), scores)


@pytest.mark.parametrize("foreign, named", [
    # A folder kssl never writes is named as a whole.
    ("stage_photos/holiday.jpg", "stage_photos"), ("photos/holiday.jpg", "photos"),
    ("eval_budget.xlsx", "eval_budget.xlsx"), ("eval_notes.json", "eval_notes.json"),
    ("logs/notes.txt", "logs/notes.txt"), ("backup/mine.h5", "backup/mine.h5"),
    ("logs/train/holiday.jpg", "logs/train/holiday.jpg"),
    ("stage_1/holiday.jpg", "stage_1/holiday.jpg"),
    ("stage_1/pseudo_masks/holiday.jpg", "stage_1/pseudo_masks/holiday.jpg"),
    ("stage_1/reliability/notes.txt", "stage_1/reliability/notes.txt"),
    ("stage_1/reliability/step_000003/a.jpg", "stage_1/reliability/step_000003/a.jpg"),
    ("stage_1/reliability/photos/a.jpg", "stage_1/reliability/photos")])
def test_overwrite_refuses_and_names_a_file_kssl_did_not_write(tmp_path, foreign, named):
    run = str(tmp_path / "run")
    fake_run(run)
    write(os.path.join(run, foreign), "a user's own file")
    assert run_files.foreign_files(run) == [named]
    with pytest.raises(config.ConfigError) as caught:
        training.remove_run(run)
    assert named in str(caught.value) and "\n" not in str(caught.value)
    assert os.path.exists(os.path.join(run, foreign))
    assert os.path.exists(os.path.join(run, "model.weights.h5"))


def test_overwrite_clears_a_folder_of_kssl_files_only(tmp_path):
    run = str(tmp_path / "run")
    fake_run(run)
    assert run_files.foreign_files(run) == []
    training.remove_run(run)
    assert os.listdir(run) == []  # the folder stays: the run about to train holds it


def test_a_users_own_metrics_json_is_neither_a_finished_run_nor_cleared(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "metrics.json").write_text('{"accuracy": 0.9}')
    assert not run_files.finished_run(str(folder))
    config.parse([], [RESUME_CONFIG])  # a run that would train
    with pytest.raises(config.ConfigError, match="metrics.json"):
        training.train(str(folder))
    with pytest.raises(config.ConfigError, match="metrics.json"):
        training.train(str(folder), overwrite=True)
    assert (folder / "metrics.json").read_text() == '{"accuracy": 0.9}'
    assert os.listdir(folder) == ["metrics.json"]


# -- one training process per run folder ------------------------------------------------
def test_a_second_run_in_a_folder_in_use_fails_before_writing(tmp_path):
    run = str(tmp_path / "run")
    config.parse([], [RESUME_CONFIG])
    with run_files.exclusive_use(run):
        for overwrite in (False, True):
            with pytest.raises(config.ConfigError, match="another process is training") as caught:
                training.train(run, overwrite=overwrite)
            line = str(caught.value).splitlines()[0]  # below it, gin's call context
            assert line.startswith(run + ": ") and line.endswith("--workdir")
        assert os.listdir(run) == []
    with run_files.exclusive_use(run):  # free again once its holder is done
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom kssl import run_files\n"
         "with run_files.exclusive_use(sys.argv[1]):\n"
         "    print('held', flush=True)\n    time.sleep(120)\n", run],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(config.ConfigError, match="another process"):
            with run_files.exclusive_use(run):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_files.exclusive_use(run):
        pass


# -- bin/predict and bin/export --------------------------------------------------------
def identity_model():
    """Class k where channel k is brightest."""
    model = keras.Sequential([keras.Input((None, None, 3)),
                              keras.layers.Conv2D(3, 1, use_bias=False)])
    model.layers[0].set_weights([np.eye(3, dtype=np.float32)[None, None]])
    return model


PALETTE = np.array([[0, 0, 0], [200, 0, 0], [0, 200, 0]], np.uint8)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        tf.io.write_file(str(folder / name), tf.io.encode_png(
            np.full((4, 5, 3), 7 if name == "a.png" else 9, np.uint8)))
    return folder


def contents(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("output", [".", "masks", "./sub/.."])
def test_predict_refuses_an_output_folder_in_the_input_folder(photos, output):
    before = contents(photos)
    with pytest.raises(ValueError, match="inside, the input folder"):
        predict_folder(identity_model(), str(photos), os.path.join(str(photos), output),
                       PALETTE, progress=False)
    assert contents(photos) == before


def test_predict_replaces_existing_masks_only_when_told(photos, tmp_path):
    out = tmp_path / "masks"
    out.mkdir()
    (out / "b.png").write_bytes(b"someone's drawing")
    with pytest.raises(FileExistsError, match="b.png already exists"):
        predict_folder(identity_model(), str(photos), str(out), PALETTE, progress=False)
    assert contents(out) == {"b.png": b"someone's drawing"}  # nothing written
    written = predict_folder(identity_model(), str(photos), str(out), PALETTE,
                             progress=False, overwrite=True)
    assert sorted(os.path.basename(p) for p in written) == ["a.png", "b.png"]
    mask = tf.io.decode_png((out / "b.png").read_bytes()).numpy()
    np.testing.assert_array_equal(mask, np.zeros((4, 5, 3), np.uint8))  # ties: class 0


@pytest.fixture
def untrained_run(tmp_path):
    """A run directory with config.gin and model.weights.h5, as bin/train leaves it."""
    write_untrained_run(str(tmp_path / "run"))
    return str(tmp_path / "run")


def test_cli_predict_and_export_never_replace_what_they_did_not_write(
        tmp_path, photos, untrained_run):
    before = contents(photos)
    result = run_tool("predict", "--workdir", untrained_run, "--input", str(photos),
                      "--output", str(photos))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(error_lines(result)) == 1 and "input folder" in error_lines(result)[0]
    assert contents(photos) == before

    for name, format in (("model.onnx", "onnx"), ("model.tflite", "tflite")):
        (tmp_path / name).write_bytes(b"a model from elsewhere")
        result = run_tool("export", "--workdir", untrained_run, "--format", format,
                          "--input_size", "48,64", "--output", str(tmp_path / name))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert error_lines(result) == [f"error: --output {tmp_path / name} already exists; "
                                       "pass --overwrite to replace it"]
        assert (tmp_path / name).read_bytes() == b"a model from elsewhere"


def test_export_checks_what_is_at_the_output_path(tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"pb")
    (tmp_path / "album").mkdir()
    (tmp_path / "album" / "holiday.jpg").write_bytes(b"jpg")
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    refused = [(saved, "saved_model", False), (tmp_path / "album", "saved_model", True),
               (tmp_path / "model.onnx", "saved_model", True),
               (tmp_path / "model.onnx", "onnx", False), (saved, "onnx", True)]
    for path, format, overwrite in refused:
        with pytest.raises(export.ExportError, match=str(path)):
            export.check_output_path(str(path), format, overwrite)
    for path, format, overwrite in [(saved, "saved_model", True), (tmp_path / "empty", "onnx",
                                                                    False),
                                    (tmp_path / "model.onnx", "onnx", True)]:
        export.check_output_path(str(path), format, overwrite)


# -- resume --------------------------------------------------------------------------------
class Crash(Exception):
    pass


def train_until(workdir, crash_epoch, patch):
    """Trains the resume config in `workdir` and crashes as epoch `crash_epoch` starts."""
    original = training.ThroughputMeter.on_epoch_begin

    def crash(self, epoch, logs=None):
        if epoch == crash_epoch:
            raise Crash()
        return original(self, epoch, logs)

    gin.clear_config()
    config.parse([], [RESUME_CONFIG])
    patch(training.ThroughputMeter, "on_epoch_begin", crash)
    with pytest.raises(Crash):
        training.train(workdir)
    patch(training.ThroughputMeter, "on_epoch_begin", original)


def resume(workdir, monkeypatch):
    """Runs the same configuration again: (epochs trained, the metrics)."""
    started = []
    monkeypatch.setattr(training.ThroughputMeter, "on_epoch_begin",
                        lambda self, epoch, logs=None: started.append(epoch))
    gin.clear_config()
    config.parse([], [RESUME_CONFIG])
    return started, training.train(workdir)


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory):
    """A run that saved backups after epochs 1 and 2 and crashed as epoch 3 began."""
    workdir = str(tmp_path_factory.mktemp("crashed") / "run")
    with pytest.MonkeyPatch.context() as patch:
        train_until(workdir, 2, patch.setattr)
    gin.clear_config()
    return workdir


def test_backups_keep_the_previous_epoch(crashed_run):
    backup = os.path.join(crashed_run, "backup")
    assert sorted(os.listdir(backup)) == ["latest.weights.h5", "previous.weights.h5",
                                          "previous_training_metadata.json",
                                          "training_metadata.json"]
    assert run_files.usable_backups(backup) == [
        (os.path.join(backup, "latest.weights.h5"), 2),
        (os.path.join(backup, "previous.weights.h5"), 1)]


def truncate(path, keep):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


@pytest.mark.parametrize("damage", ["truncated weights", "empty weights",
                                    "garbled metadata"])
def test_a_damaged_backup_falls_back_to_the_one_before(crashed_run, tmp_path, monkeypatch,
                                                       capsys, damage):
    workdir = str(tmp_path / "run")
    shutil.copytree(crashed_run, workdir)
    backup = os.path.join(workdir, "backup")
    if damage == "garbled metadata":
        write(os.path.join(backup, "training_metadata.json"), '{"epoch": 2, "bat')
    else:
        truncate(os.path.join(backup, "latest.weights.h5"), 0.5 if "truncated" in damage else 0)
    started, metrics = resume(workdir, monkeypatch)
    assert started == [1, 2]  # epoch 2 again: its backup was lost, epoch 1's was not
    assert metrics["steps"] == 3  # the optimizer's step counter came from epoch 1's backup
    assert "resuming from the backup before it (epoch 1)" in capsys.readouterr().out
    # The resumed run's files are all kssl's: --overwrite clears it.
    training.remove_run(workdir)
    assert os.listdir(workdir) == []


def test_garbled_metadata_without_an_earlier_backup_says_how_to_recover(crashed_run,
                                                                        tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(crashed_run, workdir)
    backup = os.path.join(workdir, "backup")
    for name in ("previous.weights.h5", "previous_training_metadata.json"):
        os.remove(os.path.join(backup, name))  # as an older kssl leaves it
    metadata = os.path.join(backup, "training_metadata.json")
    write(metadata, "\x00\x00garbage")
    config.parse([], [RESUME_CONFIG])
    with pytest.raises(config.ConfigError) as caught:
        training.train(workdir)
    message = str(caught.value).split("\n  In call to configurable")[0]  # gin's addition
    assert "\n" not in message and metadata in message
    assert f"delete {backup}" in message and "--overwrite" in message


def test_a_kill_while_saving_the_backup_leaves_the_previous_one(tmp_path, monkeypatch):
    """The second epoch's save dies with its weights file half-written."""
    workdir = str(tmp_path / "run")
    original = keras.Model.save_weights
    saves = []

    def dies_while_writing(self, filepath, *args, **kwargs):
        original(self, filepath, *args, **kwargs)
        saves.append(filepath)
        if len(saves) == 2:
            truncate(filepath, 0.5)
            raise Crash()

    monkeypatch.setattr(keras.Model, "save_weights", dies_while_writing)
    gin.clear_config()
    config.parse([], [RESUME_CONFIG])
    with pytest.raises(Crash):
        training.train(workdir)
    monkeypatch.setattr(keras.Model, "save_weights", original)
    started, metrics = resume(workdir, monkeypatch)
    assert started == [1, 2]
    assert metrics["steps"] == 3


def test_a_save_cut_between_its_renames_is_not_mixed_with_the_one_before(tmp_path,
                                                                         monkeypatch):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    backup = str(tmp_path / "backup")
    run_files.save_backup(model, backup, 1)
    run_files.save_backup(model, backup, 2)
    original = os.replace

    def cut(source, target):
        if os.path.basename(target) == "training_metadata.json":
            raise Crash()
        original(source, target)

    monkeypatch.setattr(os, "replace", cut)
    with pytest.raises(Crash):
        run_files.save_backup(model, backup, 3)
    monkeypatch.setattr(os, "replace", original)
    with h5py.File(os.path.join(backup, "latest.weights.h5")) as f:
        assert f.attrs["kssl_epoch"] == 3  # the new weights are in place ...
    with open(os.path.join(backup, "training_metadata.json")) as f:
        assert json.load(f)["epoch"] == 2  # ... beside the old metadata
    assert run_files.usable_backups(backup) == [
        (os.path.join(backup, "previous.weights.h5"), 2)]


def test_a_backup_written_in_place_by_keras_still_resumes(tmp_path, monkeypatch):
    """Runs started by an older kssl, whose backups Keras wrote in place, resume."""
    workdir = str(tmp_path / "run")
    monkeypatch.setattr(training.WorkerBackupAndRestore, "_save_model",
                        keras.callbacks.BackupAndRestore._save_model)
    train_until(workdir, 2, monkeypatch.setattr)
    assert sorted(os.listdir(os.path.join(workdir, "backup"))) == [
        "latest.weights.h5", "training_metadata.json"]
    monkeypatch.undo()
    started, metrics = resume(workdir, monkeypatch)
    assert started == [2] and metrics["steps"] == 3


def test_a_tool_writes_its_output_file_only_where_nothing_is_or_when_asked(tmp_path):
    new = str(tmp_path / "new.json")
    assert run_files.output_file_problem(new) is None
    existing = tmp_path / "theirs.json"
    existing.write_text("someone's notes")
    problem = run_files.output_file_problem(str(existing))
    assert problem == f"--output {existing} already exists; pass --overwrite to replace it"
    assert run_files.output_file_problem(str(existing), overwrite=True) is None
    # A folder is never replaced by a file, --overwrite or not.
    assert "is a folder" in run_files.output_file_problem(str(tmp_path), overwrite=True)
    assert "no folder" in run_files.output_file_problem(str(tmp_path / "missing" / "a.json"))
    assert existing.read_text() == "someone's notes"
