"""The files of a run directory: writing them so that a kill never leaves one half-written,
the resume backup, and telling kssl's files from anyone else's.

Every checkpoint, metrics and metadata file is written under a temporary name in its own
directory and then renamed over the old one (`os.replace`, atomic on one filesystem), so
a crash, a kill or a full disk leaves either the previous complete file or the new one.

The resume backup (`backup/`) is Keras's `BackupAndRestore` layout, `latest.weights.h5`
and `training_metadata.json`, plus the previous complete pair, `previous.weights.h5` and
`previous_training_metadata.json`. A backup damaged after it was written (disk trouble, a
copy cut short, or one written in place by an older kssl and killed) then falls back to
the epoch before it. kssl records the epoch in the weights file too, so a weights
file and metadata from different saves are never taken for one backup.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from typing import Iterator, List, Tuple

try:
    import fcntl
except ImportError:  # Windows: runs there are not guarded against a second process
    fcntl = None

import h5py
import numpy as np

from kssl.config import ConfigError

BACKUP_WEIGHTS = "latest.weights.h5"
BACKUP_METADATA = "training_metadata.json"
PREVIOUS_WEIGHTS = "previous.weights.h5"  # Keras loads only names ending in .weights.h5
PREVIOUS_METADATA = "previous_training_metadata.json"
EPOCH_ATTRIBUTE = "kssl_epoch"
WEIGHTS_SUFFIX = ".weights.h5"


def partial_path(path: str) -> str:
    """The temporary name `path` is written under before it is renamed into place; it keeps
    the `.weights.h5` ending, which Keras's `save_weights` requires."""
    if path.endswith(WEIGHTS_SUFFIX):
        return path[:-len(WEIGHTS_SUFFIX)] + ".partial" + WEIGHTS_SUFFIX
    return path + ".partial"


def _sync(path: str) -> None:
    """Flushes a written file to disk, so that after a power loss the rename that follows
    never points at data that was not stored."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(partial: str, path: str) -> None:
    _sync(partial)
    os.replace(partial, path)


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically (the old file stays until the new one is complete)."""
    partial = partial_path(path)
    with open(partial, "w") as f:
        f.write(text)
    _commit(partial, path)


def output_file_problem(path: str, overwrite: bool = False, flag: str = "--output"):
    """Why a tool must not write its one output file at `path`, or None: a folder is
    there, its folder is not, or a file is there and `overwrite` was not asked for (a tool replaces nobody's file
    unasked). Checked before any work, so a refused run costs nothing."""
    if os.path.isdir(path):
        return f"{flag} {path} is a folder; expected the name of a file to write"
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return f"{flag} {path}: no folder {folder} to write it in"
    if os.path.exists(path) and not overwrite:
        return f"{flag} {path} already exists; pass --overwrite to replace it"
    return None


