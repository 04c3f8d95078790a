"""Paired-seed comparisons: a method against its supervised twin, seed by seed.

One seed of a semi-supervised method against one seed of supervised training is an
anecdote: two supervised seeds of the same config can differ by a point of mIoU. A claim
of gain therefore compares each seed of the method with the *twin* run of the same seed
(the same config with `train.method = @Supervised`: same network, data, labelled split,
schedule and seed) and looks at the distribution of the paired differences.

Twin runs depend only on the bindings a supervised run reads, so they are stored once per
distinct setting under `twins_dir/<key>/seed_<k>` and reused by every method whose config
shares those bindings (a ClassMix and an MKD config on the same data share one twin).
`twin_key` is that setting's name: a hash of the bindings with everything a supervised run
ignores left out (method classes and their augmentations, stage-scoped bindings, the
unlabelled pool and batch, logging options, seeds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

SUPERVISED = "Supervised"
# The curves' reference target: the supervised twin's own argmax on the monitored images.
TWIN_TARGET = "supervised twin"
# Bindings a supervised run never reads, or that do not change what it learns.
_IGNORED_PARAMETERS = {
    "train": {"method", "seed", "verbose", "overwrite", "eval_every_epochs", "start_stage"},
    "pipeline": {"unlabelled_batch_size", "unlabelled_views", "unlabelled_padding", "seed"},
    "labels": {"unlabelled_file"},
}
_IGNORED_CONFIGURABLES = {"unlabelled"}
_IGNORED_MODULES = ("kssl.methods", "kssl.augment")


def seed_bindings(seed: int) -> List[str]:
    """The bindings that make one seed of a run (weights, shuffling and augmentation)."""
    return [f"train.seed = {seed}", f"pipeline.seed = {seed}"]


def parse_seeds(text: str) -> List[int]:
    """'0,1,2' -> [0, 1, 2]; raises ValueError naming the text otherwise."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, e.g. 0,1,2; "
                         f"got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds must list distinct non-negative integers; got {text!r}")
    return seeds


def configured_method() -> str:
    """The name of the method class the parsed config trains (`train.method`)."""
    import gin

    try:
        method = gin.query_parameter("train.method")
    except ValueError:
        return SUPERVISED  # train's default
    return getattr(method, "selector", str(method)).split(".")[-1].lstrip("@")


def supervised_bindings() -> Dict[str, dict]:
    """The parsed config's bindings that a supervised run reads, by short configurable
    name (e.g. {"pipeline": {"batch_size": 8, ...}}), values as their gin text."""
    import gin

    kept: Dict[str, dict] = {}
    for (scope, selector), parameters in gin.config._CONFIG.items():
        if scope or selector.startswith(_IGNORED_MODULES):
            continue
        name = selector.split(".")[-1]
        if name in _IGNORED_CONFIGURABLES:
            continue
        ignored = _IGNORED_PARAMETERS.get(name, set())
        values = {key: repr(value) for key, value in parameters.items() if key not in ignored}
        if values:
            kept.setdefault(name, {}).update(values)
    return kept


