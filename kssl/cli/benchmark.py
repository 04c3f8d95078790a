"""`bin/benchmark --config F.gin [--table NAME --record BENCHMARKS.md]`.

Trains a config from scratch into a fresh directory, then prints one markdown row with val
mean IoU, per-class IoU, train images/s and wall time, the machine, the date and the exact
command. With `--record`, the row is appended to the named table of that file, so numbers
in BENCHMARKS.md are always pasted by the tool that measured them, never by hand.

`--pipeline_only` trains nothing to the end: it times the config's input pipeline alone,
the training step on it and the step on one fixed batch (`kssl.throughput`), says which
limits, counts the step's FLOPs, and records a row of a different table (default table
name: `step-cost`; the older `pipeline` table of BENCHMARKS.md has no FLOP columns).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import signal
import sys
import time
from typing import Optional

from absl import flags

from kssl.cli import common

flags.DEFINE_multi_string("config", [], "Gin config file(s).")
flags.DEFINE_multi_string("gin_param", [], "Gin binding(s).")
flags.DEFINE_string("workdir", None, "Run directory (default: runs/benchmark-<config>).")
flags.DEFINE_string("table", None, "Name of the table in the --record file to append to.")
flags.DEFINE_string("record", None, "Markdown file holding the table (e.g. BENCHMARKS.md).")
flags.DEFINE_string("label", None, "Row label (default: the method's name).")
flags.DEFINE_bool("pipeline_only", False,
                  "Time the input pipeline alone, the training step on it and the step on "
                  "a fixed batch instead of training the config.")
flags.DEFINE_integer("steps", 50, "--pipeline_only: timed batches and training steps.")
flags.DEFINE_integer("warmup_steps", None,
                     "--pipeline_only: untimed batches (and steps) before each timing "
                     "(default: one pass over the data with pipeline.cache, else 5).")
flags.DEFINE_string("seeds", None,
                    "Comma-separated seeds, e.g. 0,1,2: train the config once per seed "
                    "(train.seed and pipeline.seed) together with its supervised twin "
                    "(the same config with train.method = @Supervised), and record one row "
                    "with the mean and spread of the paired difference. Seed k runs in "
                    "<workdir>/seed_k; a finished seed is reused, an interrupted one resumed.")
flags.DEFINE_bool("curves_only", False,
                  "--seeds: train nothing; print (and with --record, append to the table "
                  "'<table>-curves') the pseudo-label monitor's curves of the seeds of a "
                  "semi-supervised config already finished in --workdir, e.g. for a row "
                  "recorded before its curves were.")
flags.DEFINE_string("twins_dir", os.path.join("runs", "twins"),
                    "--seeds: where supervised twins are kept, one folder per setting, "
                    "shared by every config with the same supervised bindings.")
FLAGS = flags.FLAGS


def machine_description() -> str:
    """CPU model and core count (or the GPU name when one is visible)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"{len(gpus)}x {details.get('device_name', 'GPU')}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {model}"


def stage_summary(stages: dict) -> str:
    """For a staged method: val mIoU after each stage, the pseudo-masks' mIoU on the
    unlabelled pool (and, for filtered masks, the writing network's argmax on every
    unlabelled pixel), and each later stage's step time relative to stage 1's."""

    def step_ms(stage):
        seconds, steps = stage.get("train_seconds"), stage.get("timed_steps")
        return 1000 * seconds / steps if seconds and steps else None

    order = sorted(stages, key=int)
    val = " / ".join(f"{100 * stages[k]['mean_iou']:.1f}" for k in order)
    parts = [f"val mIoU by stage {val}"]
    masks = [stages[k].get("pseudo_masks") or {} for k in order]
    pseudo = [m.get("unlabelled_mean_iou") for m in masks]
    if any(p is not None for p in pseudo):
        parts.append("pseudo-mask mIoU on the unlabelled pool " + " / ".join(
            f"{100 * p:.1f}" for p in pseudo if p is not None))
    # Filtered masks score their kept pixels only; the argmax on every pixel compares stages.
    argmax = [m.get("unlabelled_argmax_mean_iou") for m in masks]
    if any(a is not None and abs(a - p) > 1e-9 for a, p in zip(argmax, pseudo)):
        parts.append("argmax on every unlabelled pixel " + " / ".join(
            f"{100 * a:.1f}" for a in argmax if a is not None))
    times = [step_ms(stages[k]) for k in order]
    if times[0]:
        parts.append("ms/step " + " / ".join("-" if t is None else f"{t:.0f}" for t in times)
                     + " (" + " / ".join("-" if t is None else f"{t / times[0]:.2f}x"
                                         for t in times) + ")")
    return "; ".join(parts)


