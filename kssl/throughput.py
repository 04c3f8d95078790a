"""Is training limited by the input pipeline or by the training step?

`bin/benchmark --pipeline_only` measures three rates, in training images (labelled +
unlabelled) per second, on the training stream `kssl.training.train` builds for a config:

  pipeline      the tf.data stream alone, read as fast as it goes;
  step          `model.fit` on that stream: the rate training actually runs at;
  fixed batch   `model.fit` on one batch held in memory: the step's compute alone.

The pipeline limits when it alone delivers fewer images per second than the step
consumes on the fixed batch; otherwise the step does, and pipeline / step is the
pipeline's headroom.

It also counts the floating-point operations of one training step (`count_step_flops`:
TensorFlow's graph profiler over the traced `train_step`, forward and backward), so that
two methods' step times can be set against their compute: a step that takes more time
than its FLOPs predict spends the rest on work that is not arithmetic (memory traffic,
small element-wise ops, random draws, host overhead).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from typing import Callable, Optional

import gin
import keras
import tensorflow as tf

from kssl import training
from kssl.distribution import choose_strategy, distribute_training_data

# Untimed batches at the least, with or without a cache: AUTOTUNE settles its parallelism
# and the shuffle buffer fills before timing.
MIN_WARMUP_BATCHES = 5
# The fixed-batch fit only needs its train function traced (the first step).
FIXED_BATCH_WARMUP_STEPS = 3


@dataclasses.dataclass(frozen=True)
class Rate:
    """`images` training images in `batches` batches (or steps) took `seconds`."""

    images: int
    batches: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        """The rate; infinite when no time was measured (a clock too coarse)."""
        return self.images / self.seconds if self.seconds > 0 else math.inf


@dataclasses.dataclass(frozen=True)
class Report:
    """The three rates of one config and what the stream holds per step."""

    method: str  # the method's name, and the stage measured for a staged method
    labelled_per_step: int
    unlabelled_per_step: int
    warmup: int
    pipeline: Rate
    step: Rate
    fixed_batch: Rate
    flops: Optional["StepFlops"] = None

    @property
    def fixed_batch_ms(self) -> float:
        """Milliseconds one step takes on the fixed batch."""
        return 1000.0 * self.fixed_batch.seconds / max(self.fixed_batch.batches, 1)

    @property
    def images_per_step(self) -> int:
        """Labelled + unlabelled images one training step reads."""
        return self.labelled_per_step + self.unlabelled_per_step

    @property
    def pipeline_over_step(self) -> float:
        """How many times over the pipeline alone could feed the step as it runs."""
        return self.pipeline.images_per_second / self.step.images_per_second

    @property
    def limited_by(self) -> str:
        """'pipeline' when the pipeline alone is slower than the step's compute alone."""
        return ("pipeline" if self.pipeline.images_per_second
                < self.fixed_batch.images_per_second else "step")


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Floating-point operations of one training step, as TensorFlow's profiler counts
    them on the traced graph: `total`, of which `backward` in gradient ops."""

    total: int
    backward: int

    @property
    def gflops(self) -> float:
        return self.total / 1e9


# Gradient ops of a convolution: each costs what the forward convolution costs (the
# same multiply-adds, rearranged).
_CONVOLUTION_GRADIENTS = ("Conv2DBackpropInput", "Conv2DBackpropFilter",
                          "DepthwiseConv2dNativeBackpropInput",
                          "DepthwiseConv2dNativeBackpropFilter")
_TAPE_SCOPE = "gradient_tape/"


def count_step_flops(model: keras.Model, batch) -> StepFlops:
    """Traces `model.train_step` on `batch` (nothing runs) and counts its FLOPs.

    The count covers the ops TensorFlow registers a FLOP statistic for (convolutions,
    matrix products, element-wise arithmetic, reductions), each with its static shape;
    ops without one (resizes, gathers, random draws) count 0, which is why the step time
    can exceed what the count predicts. Gradient ops are those the tape adds (named
    `gradient_tape/...`). A convolution's two gradient ops are counted at the forward
    convolution's cost: the profiler's own statistic for them takes the output as large
    as the input, which overcounts a "valid" convolution, such as the space-to-batch
    form TF gives a dilated one (nine times over for 3x3 blocks).
    """
    concrete = tf.function(model.train_step).get_concrete_function(batch)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(concrete.graph, options=options)
    op_types = {op.name: op.type for op in concrete.graph.get_operations()}
    counted = {node.name: node.total_float_ops for node in profile.children}
    total = backward = 0
    for name, flops in counted.items():
        if name.startswith(_TAPE_SCOPE) or f"/{_TAPE_SCOPE}" in name:
            if op_types.get(name) in _CONVOLUTION_GRADIENTS:
                forward = name.split(_TAPE_SCOPE, 1)[1].rsplit("/", 1)[0]
                flops = counted.get(forward, flops)
            backward += flops
        total += flops
    return StepFlops(int(total), int(backward))


def images_in(element) -> int:
    """Training images in one element of a training stream: the rows of every "image"
    tensor (a labelled dict, or a (labelled, unlabelled) pair of dicts)."""
    parts = element if isinstance(element, (tuple, list)) else (element,)
    return sum(int(part["image"].shape[0]) for part in parts
               if isinstance(part, dict) and "image" in part)


def time_pipeline(dataset, batches: int, warmup: int = 0,
                  clock: Callable[[], float] = time.perf_counter) -> Rate:
    """Reads `warmup` elements of `dataset` untimed, then times the next `batches`,
    counting the images they actually hold (see `images_in`).

    Raises ValueError when `dataset` ends before `warmup + batches` elements.
    """
    if batches < 1:
        raise ValueError(f"batches must be at least 1, got {batches}")
    iterator = iter(dataset)

    def next_element():
        try:
            return next(iterator)
        except StopIteration:
            raise ValueError(f"the dataset ended before {warmup + batches} elements "
                             f"({warmup} warm-up + {batches} timed)") from None

    for _ in range(warmup):
        next_element()
    images = 0
    start = clock()
    for _ in range(batches):
        images += images_in(next_element())
    seconds = clock() - start
    return Rate(images, batches, seconds)


class _AfterWarmup(keras.callbacks.Callback):
    """Forwards batch ends to `meter` from the `warmup`-th on, so the meter (which
    starts its clock at the first batch end it sees) times only later steps."""

    def __init__(self, meter: keras.callbacks.Callback, warmup: int):
        super().__init__()
        self.meter = meter
        self.warmup = warmup
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen >= self.warmup:
            self.meter.on_train_batch_end(batch, logs)


def time_training_steps(model: keras.Model, dataset, steps: int, warmup: int,
                        images_per_step: int) -> Rate:
    """Runs `model.fit` on `dataset` for `warmup + steps` steps and times the last
    `steps` with the driver's own `ThroughputMeter` (so rates compare with the train
    img/s of training rows). `warmup` is at least 1: the first step traces."""
    warmup = max(1, warmup)
    meter = training.ThroughputMeter(images_per_step)
    model.fit(dataset, epochs=1, steps_per_epoch=warmup + steps,
              callbacks=[_AfterWarmup(meter, warmup)], verbose=0, shuffle=False)
    return Rate(meter.steps * images_per_step, meter.steps, meter.seconds)


def warmup_batches(settings: dict, pools) -> int:
    """Batches to read before timing: with `pipeline.cache`, one full pass over the
    largest pool (+1, so the cache is complete and later passes read memory alone);
    at least MIN_WARMUP_BATCHES.

    `pools`: (number of examples, batch size) of each stream of the training element.
    """
    if not settings["cache"]:
        return MIN_WARMUP_BATCHES
    one_pass = max(math.ceil(size / batch) for size, batch in pools)
    return max(MIN_WARMUP_BATCHES, one_pass + 1)


def train_arguments() -> dict:
    """The arguments `training.train` would run with: its defaults under the current
    gin bindings of `train.*` (in the active gin scope)."""
    defaults = {name: parameter.default
                for name, parameter in inspect.signature(training.train).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    return {**defaults, **gin.get_bindings("train")}


def benchmark_config(steps: int = 50, warmup: Optional[int] = None) -> Report:
    """Measures the three rates for the parsed gin config (see the module docstring).

    The stream, model and optimizer are built by the driver's own set-up
    (`training.prepare_run`, `training.build_training`: the same configurables, seeds,
    strategy, precision, jit setting and checks); a staged method is
    measured in its first stage, under the `stage_1/` bindings (later stages need the
    pseudo-masks of a finished stage). Nothing is written.
    `warmup`: untimed batches (and steps) before each timing; default `warmup_batches`.
    """
    method = train_arguments()["method"]
    if method.stages > 1:
        with gin.config_scope("stage_1"):
            return _benchmark(train_arguments(), steps, warmup, stage=1)
    return _benchmark(train_arguments(), steps, warmup)


def _benchmark(args: dict, steps: int, warmup: Optional[int], stage=None) -> Report:
    # The driver's own set-up (`training.prepare_run` and `training.build_training`),
    # without run files, resume or evaluation data.
    method = args["method"]
    dist = choose_strategy(args["strategy"])
    keras.utils.set_random_seed(args["seed"])
    if args["mixed_precision"]:
        keras.mixed_precision.set_global_policy(args["mixed_precision"])
    data = training.prepare_run(method, stage)
    train_ds, model, _ = training.build_training(data, dist, args["steps"],
                                                 data.settings["seed"],
                                                 jit_compile=args["jit_compile"])
    batch_size, unlabelled_batch = data.settings["batch_size"], data.unlabelled_per_step

    if warmup is None:
        pools = [(len(data.labelled), batch_size)]
        if data.pool is not None:
            pools.append((len(data.pool), unlabelled_batch))
        warmup = warmup_batches(data.settings, pools)
    pipeline_rate = time_pipeline(train_ds, steps, warmup)
    step_rate = time_training_steps(
        model, distribute_training_data(dist, train_ds), steps, warmup, data.images_per_step)

    fixed = next(iter(train_ds))
    fixed_ds = tf.data.Dataset.from_tensors(fixed).repeat()
    fixed_rate = time_training_steps(
        model, distribute_training_data(dist, fixed_ds), steps,
        FIXED_BATCH_WARMUP_STEPS, data.images_per_step)
    flops = None
    if dist.num_replicas_in_sync == 1:
        # Traced outside the strategy's replica context: one replica's step is the step.
        flops = count_step_flops(model, fixed)
    name = method.__name__ if stage is None else f"{method.__name__} stage {stage}"
    return Report(name, batch_size, unlabelled_batch, warmup, pipeline_rate, step_rate,
                  fixed_rate, flops)


def format_report(report: Report) -> str:
    """The three rates and the ratio as a small markdown table, and which side limits."""
    rows = [("input pipeline alone", report.pipeline.images_per_second),
            ("training step on the pipeline", report.step.images_per_second),
            ("training step on one fixed batch", report.fixed_batch.images_per_second)]
    lines = [f"kssl: {report.method}, {report.labelled_per_step} labelled + "
             f"{report.unlabelled_per_step} unlabelled images a step; "
             f"{report.pipeline.batches} timed batches/steps after {report.warmup} warm-up",
             "| measurement | img/s |", "|---|---|"]
    lines += [f"| {name} | {rate:.1f} |" for name, rate in rows]
    lines.append(f"| pipeline / step | {report.pipeline_over_step:.2f}x |")
    if report.flops is not None:
        lines.append(f"training step: {report.flops.gflops:.2f} GFLOP "
                     f"({100 * report.flops.backward / max(report.flops.total, 1):.0f}% in "
                     f"gradient ops), {report.fixed_batch_ms:.0f} ms on the fixed batch")
    if report.limited_by == "pipeline":
        lines.append(
            f"limited by: the input pipeline (it delivers "
            f"{report.pipeline.images_per_second:.1f} img/s, the step alone could consume "
            f"{report.fixed_batch.images_per_second:.1f})")
    else:
        lines.append(f"limited by: the training step (the pipeline alone delivers "
                     f"{report.pipeline_over_step:.2f}x what the step consumes)")
        slowdown = 1 - report.step.images_per_second / report.fixed_batch.images_per_second
        if slowdown > 0.1:
            # The pipeline keeps up, yet the step is slower on it: on a CPU both share
            # the cores, so each batch made costs the step compute time.
            lines.append(f"the step runs {100 * slowdown:.0f}% slower on the pipeline than "
                         "on a fixed batch: the pipeline takes CPU time from the step")
    return "\n".join(lines)

