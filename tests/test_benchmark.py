"""bin/benchmark's training row: the columns, the label's details, peak memory."""

import re

from kssl.cli import benchmark
from tiny import table_cells

METRICS = {"labelled_images": 46, "unlabelled_images": 321, "steps": 4000,
           "mean_iou": 0.4123, "train_images_per_second": 33.25,
           "per_class_iou": {"Sky": 0.9, "Road": None}}


def test_row_has_the_header_columns_and_the_measured_values():
    row = benchmark.format_row("MKD", METRICS, ["Sky", "Road"], 125.0, "bin/benchmark x",
                               memory="peak memory host 1.50 GiB")
    header = table_cells(benchmark.table_header().splitlines()[0])
    values = table_cells(row)
    assert len(values) == len(header)
    assert values[:6] == ["MKD (peak memory host 1.50 GiB)", "46/321", "4000", "41.2",
                          "33.2", "2.1"]
    assert values[6] == "Sky 90.0 Road -"
    assert values[-1] == "`bin/benchmark x`"


def test_stage_summary_and_memory_share_the_parentheses():
    stages = {"1": {"mean_iou": 0.39, "train_seconds": 10.0, "timed_steps": 100},
              "2": {"mean_iou": 0.41, "train_seconds": 30.0, "timed_steps": 100}}
    row = benchmark.format_row("ThreeStage", {**METRICS, "stages": stages}, ["Sky"], 60.0,
                               "c", memory="peak memory host 2.00 GiB")
    label = table_cells(row)[0]
    assert label.startswith("ThreeStage (val mIoU by stage 39.0 / 41.0")
    assert label.endswith("ms/step 100 / 300 (1.00x / 3.00x); peak memory host 2.00 GiB)")


def test_stage_summary_adds_the_every_pixel_argmax_only_for_filtered_masks():
    def stages(argmax):
        return {"1": {"mean_iou": 0.39, "pseudo_masks": {"unlabelled_mean_iou": 0.5,
                                                         "unlabelled_argmax_mean_iou": argmax}},
                "2": {"mean_iou": 0.41, "pseudo_masks": {"unlabelled_mean_iou": 0.6,
                                                         "unlabelled_argmax_mean_iou": 0.6}}}

    assert benchmark.stage_summary(stages(0.5)) == (
        "val mIoU by stage 39.0 / 41.0; pseudo-mask mIoU on the unlabelled pool 50.0 / 60.0")
    assert benchmark.stage_summary(stages(0.45)).endswith(
        "50.0 / 60.0; argmax on every unlabelled pixel 45.0 / 60.0")


def test_peak_memory_reads_the_process_high_water_mark():
    text = benchmark.peak_memory()
    host = float(re.match(r"peak memory host ([0-9.]+) GiB", text)[1])
    with open("/proc/self/status") as f:
        hwm_kib = int(re.search(r"VmHWM:\s+(\d+) kB", f.read())[1])
    assert abs(host - hwm_kib / 2**20) < 0.05 * host + 0.01