def peak_memory() -> str:
    """This process's peak memory so far: the host's resident set (model, optimizer
    state, activations, the cached dataset and TF's runtime) and, per GPU, TF's peak
    allocation."""
    parts = [f"host {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"]
    import tensorflow as tf

    for index, _ in enumerate(tf.config.list_logical_devices("GPU")):
        peak = tf.config.experimental.get_memory_info(f"GPU:{index}")["peak"]
        parts.append(f"GPU:{index} {peak / 2**30:.2f} GiB")
    return "peak memory " + ", ".join(parts)


def format_row(label, metrics, class_names, wall_seconds, command, memory=None) -> str:
    """One markdown table row (see the header that `table_header` writes); `memory`
    (e.g. `peak_memory()`) goes into the label's parentheses."""
    details = [stage_summary(metrics["stages"])] if metrics.get("stages") else []
    details += [memory] if memory else []
    if details:
        label = f"{label} ({'; '.join(details)})"
    per_class = metrics.get("per_class_iou") or {}
    classes = " ".join(
        f"{name[:4]} {100 * per_class[name]:.1f}" if per_class.get(name) is not None
        else f"{name[:4]} -" for name in class_names)
    speed = metrics.get("train_images_per_second")
    return (f"| {label} | {metrics['labelled_images']}/{metrics['unlabelled_images']} "
            f"| {metrics['steps']} | {100 * metrics['mean_iou']:.1f} "
            f"| {'-' if speed is None else f'{speed:.1f}'} | {wall_seconds / 60:.1f} | {classes} "
            f"| {machine_description()} | {datetime.date.today().isoformat()} "
            f"| `{command}` |")


def table_header() -> str:
    """The header of a training table (see `format_row`)."""
    return ("| method | labelled/unlabelled | steps | val mIoU (%) | train img/s "
            "| wall (min) | per-class IoU (%) | machine | date | command |\n"
            "|---|---|---|---|---|---|---|---|---|---|")