def jsonable(value):
    """Converts numpy scalars and NaN (-> null) so metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str, values: dict) -> None:
    """Writes strict JSON atomically: a run is finished when its metrics.json exists, so
    the file must never be seen half-written."""
    write_text(path, json.dumps(jsonable(values), indent=2))


def save_weights(model, path: str) -> None:
    """`model.save_weights(path)`, atomically."""
    partial = partial_path(path)
    model.save_weights(partial)
    _commit(partial, path)


def copy_file(source: str, path: str) -> None:
    """Copies `source` to `path` atomically."""
    partial = partial_path(path)
    shutil.copyfile(source, partial)
    _commit(partial, path)


def _keep_as_previous(path: str, previous: str) -> None:
    """Makes `previous` the same content as `path`, atomically. A hard link costs no
    copy, and is safe because no backup file is ever modified in place."""
    partial = partial_path(previous)
    if os.path.lexists(partial):
        os.remove(partial)
    try:
        os.link(path, partial)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(path, partial)
        _sync(partial)
    os.replace(partial, previous)


def _pair(backup_dir: str, previous: bool = False) -> Tuple[str, str]:
    """The (weights, metadata) paths of the current or the previous backup."""
    names = (PREVIOUS_WEIGHTS, PREVIOUS_METADATA) if previous else (BACKUP_WEIGHTS,
                                                                     BACKUP_METADATA)
    return tuple(os.path.join(backup_dir, name) for name in names)


def save_backup(model, backup_dir: str, epoch: int, batch: int = 0) -> None:
    """Writes the resume backup of `model` after `epoch` epochs into `backup_dir`.

    The order keeps a complete backup on disk at every moment: the new weights and
    metadata are written in full under temporary names; the current pair, if usable, is
    kept as the previous one; then the new files replace the current ones. Between the
    two renames the current weights and metadata name different epochs, which
    `usable_backups` detects, so the previous pair is used.
    """
    os.makedirs(backup_dir, exist_ok=True)
    weights, metadata = _pair(backup_dir)
    new_weights, new_metadata = partial_path(weights), partial_path(metadata)
    model.save_weights(new_weights)
    with h5py.File(new_weights, "r+") as f:
        f.attrs[EPOCH_ATTRIBUTE] = int(epoch)
    _sync(new_weights)
    with open(new_metadata, "w") as f:
        f.write(json.dumps({"epoch": int(epoch), "batch": int(batch)}))
    _sync(new_metadata)
    # A damaged current pair (one this run fell back from) must not replace a good one.
    if _backup_problem(weights, metadata)[1] is None:
        for path, previous in zip((weights, metadata), _pair(backup_dir, previous=True)):
            _keep_as_previous(path, previous)
    os.replace(new_weights, weights)
    os.replace(new_metadata, metadata)


def _backup_problem(weights: str, metadata: str):
    """(epoch, None) for a usable weights/metadata pair, else (None, what is wrong)."""
    if not os.path.exists(metadata):
        return None, f"{metadata} is missing"
    try:
        with open(metadata) as f:
            epoch = json.load(f)["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch {epoch!r} is not a count of epochs")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        reason = "no 'epoch'" if isinstance(error, (KeyError, TypeError)) else error
        return None, f"{metadata} is not valid backup metadata ({reason})"
    if not os.path.exists(weights):
        return None, f"{weights} is missing"
    try:
        with h5py.File(weights, "r") as f:
            recorded = f.attrs.get(EPOCH_ATTRIBUTE)
    except OSError as error:  # HDF5 detects an empty or truncated file when opening it
        return None, f"{weights} is unreadable ({str(error).splitlines()[0]})"
    # Backups of older kssl versions carry no epoch: their metadata is trusted.
    if recorded is not None and int(recorded) != epoch:
        return None, (f"{weights} holds epoch {int(recorded)} but {metadata} names epoch "
                      f"{epoch} (a save was interrupted)")
    return epoch, None


def usable_backups(backup_dir: str, report: bool = False) -> List[Tuple[str, int]]:
    """The complete backups in `backup_dir`, newest first, as (weights path, epoch); empty
    when there is none (a new run, or one killed before its first save completed).

    A pair is usable when its metadata parses, its weights open as HDF5 (an empty or
    truncated file does not) and the weights' recorded epoch is the metadata's. Raises a
    ConfigError that says how to recover when backups exist but none is usable. With
    `report`, prints why a newer backup is passed over.
    """
    found, problems = [], []
    for previous in (False, True):
        weights, metadata = _pair(backup_dir, previous)
        if not os.path.exists(metadata):
            continue  # weights without metadata were never completed
        epoch, problem = _backup_problem(weights, metadata)
        if problem is None:
            found.append((weights, epoch))
        else:
            problems.append(problem)
    if problems and not found:
        raise ConfigError(
            f"cannot resume the run in {os.path.dirname(backup_dir) or '.'}: "
            f"{'; '.join(problems)}, and there is no other complete backup; delete "
            f"{backup_dir} to train this run again from its first epoch, or pass --overwrite "
            "to start afresh")
    if report and problems and found:
        print(f"kssl: {problems[0]}; resuming from the backup before it (epoch "
              f"{found[0][1]})", flush=True)
    return found


# -- what a run directory holds -----------------------------------------------------------
RUN_TOP_FILES = ("config.gin", "model.weights.h5")
SCORE_FILES = ("metrics.json",)
OTHER_FILES = ("pseudo_label_monitor.json",)
BACKUP_FILES = (BACKUP_WEIGHTS, BACKUP_METADATA, PREVIOUS_WEIGHTS, PREVIOUS_METADATA)
TENSORBOARD_DIRS = ("train", "validation", "pseudo_labels")
PSEUDO_MASK_DIRS = ("pseudo_masks", "pseudo_masks.partial")
RELIABILITY_DIR = "reliability"  # ST++'s prediction snapshots, one pseudo-mask store a step
SNAPSHOT_DIR = re.compile(r"step_\d+(\.partial)?")
STAGE_DIR = re.compile(r"stage_\d+")
EVAL_FILE = re.compile(r"eval_.+\.json")
PSEUDO_MASK_FILE = re.compile(r"\d{6,}\.png|index\.json")


def finished_run(workdir: str) -> bool:
    """Whether `workdir` holds a finished run: kssl writes metrics.json last, after the
    run's config.gin and model.weights.h5, so a metrics.json alone is not one."""
    return all(os.path.isfile(os.path.join(workdir, name))
               for name in ("metrics.json",) + RUN_TOP_FILES)