def twin_key(bindings: Dict[str, dict]) -> str:
    """A short stable name for a supervised setting (hash of its sorted bindings)."""
    text = json.dumps(bindings, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclasses.dataclass
class SeedRun:
    """One finished run of one seed."""
    seed: int
    workdir: str
    metrics: dict

    @property
    def mean_iou(self) -> float:
        return float(self.metrics["mean_iou"])

    @property
    def train_minutes(self) -> Optional[float]:
        """Training time of the whole run (scaled from the timed steps when a resumed run
        timed only its last part)."""
        seconds, timed = self.metrics.get("train_seconds"), self.metrics.get("timed_steps")
        steps = self.metrics.get("steps")
        if not seconds or not timed or not steps:
            return None
        return seconds * steps / timed / 60.0


def train_command(config_files: Sequence[str], bindings: Sequence[str], workdir: str) -> List[str]:
    """The bin/train command line (as a list) of one run."""
    command = ["bin/train"]
    for path in config_files:
        command += ["--config", path]
    for binding in bindings:
        command += ["--gin_param", binding]
    return command + ["--workdir", workdir]


def quote(command: Sequence[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)


def run_seed(config_files, bindings, workdir: str, seed: int) -> SeedRun:
    """Trains (or resumes, or reuses when finished) one seed in a fresh process, so every
    run starts from a clean gin and TensorFlow state; returns its metrics."""
    metrics_path = os.path.join(workdir, "metrics.json")
    if not os.path.exists(metrics_path):
        command = train_command(config_files, list(bindings) + seed_bindings(seed), workdir)
        print(f"kssl: seed {seed}: {quote(command)}", flush=True)
        result = subprocess.run([sys.executable, "-m", "kssl.cli.train"] + command[1:])
        if result.returncode != 0 or not os.path.exists(metrics_path):
            raise RuntimeError(f"seed {seed} failed (exit {result.returncode}); its log is "
                               f"above, and the same command resumes it: {quote(command)}")
    else:
        print(f"kssl: seed {seed}: reusing the finished run in {workdir}", flush=True)
    return finished_seed(workdir, seed)


def finished_seed(workdir: str, seed: int) -> SeedRun:
    """The finished run of one seed in `workdir`; ValueError naming the folder when it has
    no metrics.json (the run never finished)."""
    metrics_path = os.path.join(workdir, "metrics.json")
    if not os.path.exists(metrics_path):
        raise ValueError(f"{metrics_path}: not found; seed {seed} has not finished")
    with open(metrics_path) as f:
        return SeedRun(seed, workdir, json.load(f))


def mean_and_sd(values: Sequence[float]):
    """(mean, sample standard deviation); the deviation is nan for one value."""
    values = np.asarray(values, np.float64)
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return float(np.mean(values)), sd


def is_gain(differences: Sequence[float]) -> bool:
    """A gain: at least two seeds and a mean paired difference above twice its sample
    standard deviation (and above zero)."""
    mean, sd = mean_and_sd(differences)
    return len(differences) > 1 and mean > 0 and mean > 2 * sd


@dataclasses.dataclass
class PairedResult:
    """Seeds of a method and, when it is not supervised, of its twin."""
    method: str
    runs: List[SeedRun]
    twins: Optional[List[SeedRun]] = None

    @property
    def differences(self) -> Optional[List[float]]:
        if self.twins is None:
            return None
        return [run.mean_iou - twin.mean_iou for run, twin in zip(self.runs, self.twins)]

    def per_class_mean(self, class_names) -> Dict[str, Optional[float]]:
        """Each class's IoU averaged over the seeds (None where a run has no value)."""
        out = {}
        for name in class_names:
            values = [(run.metrics.get("per_class_iou") or {}).get(name) for run in self.runs]
            out[name] = None if any(v is None for v in values) else float(np.mean(values))
        return out


def _pm(mean: float, sd: float, scale: float = 100.0, digits: int = 1,
        signed: bool = False) -> str:
    """'mean ± sd' scaled, or the mean alone when the sd is nan (one seed)."""
    sign = "+" if signed else ""
    text = f"{scale * mean:{sign}.{digits}f}"
    return text if math.isnan(sd) else f"{text} ± {scale * sd:.{digits}f}"


def paired_table_header() -> str:
    """The header of a paired-seed table (see `paired_row`)."""
    return ("| method | labelled/unlabelled | steps | seeds | val mIoU (%) | twin mIoU (%) "
            "| paired difference | verdict | per-class IoU, mean over seeds (%) "
            "| train img/s | train (min/seed) | machine | date | command |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def paired_row(label: str, result: PairedResult, class_names, machine: str, date: str,
               command: str, seed_command: str) -> str:
    """One markdown row: mean ± sample sd over seeds of the method, of its twin and of the
    paired difference, the verdict, per-class means, speed and the commands."""
    first = result.runs[0].metrics
    seeds = ",".join(str(run.seed) for run in result.runs)
    mious = [run.mean_iou for run in result.runs]
    per_seed = " / ".join(f"{100 * m:.1f}" for m in mious)
    if result.twins is None:
        twin_text, diff_text, verdict = "(is the twin)", "-", "-"
    else:
        twin_text = _pm(*mean_and_sd([t.mean_iou for t in result.twins]))
        diffs = result.differences
        diff_text = _pm(*mean_and_sd(diffs)) + " (" + " / ".join(
            f"{100 * d:+.1f}" for d in diffs) + ")"
        verdict = "gain" if is_gain(diffs) else (
            "one seed" if len(diffs) < 2 else "no clear gain")
    per_class = result.per_class_mean(class_names)
    classes = " ".join(f"{name[:4]} {'-' if v is None else f'{100 * v:.1f}'}"
                       for name, v in per_class.items())
    speeds = [r.metrics.get("train_images_per_second") for r in result.runs]
    speeds = [s for s in speeds if s]
    minutes = [r.train_minutes for r in result.runs]
    minutes = [m for m in minutes if m]
    return (f"| {label} (per seed {per_seed}) "
            f"| {first['labelled_images']}/{first['unlabelled_images']} | {first['steps']} "
            f"| {seeds} | {_pm(*mean_and_sd(mious))} | {twin_text} | {diff_text} | {verdict} "
            f"| {classes} | {'-' if not speeds else f'{np.mean(speeds):.1f}'} "
            f"| {'-' if not minutes else f'{np.mean(minutes):.1f}'} | {machine} | {date} "
            f"| `{command}`; seed k alone: `{seed_command}` |")


def format_comparison(result: PairedResult) -> str:
    """The val mIoU of each seed side by side: the twin, the method and their difference,
    then the mean (and sample standard deviation over two or more seeds)."""
    if result.twins is None:
        lines = ["seed  Supervised"] + [f"{r.seed:<4}  {100 * r.mean_iou:10.1f}"
                                        for r in result.runs]
        mean, sd = mean_and_sd([r.mean_iou for r in result.runs])
        lines.append(f"mean  {100 * mean:10.1f}" + ("" if math.isnan(sd)
                                                    else f"  (sd {100 * sd:.1f})"))
        return "\n".join(lines)
    width = max(len(result.method), 10)
    lines = [f"seed  {'Supervised':>10}  {result.method:>{width}}  difference"]
    for run, twin, diff in zip(result.runs, result.twins, result.differences):
        lines.append(f"{run.seed:<4}  {100 * twin.mean_iou:10.1f}  "
                     f"{100 * run.mean_iou:{width}.1f}  {100 * diff:+10.1f}")
    twin_mean, _ = mean_and_sd([t.mean_iou for t in result.twins])
    run_mean, _ = mean_and_sd([r.mean_iou for r in result.runs])
    diff_mean, diff_sd = mean_and_sd(result.differences)
    lines.append(f"mean  {100 * twin_mean:10.1f}  {100 * run_mean:{width}.1f}  "
                 f"{100 * diff_mean:+10.1f}" + ("" if math.isnan(diff_sd)
                                                else f"  (sd {100 * diff_sd:.1f})"))
    return "\n".join(lines)


def _predicted_shares(run: SeedRun) -> Optional[np.ndarray]:
    """[C] share of the scored pixels each class is predicted on (the confusion matrix's
    column sums: rows are the true classes), or None without a confusion matrix."""
    matrix = run.metrics.get("confusion_matrix")
    if matrix is None:
        return None
    matrix = np.asarray(matrix, np.float64)
    return matrix.sum(0) / max(matrix.sum(), 1.0)


def format_class_changes(result: PairedResult, class_names) -> str:
    """Per class, mean over seeds: the twin's and the method's val IoU, their paired
    difference (± sample sd over two or more seeds), and the share of the val pixels each
    predicts as the class against its true share: where a gain comes from, and which
    class a method over- or under-predicts. Needs the twins (a semi-supervised result)."""
    if result.twins is None:
        raise ValueError("per-class changes compare a method with its twins; this result "
                         "has none")
    lines = [f"{'class':<12} {'twin IoU':>9} {'IoU':>6} {'difference':>13} "
             f"{'twin pred %':>12} {'pred %':>7} {'true %':>7}"]
    twin_shares = [_predicted_shares(t) for t in result.twins]
    run_shares = [_predicted_shares(r) for r in result.runs]
    have_shares = all(x is not None for x in twin_shares + run_shares)
    if have_shares:
        matrix = np.asarray(result.runs[0].metrics["confusion_matrix"], np.float64)
        true_shares = matrix.sum(1) / max(matrix.sum(), 1.0)
    for index, name in enumerate(class_names):
        twin_iou = [(t.metrics.get("per_class_iou") or {}).get(name) for t in result.twins]
        run_iou = [(r.metrics.get("per_class_iou") or {}).get(name) for r in result.runs]
        if any(v is None for v in twin_iou + run_iou):
            ious = f"{'-':>9} {'-':>6} {'-':>13}"
        else:
            diffs = [r - t for r, t in zip(run_iou, twin_iou)]
            diff = _pm(*mean_and_sd(diffs), signed=True)
            ious = (f"{100 * np.mean(twin_iou):9.1f} {100 * np.mean(run_iou):6.1f} "
                    f"{diff:>13}")
        if have_shares:
            shares = (f"{100 * np.mean([x[index] for x in twin_shares]):12.1f} "
                      f"{100 * np.mean([x[index] for x in run_shares]):7.1f} "
                      f"{100 * true_shares[index]:7.1f}")
        else:
            shares = f"{'-':>12} {'-':>7} {'-':>7}"
        lines.append(f"{name[:12]:<12} {ious} {shares}")
    return "\n".join(lines)


# -- the pseudo-label monitor's curves over seeds ------------------------------------------
CURVE_POINTS = 5  # monitored steps per target in a recorded curve: first, ..., last


def curve_table_header() -> str:
    """The header of a pseudo-label curve table (see `curve_rows`)."""
    return ("| method | seeds | target | step | pseudo-label mIoU (%) | accuracy (%) "
            "| admitted (%) | admitted accuracy (%) | KL to the prior, admitted "
            "| KL to the prior, all pixels | share gained most, lost most (points, by seed) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")


def _mean_sd_text(values, scale: float, digits: int) -> str:
    """'m ± sd' of the values that are not None ('-' when a seed has none)."""
    if any(v is None for v in values):
        return "-"
    return _pm(*mean_and_sd(values), scale, digits)


def curve_steps(steps: Sequence[int], points: int = CURVE_POINTS) -> List[int]:
    """At most `points` of the sorted `steps`, evenly spread, always the first and last."""
    steps = sorted(steps)
    if len(steps) <= points:
        return steps
    picks = np.unique(np.round(np.linspace(0, len(steps) - 1, points)).astype(int))
    return [steps[i] for i in picks]


def with_twin_reference(result: PairedResult, references) -> PairedResult:
    """`result` with, in each seed's monitor history, one more target, TWIN_TARGET, at
    that seed's last monitored step: `references[i]`, the monitor's scores of seed i's
    supervised twin network on the same monitored images
    (`pseudo_label_monitor.score_network`). `curve_rows` then shows the pseudo-labels next
    to what supervised training alone predicts there. A seed without a history, or
    whose reference is None, is left as it is."""
    runs = []
    for run, reference in zip(result.runs, references):
        history = dict(run.metrics.get("pseudo_label_monitor") or {})
        if history and reference is not None:
            last = max(entry["step"] for entries in history.values() for entry in entries)
            history[TWIN_TARGET] = [dict(reference, step=last)]
        runs.append(dataclasses.replace(
            run, metrics=dict(run.metrics, pseudo_label_monitor=history)))
    return dataclasses.replace(result, runs=runs)


def curve_rows(label: str, result: PairedResult, points: int = CURVE_POINTS) -> List[str]:
    """Markdown rows of the pseudo-label monitor's history (`kssl.pseudo_label_monitor`)
    of every seed of `result`: per target and monitored step (steps every seed has, at
    most `points` of them), the mean ± sample sd over seeds of each score, and each
    seed's most gained and most lost share of the admitted pseudo-labels against the
    labelled prior ('-' and 'none admitted' where a seed admits nothing). Only targets
    and steps that every seed has count, so [] when one seed has no history."""
    histories = [run.metrics.get("pseudo_label_monitor") or {} for run in result.runs]
    seeds = ",".join(str(run.seed) for run in result.runs)
    targets = [name for name in histories[0] if all(name in h for h in histories)]
    rows = []
    for target in targets:
        by_step = [{entry["step"]: entry for entry in h[target]} for h in histories]
        common = set(by_step[0]).intersection(*by_step[1:])
        for step in curve_steps(common, points):
            entries = [steps[step] for steps in by_step]

            def column(key, scale=100.0, digits=1):
                return _mean_sd_text([e.get(key) for e in entries], scale, digits)

            # Where a seed admits nothing, its admitted class shares are not defined.
            none_admitted = [not e.get("admitted_share") for e in entries]
            kl_admitted = _mean_sd_text([None if empty else e["kl_to_prior"]
                                         for e, empty in zip(entries, none_admitted)], 1.0, 3)
            moves = " / ".join(
                "none admitted" if empty else
                f"{e['most_gained'][0]} {e['most_gained'][1]:+.1f}, "
                f"{e['most_lost'][0]} {e['most_lost'][1]:+.1f}"
                for e, empty in zip(entries, none_admitted))
            rows.append(
                f"| {label} | {seeds} | {target} | {step} | {column('mean_iou')} "
                f"| {column('accuracy')} | {column('admitted_share')} "
                f"| {column('admitted_accuracy')} "
                f"| {kl_admitted} | {column('prediction_kl_to_prior', 1.0, 3)} "
                f"| {moves} |")
    return rows