def pipeline_table_header() -> str:
    """The header of a `--pipeline_only` table (see `pipeline_row`)."""
    return ("| label | images/step (labelled+unlabelled) | pipeline img/s | step img/s "
            "| step img/s, fixed batch | pipeline / step | limited by | timed steps "
            "| ms/step, fixed batch | GFLOP/step | machine | date | command |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def pipeline_row(label, report, command) -> str:
    """One `--pipeline_only` row: a `kssl.throughput.Report` (see `pipeline_table_header`)."""
    return (f"| {label} | {report.labelled_per_step}+{report.unlabelled_per_step} "
            f"| {report.pipeline.images_per_second:.1f} | {report.step.images_per_second:.1f} "
            f"| {report.fixed_batch.images_per_second:.1f} "
            f"| {report.pipeline_over_step:.2f} | {report.limited_by} "
            f"| {report.step.batches} | {report.fixed_batch_ms:.0f} "
            f"| {'-' if report.flops is None else f'{report.flops.gflops:.2f}'} "
            f"| {machine_description()} | {datetime.date.today().isoformat()} | `{command}` |")


def existing_header(path: str, table: str) -> Optional[str]:
    """The header line of the table named `table` in `path`, or None when there is none."""
    if not os.path.exists(path):
        return None
    lines = open(path).read().split(f"<!-- table: {table} -->", 1)
    if len(lines) < 2:
        return None
    after = lines[1].split("\n")
    return after[1] if len(after) > 1 and after[1].startswith("|") else None


def append_row(path: str, table: str, row: str, header: Optional[str] = None) -> None:
    """Appends `row` to the table that follows `<!-- table: NAME -->` in `path`,
    creating the marker and `header` (default: `table_header()`) at the end of the file
    when absent."""
    header = header or table_header()
    marker = f"<!-- table: {table} -->"
    text = open(path).read() if os.path.exists(path) else ""
    if marker not in text:
        text = text.rstrip("\n") + f"\n\n{marker}\n{header}\n{row}\n"
    else:
        head, tail = text.split(marker, 1)
        lines = tail.split("\n")
        # The table is the run of lines starting with '|' right after the marker.
        end = 1
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        if end == 1:
            lines[1:1] = header.split("\n")
            end = 3
        lines.insert(end, row)
        text = head + marker + "\n".join(lines)
    from kssl import run_files

    run_files.write_text(path, text)  # atomically: a kill never halves the file


def check_table(path: str, table: str, header: str) -> None:
    """Raises ConfigError when `table` exists in `path` with other columns than `header`'s."""
    from kssl.config import ConfigError

    existing = existing_header(path, table)
    if existing is not None and existing != header.split("\n")[0]:
        raise ConfigError(f"table {table!r} in {path} has other columns than the rows "
                          "this command records there; choose another --table")


def check_pipeline_table(path: str, table: str) -> None:
    """Raises ConfigError when `table` exists in `path` with other columns than a
    `--pipeline_only` row's (checked before measuring, not after)."""
    check_table(path, table, pipeline_table_header())


def pipeline_main(command: str) -> None:
    """`--pipeline_only`: the three rates of the parsed config, and its row."""
    from kssl import config, throughput

    table = FLAGS.table or "step-cost"
    if FLAGS.record:
        check_pipeline_table(FLAGS.record, table)
    if FLAGS.steps < 1:
        raise config.ConfigError(f"--steps must be at least 1, got {FLAGS.steps}")
    report = config.call_configured(throughput.benchmark_config, FLAGS.steps,
                                    FLAGS.warmup_steps)
    print(throughput.format_report(report))
    row = pipeline_row(FLAGS.label or report.method, report, command)
    print(row)
    if FLAGS.record:
        append_row(FLAGS.record, table, row, pipeline_table_header())
        print(f"kssl: appended to table {table!r} in {FLAGS.record}")


def stop_children_on_sigterm() -> None:
    """Makes SIGTERM (`kill`, a scheduler's stop) end this process through an exception,
    so that `subprocess.run`, interrupted while it waits, kills the training process it
    started instead of leaving it to train on alone; the killed run resumes from its last
    backup when the same command runs again."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def paired_main(command: str) -> None:
    """`--seeds`: each seed of the config and of its supervised twin, and one paired row."""
    from kssl import config, paired, training

    stop_children_on_sigterm()  # each seed trains in a process of its own

    seeds = paired.parse_seeds(FLAGS.seeds)
    workdir = common.parse_run_config(FLAGS.config, FLAGS.gin_param, FLAGS.workdir,
                                      prefix="benchmark-")
    method = paired.configured_method()
    table = FLAGS.table or os.path.splitext(os.path.basename(FLAGS.config[-1]))[0]
    if FLAGS.curves_only:
        if method == paired.SUPERVISED:
            raise ValueError("--curves_only: a supervised config has no pseudo-labels, so "
                             "no curves")
        if FLAGS.record:
            check_table(FLAGS.record, table + "-curves", paired.curve_table_header())
        twin_root = os.path.join(FLAGS.twins_dir,
                                 paired.twin_key(paired.supervised_bindings()))
        twin_dirs = [os.path.join(twin_root, f"seed_{seed}") for seed in seeds]
        twins = None  # the reference target needs every seed's twin
        if all(os.path.exists(os.path.join(d, "metrics.json")) for d in twin_dirs):
            twins = [paired.finished_seed(d, seed) for d, seed in zip(twin_dirs, seeds)]
        else:
            print(f"kssl: no supervised twin reference in the curves: not every seed has a "
                  f"finished twin in {twin_root}", flush=True)
        record_curves(FLAGS.label or method, table, paired.PairedResult(
            method, [paired.finished_seed(os.path.join(workdir, f"seed_{seed}"), seed)
                     for seed in seeds], twins))
        return
    if FLAGS.record:  # before training: a table with other columns would refuse the row
        check_table(FLAGS.record, table, paired.paired_table_header())
        if method != paired.SUPERVISED:
            check_table(FLAGS.record, table + "-curves", paired.curve_table_header())
    bindings = paired.supervised_bindings()
    twin_root = os.path.join(FLAGS.twins_dir, paired.twin_key(bindings))
    os.makedirs(twin_root, exist_ok=True)
    settings_path = os.path.join(twin_root, "supervised_bindings.json")
    if not os.path.exists(settings_path):  # what this twin folder holds, for a reader
        with open(settings_path, "w") as f:
            json.dump(bindings, f, indent=1, sort_keys=True)
    is_twin = method == paired.SUPERVISED
    root = twin_root if is_twin else workdir
    print(f"kssl: {method} with seeds {seeds} in {root}"
          + ("" if is_twin else f"; supervised twins in {twin_root}"), flush=True)
    runs, twins = [], []
    for seed in seeds:
        runs.append(paired.run_seed(FLAGS.config, FLAGS.gin_param,
                                    os.path.join(root, f"seed_{seed}"), seed))
        if not is_twin:
            twins.append(paired.run_seed(
                FLAGS.config, list(FLAGS.gin_param) + ["train.method = @Supervised"],
                os.path.join(twin_root, f"seed_{seed}"), seed))
    result = paired.PairedResult(method, runs, None if is_twin else twins)
    print("kssl: val mean IoU (%), seed by seed\n" + paired.format_comparison(result))
    reader, _, _ = config.call_configured(training.dataset_setup)
    if not is_twin:
        print("kssl: val per class, mean over seeds (IoU %, the paired difference, and the "
              "share of pixels predicted as the class)\n"
              + paired.format_class_changes(result, list(reader.info.class_names)))
    seed_command = paired.quote(paired.train_command(
        FLAGS.config, list(FLAGS.gin_param) + ["train.seed = K", "pipeline.seed = K"],
        os.path.join(root, "seed_K")))
    row = paired.paired_row(FLAGS.label or method, result, list(reader.info.class_names),
                            machine_description(), datetime.date.today().isoformat(),
                            command, seed_command)
    print(row)
    if FLAGS.record:
        append_row(FLAGS.record, table, row, paired.paired_table_header())
        print(f"kssl: appended to table {table!r} in {FLAGS.record}")
    if not is_twin:
        record_curves(FLAGS.label or method, table, result)


def record_curves(label: str, table: str, result) -> None:
    """Prints the pseudo-label monitor's curves of a paired result (mean over its seeds),
    with its twins' own predictions on the monitored images as the reference target
    (`paired.TWIN_TARGET`), and, with --record, appends them to the table
    '<table>-curves' (in one write). Run last: scoring the twins parses their configs."""
    from kssl import paired

    references = None
    if all(run.metrics.get("pseudo_label_monitor") for run in result.runs):
        references = twin_references(result.twins, result.runs)
    if references:
        result = paired.with_twin_reference(result, references)
    rows = paired.curve_rows(label, result)
    if not rows:
        print("kssl: no pseudo-label curves: the seeds' metrics.json hold no monitor "
              "history common to all of them", flush=True)
        return
    print("kssl: pseudo-label curves, mean over seeds\n" + paired.curve_table_header()
          + "\n" + "\n".join(rows))
    if FLAGS.record:
        append_row(FLAGS.record, table + "-curves", "\n".join(rows),
                   paired.curve_table_header())
        print(f"kssl: appended {len(rows)} rows to table {table + '-curves'!r} in "
              f"{FLAGS.record}")


def twin_references(twins, runs):
    """Each twin's monitor scores on the images the method's monitor scored
    (`pseudo_label_monitor.score_network`), or None (no twins, nothing monitored with
    ground truth, or a run whose metrics.json names other monitored images than the
    parsed config gives). Reads the method's parsed config first, then each twin's."""
    import gin

    from kssl import pseudo_label_monitor, training
    from kssl.config import ConfigError
    from kssl.data.readers.base import DataError

    subset = training.monitored_subset() if twins else None
    if subset is None:
        return None
    reader, ids, images, truth, prior = subset
    for run in runs:  # runs trained before the ids were kept have none to compare
        recorded = run.metrics.get("pseudo_label_monitor_ids")
        if recorded is not None and list(recorded) != ids:
            print(f"kssl: no supervised twin reference in the curves: {run.workdir} "
                  "monitored other images than this config's monitor would (another "
                  "pool, count or split?)", flush=True)
            return None
    references = []
    for twin in twins:
        gin.clear_config()  # the twin's own config, nothing left from the method's
        try:
            _, _, network = common.load_trained(twin.workdir)
        except (ConfigError, DataError, FileNotFoundError) as error:
            # The row is recorded by now: the curves go on without the reference.
            print(f"kssl: no supervised twin reference in the curves: {error}", flush=True)
            return None
        references.append(pseudo_label_monitor.score_network(
            network, images, truth, prior, reader.info.class_names))
    return references


@common.guarded
def main(argv):
    del argv
    from kssl import config, training

    command = "bin/benchmark " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if FLAGS.seeds is not None:
        if FLAGS.pipeline_only:
            common.fail("--seeds trains the config; it does not go with --pipeline_only")
        try:
            paired_main(command)
        except (ValueError, RuntimeError) as error:  # bad --seeds, a seed that failed
            if isinstance(error, config.ConfigError):
                raise
            common.fail(str(error))
        return
    if FLAGS.pipeline_only:
        common.parse_run_config(FLAGS.config, FLAGS.gin_param)
        pipeline_main(command)
        return
    if FLAGS["steps"].present or FLAGS["warmup_steps"].present:
        # Not train.steps: a training benchmark takes its steps from the config.
        common.fail("--steps and --warmup_steps go with --pipeline_only; the training "
                    "steps are --gin_param 'train.steps = N'")
    workdir = common.parse_run_config(FLAGS.config, FLAGS.gin_param, FLAGS.workdir,
                                      prefix="benchmark-")
    name = os.path.splitext(os.path.basename(FLAGS.config[-1]))[0]
    start = time.perf_counter()
    metrics = config.call_configured(training.train, workdir, overwrite=True)
    wall = time.perf_counter() - start
    reader, _, _ = training.dataset_setup()
    row = format_row(FLAGS.label or metrics["method"], metrics,
                     list(reader.info.class_names), wall, command, memory=peak_memory())
    print(row)
    if FLAGS.record:
        append_row(FLAGS.record, FLAGS.table or name, row)
        print(f"kssl: appended to table {FLAGS.table or name!r} in {FLAGS.record}")


def run():
    common.run_tool(main, __name__)


if __name__ == "__main__":
    run()