def _with_partials(names) -> set:
    return set(names) | {os.path.basename(partial_path(name)) for name in names}


def _is_scores(path: str) -> bool:
    """Whether `path` is a scores file kssl wrote (metrics.json, eval_SPLIT.json): a JSON
    object with a mean IoU."""
    try:
        with open(path) as f:
            scores = json.load(f)
        return isinstance(scores, dict) and "mean_iou" in scores
    except (OSError, ValueError, TypeError):
        return False


def _foreign_below(directory: str, relative: str, is_ours) -> List[str]:
    """Entries of `directory` (shown as `relative`/name) for which `is_ours(name, path,
    is_dir)` is false."""
    foreign = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        is_dir = os.path.isdir(path) and not os.path.islink(path)
        if os.path.islink(path) or not is_ours(name, path, is_dir):
            foreign.append(os.path.join(relative, name))
    return foreign


def _pseudo_mask_store(directory: str, relative: str) -> List[str]:
    """What in a pseudo-mask store (`kssl.data.pseudo_masks`) kssl did not write."""
    return _foreign_below(directory, relative,
                          lambda n, p, d: not d and PSEUDO_MASK_FILE.fullmatch(n))


def foreign_files(workdir: str, relative: str = "") -> List[str]:
    """The files and folders in run directory `workdir` that kssl did not write, as paths
    relative to it (a foreign folder is named, not its content), sorted."""
    foreign = []

    def top(name, path, is_dir):
        here = os.path.join(relative, name)
        if is_dir and STAGE_DIR.fullmatch(name):
            foreign.extend(foreign_files(path, here))
        elif is_dir and name == "backup":
            foreign.extend(_foreign_below(
                path, here, lambda n, p, d: not d and n in _with_partials(BACKUP_FILES)))
        elif is_dir and name == "logs":
            for sub in _foreign_below(path, here, lambda n, p, d: d and n in TENSORBOARD_DIRS):
                foreign.append(sub)
            for sub in TENSORBOARD_DIRS:
                if os.path.isdir(os.path.join(path, sub)):
                    foreign.extend(_foreign_below(
                        os.path.join(path, sub), os.path.join(here, sub),
                        lambda n, p, d: not d and n.startswith("events.out.tfevents.")))
        elif is_dir and name in PSEUDO_MASK_DIRS:
            foreign.extend(_pseudo_mask_store(path, here))
        elif is_dir and name == RELIABILITY_DIR:
            foreign.extend(_foreign_below(
                path, here, lambda n, p, d: d and SNAPSHOT_DIR.fullmatch(n)))
            for sub in sorted(os.listdir(path)):
                store = os.path.join(path, sub)
                if (SNAPSHOT_DIR.fullmatch(sub) and os.path.isdir(store)
                        and not os.path.islink(store)):
                    foreign.extend(_pseudo_mask_store(store, os.path.join(here, sub)))
        elif is_dir:
            return False
        elif name in SCORE_FILES or EVAL_FILE.fullmatch(name):
            return _is_scores(path)
        else:
            return name in _with_partials(RUN_TOP_FILES + SCORE_FILES + OTHER_FILES) or (
                name.endswith(".json.partial") and EVAL_FILE.fullmatch(name[:-8]))
        return True

    foreign.extend(_foreign_below(workdir, relative, top))
    return sorted(foreign)


# -- one process at a time ----------------------------------------------------------------
@contextlib.contextmanager
def exclusive_use(workdir: str) -> Iterator[None]:
    """Holds run directory `workdir` (created if missing) for this process while it trains
    there: a second process (a run started again while the first still trains, or a
    training process left behind by a stopped parent) fails at once instead of writing the
    same checkpoints. An advisory lock (`flock`) on the folder itself, so no file is added
    to it, which the operating system releases when the holder exits or is killed: a crash
    never leaves a stale lock. Where the filesystem cannot lock a folder (some network
    filesystems), the run goes on unguarded."""
    os.makedirs(workdir, exist_ok=True)
    if fcntl is None:
        yield
        return
    folder = os.open(workdir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{workdir}: another process is training in this folder (the same run "
                "started twice, or a training process left running by a stopped "
                "bin/benchmark); wait for it or stop it, or pass another --workdir") from None
        except OSError:
            pass  # no folder locks here
        yield
    finally:
        os.close(folder)  # releases the lock


def clear_run_directory(workdir: str) -> None:
    """Deletes everything in `workdir` but keeps the folder, whose lock the process
    clearing it holds (a new folder would let a second process lock it)."""
    for name in os.listdir(workdir):
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
