"""Paired-seed benchmarking: twin identity, statistics of the paired differences, the
recorded row, and bin/benchmark --seeds reusing finished seeds."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kssl import config, paired
from kssl import training  # noqa: F401  (registers the configurables)
from tiny import REPO, run_tool, table_cells

NAMES = ["Sky", "Road"]


def seed_run(seed, miou, sky, speed=20.0):
    return paired.SeedRun(seed, f"w/seed_{seed}", {
        "mean_iou": miou, "labelled_images": 23, "unlabelled_images": 344, "steps": 2000,
        "per_class_iou": {"Sky": sky, "Road": None}, "train_images_per_second": speed,
        "train_seconds": 600.0, "timed_steps": 1000})


def test_row_reports_mean_and_sample_sd_of_the_paired_differences():
    runs = [seed_run(0, 0.40, 0.9), seed_run(1, 0.43, 0.8), seed_run(2, 0.41, 0.7)]
    twins = [seed_run(0, 0.37, 0.9), seed_run(1, 0.38, 0.8), seed_run(2, 0.38, 0.7)]
    result = paired.PairedResult("ClassMix", runs, twins)
    row = paired.paired_row("ClassMix", result, NAMES, "cpu", "2026-12-06", "bin/benchmark x",
                            "bin/train y")
    values = table_cells(row)
    assert len(values) == len(table_cells(paired.paired_table_header().splitlines()[0]))
    diffs = np.array([0.03, 0.05, 0.03]) * 100
    assert values[0] == "ClassMix (per seed 40.0 / 43.0 / 41.0)"
    assert values[3] == "0,1,2"
    m = np.array([40.0, 43.0, 41.0])
    assert values[4] == f"{m.mean():.1f} ± {m.std(ddof=1):.1f}"
    t = np.array([37.0, 38.0, 38.0])
    assert values[5] == f"{t.mean():.1f} ± {t.std(ddof=1):.1f}"
    assert values[6] == f"{diffs.mean():.1f} ± {diffs.std(ddof=1):.1f} (+3.0 / +5.0 / +3.0)"
    assert values[7] == "gain"  # 3.67 > 2 * 1.15
    assert values[8] == "Sky 80.0 Road -"
    assert values[10] == "20.0"  # 600 s for 1000 of 2000 steps -> 20 min
    assert values[-1] == "`bin/benchmark x`; seed k alone: `bin/train y`"


def test_verdict_needs_two_seeds_and_twice_the_spread():
    assert not paired.is_gain([0.05])
    assert paired.is_gain([0.03, 0.031])
    assert not paired.is_gain([0.03, -0.01])  # mean 0.01, sd 0.028
    assert not paired.is_gain([-0.03, -0.031])
    mean, sd = paired.mean_and_sd([0.03, -0.01])
    assert mean == pytest.approx(0.01) and sd == pytest.approx(np.std([0.03, -0.01], ddof=1))


@pytest.mark.parametrize("text", ["0,a", "", "1,1", "-1"])
def test_bad_seed_lists_are_named(text):
    with pytest.raises(ValueError, match="--seeds"):
        paired.parse_seeds(text)


def key_of(files, bindings=()):
    import gin

    gin.clear_config()
    config.parse([os.path.join(REPO, f) for f in files], list(bindings))
    key = paired.twin_key(paired.supervised_bindings())
    gin.clear_config()
    return key


def test_methods_on_the_same_data_share_one_twin():
    supervised = key_of(["configs/supervised_camvid_lite0.gin"])
    assert key_of(["configs/classmix_camvid_lite0.gin"]) == supervised
    assert key_of(["configs/mkd_camvid_lite0.gin"]) == supervised
    # UniMatch's two views per unlabelled image change only the unlabelled stream.
    assert key_of(["configs/unimatch_camvid_lite0.gin"]) == supervised
    # GuidedMix's paper recipe trains its own network (psp_unet): another twin.
    assert key_of(["configs/guidedmix_camvid_lite0.gin"]) != supervised
    assert key_of(["configs/supervised_camvid_lite0.gin"], ["train.seed = 5"]) == supervised
    assert key_of(["configs/supervised_camvid_lite0.gin"], ["train.steps = 1000"]) != supervised
    assert key_of(["configs/supervised_camvid_lite0.gin"],
                  ["labels.split_file = None"]) != supervised


def write_finished(workdir, seed, miou, monitor=None):
    os.makedirs(workdir, exist_ok=True)
    extra = {} if monitor is None else {"pseudo_label_monitor": monitor}
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump({**extra, "mean_iou": miou, "labelled_images": 8, "unlabelled_images": 16,
                   "steps": 6, "per_class_iou": {"background": miou, "square": miou,
                                                 "circle": miou},
                   "train_images_per_second": 10.0, "train_seconds": 1.0,
                   "timed_steps": 5, "seed": seed}, f)


def test_benchmark_seeds_pairs_finished_runs_and_records_one_row(tmp_path):
    """Finished seeds (method and twin) are reused, not retrained; the recorded row holds
    the paired statistics of their metrics."""
    from tiny import TINY_SHAPES_CONFIG

    cfg = tmp_path / "tiny_classmix.gin"
    cfg.write_text(TINY_SHAPES_CONFIG + "train.method = @ClassMix\ntrain.steps = 6\n"
                   "train.steps_per_epoch = 3\n")
    import gin

    config.parse([str(cfg)])
    key = paired.twin_key(paired.supervised_bindings())
    gin.clear_config()
    workdir, twins = tmp_path / "run", tmp_path / "twins"
    for seed, (m, t) in enumerate([(0.50, 0.40), (0.56, 0.44)]):
        write_finished(str(workdir / f"seed_{seed}"), seed, m)
        write_finished(str(twins / key / f"seed_{seed}"), seed, t)
    record = tmp_path / "B.md"
    result = run_tool("benchmark", "--config", str(cfg), "--seeds", "0,1", "--workdir",
                      str(workdir), "--twins_dir", str(twins), "--record", str(record),
                      "--table", "t", cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("reusing the finished run") == 4
    table = result.stdout.split("seed by seed\n", 1)[1].splitlines()
    assert table[1].split() == ["0", "40.0", "50.0", "+10.0"]
    assert table[3].split()[:4] == ["mean", "42.0", "53.0", "+11.0"]
    per_class = result.stdout.split("predicted as the class)\n", 1)[1].splitlines()
    assert per_class[1].split() == ["background", "42.0", "53.0", "+11.0", "±",
                                    f"{np.std([10.0, 12.0], ddof=1):.1f}", "-", "-", "-"]
    row = [line for line in record.read_text().splitlines() if line.startswith("| ClassMix")]
    values = table_cells(row[0])
    assert values[4] == f"53.0 ± {np.std([50.0, 56.0], ddof=1):.1f}"
    assert values[6] == f"11.0 ± {np.std([10.0, 12.0], ddof=1):.1f} (+10.0 / +12.0)"
    assert values[7] == "gain"  # 11 > 2 * 1.41


def test_benchmark_seeds_rejects_a_bad_list(tmp_path):
    result = run_tool("benchmark", "--config", os.path.join(REPO, "configs", "quickstart.gin"),
                      "--seeds", "0,x", cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --seeds")


def monitor_entry(step, miou, admitted, kl, gained=("Road", 5.0), lost=("Sky", -5.0)):
    return {"step": step, "mean_iou": miou, "accuracy": 0.8, "admitted_share": admitted,
            "admitted_accuracy": None if admitted == 0 else 0.9, "kl_to_prior": kl,
            "prediction_kl_to_prior": 0.1, "most_gained": list(gained),
            "most_lost": list(lost)}


def test_curve_steps_spread_evenly_with_the_first_and_last():
    steps = [250 * k for k in range(1, 9)]
    # Indices round(linspace(0, 7, 5)) = 0, 1.75, 3.5, 5.25, 7 -> 0, 2, 4, 5, 7.
    assert paired.curve_steps(steps) == [250, 750, 1250, 1500, 2000]
    assert paired.curve_steps([500, 250]) == [250, 500]


def test_curve_rows_average_the_seeds_step_by_step():
    older = monitor_entry(500, 0.44, 0.7, 0.15)
    del older["prediction_kl_to_prior"]  # written before the monitor kept it
    histories = [
        {"teacher": [monitor_entry(250, 0.30, 0.0, 1.2),
                     monitor_entry(500, 0.40, 0.5, 0.05, ("Car", 2.0)),
                     monitor_entry(750, 0.5, 0.0, 0.1)],
         "student": [monitor_entry(250, 0.2, 1.0, 0.1)]},  # a target only one seed has
        {"teacher": [monitor_entry(250, 0.34, 0.0, 1.0), older,
                     monitor_entry(750, 0.5, 0.6, 0.2),
                     monitor_entry(1000, 0.5, 0.7, 0.1)]},  # a step only one seed has
    ]
    runs = [paired.SeedRun(k, f"w/seed_{k}", {"pseudo_label_monitor": h})
            for k, h in enumerate(histories)]
    rows = paired.curve_rows("ClassMix", paired.PairedResult("ClassMix", runs))
    assert len(rows) == 3
    header = table_cells(paired.curve_table_header().splitlines()[0])
    first, second, third = (table_cells(row) for row in rows)
    assert len(first) == len(header)
    sd = np.std([30.0, 34.0], ddof=1)
    assert first[:6] == ["ClassMix", "0,1", "teacher", "250", f"32.0 ± {sd:.1f}", "80.0 ± 0.0"]
    assert first[6] == "0.0 ± 0.0" and first[7] == "-"  # nothing admitted: no accuracy
    assert first[8] == "-" and first[10] == "none admitted / none admitted"
    assert first[9] == "0.100 ± 0.000"  # the KL of all pixels' pseudo-labels
    assert second[3] == "500" and second[6] == f"60.0 ± {np.std([50., 70.], ddof=1):.1f}"
    assert second[8] == f"0.100 ± {np.std([0.05, 0.15], ddof=1):.3f}"
    assert second[9] == "-"  # one seed's entry has no all-pixel KL
    assert second[10] == "Car +2.0, Sky -5.0 / Road +5.0, Sky -5.0"
    # One seed admits nothing at step 750: no admitted KL, its moves say so.
    assert third[3] == "750" and third[8] == "-"
    assert third[10] == "none admitted / Road +5.0, Sky -5.0"
    # Runs without a monitor (supervised twins) give no rows.
    assert paired.curve_rows("x", paired.PairedResult("x", [seed_run(0, 0.4, 0.9)])) == []


def test_benchmark_curves_only_records_the_finished_seeds_curves(tmp_path):
    from tiny import TINY_SHAPES_CONFIG

    cfg = tmp_path / "tiny_classmix.gin"
    cfg.write_text(TINY_SHAPES_CONFIG + "train.method = @ClassMix\n")
    workdir, twins, record = tmp_path / "run", tmp_path / "twins", tmp_path / "B.md"
    for seed, miou in enumerate([0.20, 0.30]):
        write_finished(str(workdir / f"seed_{seed}"), seed, 0.5,
                       {"teacher": [monitor_entry(3, miou, 0.25, 0.5)]})
    args = ["--config", str(cfg), "--workdir", str(workdir), "--twins_dir", str(twins),
            "--record", str(record), "--table", "t", "--curves_only"]
    result = run_tool("benchmark", *args, "--seeds", "0,1", cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not twins.exists()  # nothing trained, no twin folder made
    assert "no supervised twin reference in the curves" in result.stdout
    text = record.read_text()
    assert "<!-- table: t-curves -->" in text and "<!-- table: t -->" not in text
    row = [line for line in text.splitlines() if line.startswith("| ClassMix")]
    assert len(row) == 1
    assert table_cells(row[0])[1:5] == ["0,1", "teacher", "3",
                                        f"25.0 ± {np.std([20., 30.], ddof=1):.1f}"]
    # A seed that never finished is named, and nothing is recorded.
    result = run_tool("benchmark", *args, "--seeds", "0,2", cwd=REPO)
    assert result.returncode == 2
    assert "seed_2/metrics.json: not found" in result.stderr.strip().splitlines()[-1]
    assert record.read_text() == text
    # A curve table with other columns is refused (bin/benchmark checks before writing).
    from kssl.cli import benchmark

    other = tmp_path / "C.md"
    other.write_text("<!-- table: t-curves -->\n| a | b |\n|---|---|\n")
    with pytest.raises(config.ConfigError, match="has other columns"):
        benchmark.check_table(str(other), "t-curves", paired.curve_table_header())
    benchmark.check_table(str(record), "t-curves", paired.curve_table_header())
    # A supervised config has no curves.
    supervised = tmp_path / "tiny_supervised.gin"
    supervised.write_text(TINY_SHAPES_CONFIG)
    result = run_tool("benchmark", "--config", str(supervised), "--curves_only", "--seeds",
                      "0", "--workdir", str(workdir), cwd=REPO)
    assert result.returncode == 2 and "no pseudo-labels" in result.stderr


def test_curves_only_scores_the_twins_on_the_monitored_images(tmp_path):
    """With every seed's twin finished, the curves end with the twins' own predictions on
    the images the method's monitor scored (here all 16 unlabelled ones)."""
    import gin

    from kssl.data.readers.shapes import Shapes
    from tiny import TINY_SHAPES_CONFIG, write_untrained_run

    cfg = tmp_path / "tiny_classmix.gin"
    cfg.write_text(TINY_SHAPES_CONFIG + "train.method = @ClassMix\n")
    config.parse([str(cfg)])
    key = paired.twin_key(paired.supervised_bindings())
    gin.clear_config()
    workdir, twins = tmp_path / "run", tmp_path / "twins"
    for seed in (0, 1):
        write_finished(str(workdir / f"seed_{seed}"), seed, 0.5,
                       {"teacher": [monitor_entry(3, 0.2, 0.25, 0.5),
                                    monitor_entry(6, 0.3, 0.25, 0.5)]})
        network = write_untrained_run(str(twins / key / f"seed_{seed}"))
        write_finished(str(twins / key / f"seed_{seed}"), seed, 0.4)
    result = run_tool("benchmark", "--config", str(cfg), "--workdir", str(workdir),
                      "--twins_dir", str(twins), "--seeds", "0,1", "--curves_only", cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [table_cells(line) for line in result.stdout.splitlines()
            if line.startswith("| ClassMix")]
    assert [row[2:4] for row in rows] == [["teacher", "3"], ["teacher", "6"],
                                         [paired.TWIN_TARGET, "6"]]
    # The same untrained network for both seeds: its mIoU on the 16 unlabelled images
    # (the 24 train images but the 8 labelled), counted here with numpy.
    shapes = Shapes(num_train=24, height=48, width=64)
    images, masks = shapes.arrays("train")
    from kssl.data import splits

    _, pool = splits.labelled_split(shapes.examples("train"), count=8)
    rows_of_pool = [int(i.split("/")[1]) for i in pool.ids]
    predicted = np.argmax(np.asarray(network(images[rows_of_pool].astype(np.float32),
                                             training=False)), -1)
    truth = masks[rows_of_pool]
    valid = truth != 255
    cm = np.bincount(truth[valid] * 7 + predicted[valid], minlength=49).reshape(7, 7)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    iou = np.diag(cm)[union > 0] / union[union > 0]
    assert rows[2][4] == f"{100 * iou.mean():.1f} ± 0.0"
    assert rows[2][6] == "100.0 ± 0.0"
    # A run that names other monitored images than the config gives has no reference.
    metrics_path = workdir / "seed_1" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["pseudo_label_monitor_ids"] = list(pool.ids)[1:]
    metrics_path.write_text(json.dumps(metrics))
    result = run_tool("benchmark", "--config", str(cfg), "--workdir", str(workdir),
                      "--twins_dir", str(twins), "--seeds", "0,1", "--curves_only", cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "monitored other images than this config's monitor would" in result.stdout
    assert paired.TWIN_TARGET not in result.stdout.split("curves, mean over seeds", 1)[1]


def test_class_changes_pair_each_class_and_read_the_predicted_shares():
    # Rows are the true classes, columns the predictions.
    # Row and column sums differ in every matrix, so a swapped axis shows.
    twin_cm = np.array([[80, 20], [0, 100]])
    run_cm = [np.array([[90, 10], [10, 90]]) + np.array([[0, 40], [0, 0]]),
              np.array([[100, 0], [30, 70]])]

    def run(seed, sky, road, cm):
        return paired.SeedRun(seed, "w", {"per_class_iou": {"Sky": sky, "Road": road},
                                          "confusion_matrix": cm.tolist()})

    result = paired.PairedResult("MKD", [run(0, 0.5, 0.6, run_cm[0]), run(1, 0.7, 0.6, run_cm[1])],
                                 [run(0, 0.4, 0.6, twin_cm), run(1, 0.4, None, twin_cm)])
    lines = paired.format_class_changes(result, NAMES).splitlines()
    sky, road = lines[1].split(), lines[2].split()
    diff_sd = np.std([10.0, 30.0], ddof=1)
    assert sky[:5] == ["Sky", "40.0", "60.0", "+20.0", "±"] and sky[5] == f"{diff_sd:.1f}"
    # Predicted shares: column sums over the total (twin 80/200; seeds 100/240, 130/200);
    # the true share from the first seed's row sums (140/240).
    assert sky[6:] == ["40.0", f"{(100 / 240 + 130 / 200) / 2 * 100:.1f}",
                       f"{140 / 240 * 100:.1f}"]
    assert road[1:4] == ["-", "-", "-"]  # a seed without Road's IoU
    assert road[4:] == ["60.0", f"{(140 / 240 + 70 / 200) / 2 * 100:.1f}",
                        f"{100 / 240 * 100:.1f}"]
    with pytest.raises(ValueError, match="twins"):
        paired.format_class_changes(paired.PairedResult("Supervised", result.twins), NAMES)


def test_the_twins_own_predictions_join_the_curves_at_the_last_step():
    histories = [
        {"teacher": [monitor_entry(250, 0.30, 0.5, 0.2), monitor_entry(500, 0.40, 0.6, 0.1)]},
        {"teacher": [monitor_entry(250, 0.36, 0.5, 0.2), monitor_entry(500, 0.44, 0.6, 0.1)]}]
    runs = [paired.SeedRun(k, f"w/seed_{k}", {"pseudo_label_monitor": h})
            for k, h in enumerate(histories)]
    references = [dict(monitor_entry(0, 0.38, 1.0, 0.3), step=None),
                  dict(monitor_entry(0, 0.42, 1.0, 0.3), step=None)]
    result = paired.with_twin_reference(paired.PairedResult("ClassMix", runs), references)
    assert runs[0].metrics["pseudo_label_monitor"] == histories[0]  # the input is kept
    rows = [table_cells(row) for row in paired.curve_rows("ClassMix", result)]
    assert [row[2:4] for row in rows] == [["teacher", "250"], ["teacher", "500"],
                                         [paired.TWIN_TARGET, "500"]]
    assert rows[2][4] == f"40.0 ± {np.std([38.0, 42.0], ddof=1):.1f}"
    assert rows[2][6] == "100.0 ± 0.0"
    # A seed without a reference keeps its history; then the twin target is not common.
    partial = paired.with_twin_reference(paired.PairedResult("ClassMix", runs),
                                         [references[0], None])
    assert [table_cells(row)[2] for row in paired.curve_rows("ClassMix", partial)] == \
        ["teacher", "teacher"]


def test_a_stopped_benchmark_stops_the_training_process_it_waits_for(tmp_path):
    """SIGTERM to bin/benchmark kills the seed's training process too, rather than
    leaving it to train on beside the next bin/benchmark."""
    pid_file = tmp_path / "child.pid"
    child_code = ("import os, sys, time\n"
                  "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\n"
                  "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
                  "time.sleep(120)\n")
    parent_code = ("import subprocess, sys\n"
                   "from kssl.cli.benchmark import stop_children_on_sigterm\n"
                   "stop_children_on_sigterm()\n"
                   f"subprocess.run([sys.executable, '-c', {child_code!r}, sys.argv[1]])\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code, str(pid_file)])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        parent.kill()
        parent.wait()
    with pytest.raises(ProcessLookupError):  # killed, and reaped by its parent
        os.kill(child, 0)
