"""Watching what a semi-supervised method trains on: the pseudo-label monitor.

A teacher's pseudo-labels can drift into a large class long before the validation score
shows it (confirmation bias: a class the teacher favours is admitted more, learnt more,
and favoured more). The monitor makes that visible while it happens. Every N steps (and at
the end of training) it asks the method for the targets its unlabelled loss would train on
for a fixed subset of the unlabelled pool (`SegmentationMethod.pseudo_label_targets`), and
reports for each target:

- `mean_iou`, `accuracy`: the pseudo-labels against the ground truth, where the pool has
  ground truth (CamVid has masks for every training image; without masks these are None);
- `admitted_share`: the share of pixels that pass the method's admission rule (confidence
  threshold), and `admitted_accuracy`, the accuracy of those pixels;
- `class_share`: the class distribution of the admitted pseudo-labels, against the
  labelled images' class prior: `kl_to_prior` = KL(share || prior) and the classes that
  gain and lose most share (in points);
- `prediction_kl_to_prior`: the same KL for every pixel's pseudo-label, admitted or not:
  the drift of the teacher itself, readable even while a high threshold admits almost
  nothing (then the admitted share is a handful of pixels and says little).

The history is logged to TensorBoard (`logs/pseudo_labels`), kept in
`pseudo_label_monitor.json` (rewritten atomically after each measurement, so a resumed run
keeps its curve) and copied into metrics.json; one line per epoch is printed.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import keras
import numpy as np
import tensorflow as tf

from kssl import run_files
from kssl.constants import IGNORE_LABEL

HISTORY_FILE = "pseudo_label_monitor.json"
_EPSILON = 1e-6  # keeps KL finite where a class has no share


def class_shares(labels: np.ndarray, admitted: np.ndarray, num_classes: int) -> np.ndarray:
    """The distribution over classes of the admitted pixels' labels (zeros if none)."""
    counts = np.bincount(labels[admitted].ravel(), minlength=num_classes)[:num_classes]
    total = counts.sum()
    return counts / total if total else counts.astype(np.float64)


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) in nats, both smoothed by a small epsilon and renormalised."""
    p = (np.asarray(p, np.float64) + _EPSILON)
    q = (np.asarray(q, np.float64) + _EPSILON)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def score_targets(labels, admitted, truth, prior, class_names) -> dict:
    """The monitor's numbers for one target on the subset.

    Args:
      labels: int [N, H, W] pseudo-labels.
      admitted: bool [N, H, W], the pixels the method's loss admits.
      truth: int [N, H, W] ground truth with IGNORE_LABEL, or None.
      prior: [C] class distribution of the labelled masks.
      class_names: C names.
    Returns:
      a dict of plain floats (see the module docstring).
    """
    from kssl import evaluation

    labels = np.asarray(labels, np.int64)
    admitted = np.asarray(admitted, bool)
    num_classes = len(class_names)
    share = class_shares(labels, admitted, num_classes)
    difference = share - np.asarray(prior, np.float64)
    order = np.argsort(difference)
    out = {
        "admitted_share": float(admitted.mean()),
        "class_share": {name: float(s) for name, s in zip(class_names, share)},
        "kl_to_prior": kl_divergence(share, prior),
        "prediction_kl_to_prior": kl_divergence(
            class_shares(labels, np.ones_like(admitted), num_classes), prior),
        "most_gained": [class_names[order[-1]], float(100 * difference[order[-1]])],
        "most_lost": [class_names[order[0]], float(100 * difference[order[0]])],
        "mean_iou": None, "accuracy": None, "admitted_accuracy": None,
    }
    if truth is not None:
        truth = np.asarray(truth, np.int64)
        valid = truth != IGNORE_LABEL
        cm = evaluation.confusion_from_labels(truth[valid], labels[valid], num_classes)
        out["mean_iou"] = evaluation.mean_iou_from_confusion(cm)
        out["accuracy"] = evaluation.pixel_accuracy_from_confusion(cm)
        kept = valid & admitted
        out["admitted_accuracy"] = (float((labels[kept] == truth[kept]).mean())
                                    if kept.any() else None)
    return out


def format_line(step: int, name: str, scores: dict) -> str:
    """One progress line for one target."""
    parts = [f"pseudo-labels ({name}) at step {step}:"]
    if scores["mean_iou"] is not None:
        parts.append(f"mIoU {100 * scores['mean_iou']:.1f}, accuracy "
                     f"{100 * scores['accuracy']:.1f},")
    parts.append(f"admitted {100 * scores['admitted_share']:.1f}%")
    if scores["admitted_accuracy"] is not None:
        parts.append(f"(accuracy {100 * scores['admitted_accuracy']:.1f})")
    if scores["admitted_share"]:
        gained, lost = scores["most_gained"], scores["most_lost"]
        admitted = (f" {scores['kl_to_prior']:.3f} admitted: {gained[0]} {gained[1]:+.1f} "
                    f"pts, {lost[0]} {lost[1]:+.1f} pts")
    else:
        # No admitted pixel: their class shares, and what they gain or lose against the
        # prior, are not defined.
        admitted = ": none admitted"
    parts.append(f"| KL to the labelled prior{admitted}; "
                 f"{scores['prediction_kl_to_prior']:.3f} all pixels")
    return " ".join(parts)


class PseudoLabelMonitor(keras.callbacks.Callback):
    """Scores the method's pseudo-label targets on a fixed subset during `fit`.

    Args:
      images: float32 [N, H, W, 3] unlabelled images (the subset).
      truth: int [N, H, W] their ground truth, or None.
      partners: float32 [N, H, W, 3] labelled images, one per unlabelled image, for methods
        whose targets mix in a labelled image (GuidedMix's paper recipe); or None.
      prior: [C] the labelled masks' class distribution.
      class_names: C names.
      every_steps: measure after every this many optimizer steps (and at the end).
      directory: where the history file and the TensorBoard logs go (None: nowhere).
      batch_size: images per forward pass.
      ids: the example ids of the subset (kept in metrics.json, so that a later scoring
        of other networks on "the monitored images" can check it has the same ones).
    """

    def __init__(self, images, truth, partners, prior, class_names, every_steps: int,
                 directory: Optional[str] = None, batch_size: int = 4, verbose: bool = True,
                 ids: Optional[List[str]] = None):
        super().__init__()
        self.images = images
        self.ids = None if ids is None else list(ids)
        self.truth = truth
        self.partners = partners
        self.prior = np.asarray(prior, np.float64)
        self.class_names = list(class_names)
        self.every_steps = int(every_steps)
        self.directory = directory
        self.batch_size = batch_size
        self.verbose = verbose
        self.history: Dict[str, List[dict]] = self._load()
        self.active = True
        self._writer = None

    # -- storage ----------------------------------------------------------------------
    def _path(self):
        return None if self.directory is None else os.path.join(self.directory, HISTORY_FILE)

    def _load(self) -> Dict[str, List[dict]]:
        path = self._path()
        if path is None or not os.path.exists(path):
            return {}
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}  # a history is a log, not state: start it again rather than fail

    def _save(self):
        path = self._path()
        if path is not None:
            run_files.write_text(path, json.dumps(self.history, indent=1))

    # -- measuring --------------------------------------------------------------------
    def targets(self):
        """name -> (labels [N,H,W], admitted [N,H,W]) over the subset, from the method."""
        out: Dict[str, list] = {}
        for start in range(0, len(self.images), self.batch_size):
            images = tf.convert_to_tensor(self.images[start:start + self.batch_size])
            partners = (None if self.partners is None else
                        tf.convert_to_tensor(self.partners[start:start + self.batch_size]))
            for name, (labels, admitted) in self.model.pseudo_label_targets(
                    images, partners).items():
                labels = np.asarray(labels)
                admitted = (np.ones(labels.shape, bool) if admitted is None
                            else np.asarray(admitted, bool))
                out.setdefault(name, []).append((labels, admitted))
        return {name: (np.concatenate([p[0] for p in parts]),
                       np.concatenate([p[1] for p in parts])) for name, parts in out.items()}

    def measure(self, step: int) -> Dict[str, dict]:
        """Scores every target at `step`, records and logs it; {} for a method without
        pseudo-labels (the monitor then stays silent)."""
        targets = self.targets()
        if not targets:
            self.active = False
            return {}
        scores = {}
        for name, (labels, admitted) in targets.items():
            scores[name] = score_targets(labels, admitted, self.truth, self.prior,
                                         self.class_names)
            entries = self.history.setdefault(name, [])
            entries[:] = [e for e in entries if e["step"] < step]  # a resumed run redoes
            entries.append({"step": step, **scores[name]})
        self._save()
        self._log(step, scores)
        return scores

    def _log(self, step, scores):
        if self.directory is None:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.directory, "logs", "pseudo_labels"))
        with self._writer.as_default(step=step):
            for name, values in scores.items():
                for key in ("mean_iou", "accuracy", "admitted_share", "admitted_accuracy",
                            "kl_to_prior", "prediction_kl_to_prior"):
                    if values.get(key) is not None:
                        tf.summary.scalar(f"{name}/{key}", values[key])
                for cls, share in values["class_share"].items():
                    tf.summary.scalar(f"{name}/share/{cls}", share)
        self._writer.flush()

    # -- Keras hooks ------------------------------------------------------------------
    def _step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        if self.active and self.every_steps > 0:
            step = self._step()
            if step % self.every_steps == 0:
                self.measure(step)

    def on_epoch_end(self, epoch, logs=None):
        if not (self.active and self.verbose):
            return
        for name, entries in self.history.items():
            if entries:
                print("kssl: " + format_line(entries[-1]["step"], name, entries[-1]),
                      flush=True)

    def on_train_end(self, logs=None):
        if not self.active:
            return
        step = self._step()
        if not any(e["step"] == step for entries in self.history.values() for e in entries):
            self.measure(step)


def summary(history: Dict[str, List[dict]]) -> dict:
    """What metrics.json keeps of a history: every entry of every target."""
    return {name: list(entries) for name, entries in history.items()}


def subset_ids(examples, count: int) -> list:
    """The ids of `count` examples spread evenly over the list (the monitored subset)."""
    stride = max(1, len(examples) // max(count, 1))
    return list(examples.ids[::stride][:count])


def load_subset(reader, examples, count: int, size=None, with_masks: bool = False):
    """`count` examples spread evenly over the list (a sorted pool holds whole video
    sequences in turn), as stacked arrays: (float32 images [N, H, W, 3], int masks
    [N, H, W] or None). Every image is resized to `size` (height, width), or to the first
    image's size when None, so that the subset stacks into one array."""
    from kssl.data import transforms

    chosen = examples.select(subset_ids(examples, count))
    images, masks = [], []
    for example in reader.load(chosen, with_masks=with_masks):
        if size is None:
            size = tuple(int(d) for d in example["image"].shape[:2])
        example = transforms.resize(example, size)
        images.append(example["image"].numpy().astype(np.float32))
        if with_masks:
            masks.append(example["mask"].numpy().astype(np.int64))
    return np.stack(images), (np.stack(masks) if with_masks else None)


def score_network(network, images, truth, prior, class_names, batch_size: int = 8) -> dict:
    """The monitor's numbers (`score_targets`) for `network`'s own argmax on the subset,
    every pixel admitted, predicted in inference mode: what a supervised network would
    teach on the same images, the reference for a method's pseudo-labels."""
    labels = np.concatenate([
        np.argmax(np.asarray(network(images[start:start + batch_size], training=False)), -1)
        for start in range(0, len(images), batch_size)])
    return score_targets(labels, np.ones(labels.shape, bool), truth, prior, class_names)


def labelled_prior(class_pixels) -> np.ndarray:
    """The labelled masks' class distribution from per-class pixel counts."""
    counts = np.asarray(class_pixels, np.float64)
    return counts / max(counts.sum(), 1.0)
