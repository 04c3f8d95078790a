"""The pipeline/step throughput benchmark: image counting, warm-up, verdict and the CLI."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from kssl import throughput
from kssl.config import ConfigError
from kssl.cli import benchmark
from tiny import TINY_SHAPES_CONFIG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def zipped_stream():
    """(labelled, unlabelled) elements of 3+2, 3+2, 3+2, 1+2 images (10 and 8 examples)."""
    labelled = tf.data.Dataset.from_tensor_slices(
        {"image": np.zeros([10, 2, 2, 3], np.float32), "mask": np.zeros([10, 2, 2], np.int32)})
    unlabelled = tf.data.Dataset.from_tensor_slices({"image": np.zeros([8, 2, 2, 3],
                                                                       np.float32)})
    return tf.data.Dataset.zip(labelled.batch(3), unlabelled.batch(2))


def test_pipeline_timer_counts_the_timed_images_only():
    calls = iter([100.0, 104.0])
    # Warm-up skips the first element (5 images); the timed three hold 5 + 5 + 3.
    rate = throughput.time_pipeline(zipped_stream(), batches=3, warmup=1,
                                    clock=lambda: next(calls))
    assert rate == throughput.Rate(images=13, batches=3, seconds=4.0)
    assert rate.images_per_second == 13 / 4.0


def test_pipeline_timer_counts_a_labelled_stream():
    ds = tf.data.Dataset.from_tensor_slices({"image": np.zeros([7, 1, 1, 3])}).batch(4)
    calls = iter([0.0, 0.5])
    rate = throughput.time_pipeline(ds, batches=2, clock=lambda: next(calls))
    assert (rate.images, rate.images_per_second) == (7, 14.0)


def test_pipeline_timer_fails_on_a_short_dataset():
    with pytest.raises(ValueError, match="ended before 5 elements"):
        throughput.time_pipeline(zipped_stream(), batches=4, warmup=1)


def test_warmup_covers_one_pass_over_cached_data():
    # CamVid 1/8 with ClassMix: 46 labelled and 321 unlabelled images, batches of 8.
    assert throughput.warmup_batches({"cache": True}, [(46, 8), (321, 8)]) == 42
    assert throughput.warmup_batches({"cache": True}, [(8, 4)]) == throughput.MIN_WARMUP_BATCHES
    assert throughput.warmup_batches({"cache": False}, [(321, 8)]) == \
        throughput.MIN_WARMUP_BATCHES


def report(pipeline, step, fixed):
    """A report of 8 + 8 images a step with the given images/s (one second each)."""
    return throughput.Report("ClassMix", 8, 8, 5, throughput.Rate(pipeline, 10, 1.0),
                             throughput.Rate(step, 10, 1.0), throughput.Rate(fixed, 10, 1.0))


def test_verdict():
    fast_pipeline = report(300, 90, 100)
    assert fast_pipeline.limited_by == "step"
    assert fast_pipeline.pipeline_over_step == pytest.approx(300 / 90)
    assert fast_pipeline.images_per_step == 16
    assert "limited by: the training step" in throughput.format_report(fast_pipeline)
    slow_pipeline = report(60, 55, 100)
    assert slow_pipeline.limited_by == "pipeline"
    assert "limited by: the input pipeline" in throughput.format_report(slow_pipeline)


def test_pipeline_rows_go_to_pipeline_tables_only(tmp_path):
    path = str(tmp_path / "b.md")
    benchmark.append_row(path, "train", "| row |")
    assert benchmark.existing_header(path, "train") == benchmark.table_header().split("\n")[0]
    assert benchmark.existing_header(path, "other") is None
    with pytest.raises(ConfigError, match="has other columns"):
        benchmark.check_pipeline_table(path, "train")
    benchmark.check_pipeline_table(path, "other")  # created on append
    benchmark.append_row(path, "pipe", "| row |", benchmark.pipeline_table_header())
    benchmark.check_pipeline_table(path, "pipe")


def run_benchmark(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, os.path.join(REPO, "bin", "benchmark"), *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def test_cli_pipeline_only_prints_and_records(tmp_path):
    config_file = tmp_path / "tiny.gin"
    config_file.write_text(TINY_SHAPES_CONFIG + "train.method = @Supervised\n")
    record = tmp_path / "bench.md"
    record.write_text("# Benchmarks\n")
    args = ["--pipeline_only", "--config", str(config_file), "--steps", "3",
            "--warmup_steps", "2", "--record", str(record), "--table", "pipe",
            "--label", "tiny"]
    result = run_benchmark(*args)
    assert result.returncode == 0, result.stderr
    number = r"\| (\d+\.\d) \|"
    for name in ("input pipeline alone", "training step on the pipeline",
                 "training step on one fixed batch"):
        assert re.search(rf"\| {name} {number}", result.stdout), result.stdout
    assert re.search(r"\| pipeline / step \| \d+\.\d\dx \|", result.stdout)
    assert "limited by: the " in result.stdout

    lines = record.read_text().split("\n")
    start = lines.index("<!-- table: pipe -->")
    assert "\n".join(lines[start + 1:start + 3]) == benchmark.pipeline_table_header()
    cells = [c.strip() for c in lines[start + 3].strip("|").split("|")]
    assert cells[:2] == ["tiny", "4+0"]  # batch 4, supervised: no unlabelled images
    assert cells[6] in ("pipeline", "step") and cells[7] == "3"
    assert float(cells[8]) > 0 and float(cells[9]) > 0  # ms/step, GFLOP/step
    assert re.search(r"training step: \d+\.\d\d GFLOP \(\d+% in gradient ops\)",
                     result.stdout)
    assert cells[-1] == "`bin/benchmark " + " ".join(args) + "`"



def test_step_flops_match_the_convolutions_by_hand():
    # One 3x3 convolution 3 -> 4 channels and a 1x1 classifier 4 -> 3, on 2 images of
    # 8x8. A convolution's multiply-adds count 2 FLOPs each: 2 * pixels * k*k*cin * cout.
    # Its backward pass computes the input gradient and the filter gradient, each as
    # many FLOPs again (the first layer's input gradient too: TF does not prune it).
    import keras
    from kssl.methods import Supervised
    from tiny import tiny_segmenter

    model = Supervised(tiny_segmenter(0), 3)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    batch = {"image": tf.zeros([2, 8, 8, 3]), "mask": tf.zeros([2, 8, 8], tf.uint8)}
    flops = throughput.count_step_flops(model, batch)
    pixels = 2 * 8 * 8
    convolutions = 2 * pixels * (3 * 3 * 3 * 4 + 1 * 1 * 4 * 3)
    assert flops.backward >= 2 * convolutions
    # The rest (batch norm, biases, loss, optimizer) is small element-wise arithmetic:
    # bounded by a few dozen FLOPs per activation.
    activations = pixels * (4 + 3)
    assert 3 * convolutions <= flops.total <= 3 * convolutions + 40 * activations
    assert flops.total - flops.backward >= convolutions


def test_gradients_of_a_dilated_convolution_cost_what_its_forward_pass_costs():
    # A 3x3 convolution 3 -> 8 at dilation 2 ("same" padding) on 2 images of 8x8, then a
    # 1x1 classifier 8 -> 3. TF runs the dilated convolution in space-to-batch form: a
    # "valid" convolution of 3x3 blocks to 1x1, whose gradients TF's own statistic counts
    # at the blocks' 3x3 size, nine times too many.
    import keras
    from kssl.methods import Supervised

    keras.utils.set_random_seed(0)
    network = keras.Sequential([
        keras.Input((None, None, 3)),
        keras.layers.Conv2D(8, 3, dilation_rate=2, padding="same", activation="relu"),
        keras.layers.Conv2D(3, 1)])
    model = Supervised(network, 3)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    batch = {"image": tf.zeros([2, 8, 8, 3]), "mask": tf.zeros([2, 8, 8], tf.uint8)}
    flops = throughput.count_step_flops(model, batch)
    convolutions = 2 * (2 * 8 * 8) * (3 * 3 * 3 * 8 + 8 * 3)
    small = 40 * 2 * 8 * 8 * (8 + 3)  # element-wise work, a few dozen FLOPs a value
    assert 2 * convolutions <= flops.backward <= 2 * convolutions + small
    assert convolutions <= flops.total - flops.backward <= convolutions + small
