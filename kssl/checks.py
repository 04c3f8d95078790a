"""Checks of every configured value before a run starts.

`train` builds its pieces one after the other, so a bad value used to surface only when
its piece was built: a misspelt evaluation mode after the whole training, a bad model
option after minutes of data checks, a string where a number belongs as a TypeError
deep inside Keras. The checks here take the values of one configurable and raise a
one-line ConfigError naming the binding, the value and what is expected;
`kssl.configured.check_run` applies them to the gin bindings of every configurable that
`train` calls (in each stage's scope for a staged method) before any data is read.
"""

from __future__ import annotations

import inspect
import numbers
import os

import gin

from kssl.config import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("poly", "constant")


def configured(fn) -> dict:
    """The arguments gin would pass to the configurable `fn` in the active scope, over
    `fn`'s own defaults (required arguments without a binding are left out)."""
    values = {name: p.default for name, p in inspect.signature(fn).parameters.items()
              if p.default is not inspect.Parameter.empty and p.default is not gin.REQUIRED}
    values.update(gin.get_bindings(fn))
    return values


# -- single values ------------------------------------------------------------------------
def fail(binding: str, value, expected: str) -> None:
    """Raises the one-line ConfigError for `binding = value`."""
    hint = ""
    if isinstance(value, str) and expected.startswith(("an integer", "a number")):
        hint = " (a string here: write the number without quotes)"
    raise ConfigError(f"{binding} = {value!r}: expected {expected}{hint}")


def is_integer(value) -> bool:
    """An int, not a bool (True would otherwise count as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_integer(binding, value, minimum=None, optional=False):
    """An integer of at least `minimum` (or None when `optional`)."""
    if optional and value is None:
        return
    if not is_integer(value) or (minimum is not None and value < minimum):
        fail(binding, value, "an integer" + ("" if minimum is None else f" >= {minimum}")
             + (" or None" if optional else ""))


def check_number(binding, value, low=None, high=None, low_open=False, high_open=False,
                 optional=False):
    """A number in the interval given by `low`/`high` (open ends where asked)."""
    if optional and value is None:
        return
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high:g}")
        fail(binding, value, "a number" + (f" {' and '.join(bounds)}" if bounds else "")
             + (" or None" if optional else ""))


def check_choice(binding, value, choices):
    """One of `choices`."""
    if value not in choices:
        fail(binding, value, "one of " + ", ".join(repr(c) for c in choices))


def check_bool(binding, value):
    """True or False."""
    if not isinstance(value, bool):
        fail(binding, value, "True or False")


def check_size(binding, value, optional=False):
    """A (height, width) pair of positive integers (or None when `optional`)."""
    if optional and value is None:
        return
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(is_integer(v) and v > 0 for v in value)):
        fail(binding, value, "a (height, width) pair of positive integers"
             + (" or None" if optional else ""))


def check_string(binding, value, optional=False):
    """A string (or None when `optional`)."""
    if not (isinstance(value, str) or (optional and value is None)):
        fail(binding, value, "a string" + (" or None" if optional else ""))


def check_whole_epochs(steps, steps_per_epoch) -> None:
    """The steps fill whole epochs (a resume restarts at an epoch)."""
    if steps % steps_per_epoch:
        raise ConfigError(f"train.steps ({steps}) must be a multiple of "
                          f"train.steps_per_epoch ({steps_per_epoch})")


# -- one configurable at a time -------------------------------------------------------------
def check_train(values: dict) -> None:
    """`train.*` (see `kssl.training.train`)."""
    from kssl.distribution import STRATEGIES

    check_integer("train.steps", values["steps"], minimum=1)
    check_integer("train.steps_per_epoch", values["steps_per_epoch"], minimum=1)
    check_whole_epochs(values["steps"], values["steps_per_epoch"])
    check_choice("train.strategy", values["strategy"], STRATEGIES)
    check_choice("train.mixed_precision", values["mixed_precision"],
                 (None, "mixed_float16", "mixed_bfloat16", "float32"))
    for name in ("jit_compile", "overwrite"):
        check_bool(f"train.{name}", values[name])
    check_integer("train.seed", values["seed"])
    check_integer("train.eval_every_epochs", values["eval_every_epochs"], minimum=0)
    check_choice("train.verbose", values["verbose"], (None, 0, 1, 2))
    check_integer("train.start_stage", values["start_stage"], minimum=1, optional=True)


def check_pipeline(values: dict) -> None:
    """`pipeline.*` (see `kssl.configured.pipeline_settings`)."""
    check_integer("pipeline.batch_size", values["batch_size"], minimum=1)
    check_integer("pipeline.unlabelled_batch_size", values["unlabelled_batch_size"],
                  minimum=1, optional=True)
    check_size("pipeline.crop_size", values["crop_size"])
    check_size("pipeline.resize", values["resize"], optional=True)
    scale = values["scale_range"]
    if (not isinstance(scale, (list, tuple)) or len(scale) != 2
            or not all(is_number(s) and s > 0 for s in scale) or scale[0] > scale[1]):
        fail("pipeline.scale_range", scale, "a (low, high) pair of positive numbers, "
             "low <= high")
    for name in ("flip", "cache", "validate_data"):
        check_bool(f"pipeline.{name}", values[name])
    check_integer("pipeline.seed", values["seed"])


def check_labels(values: dict) -> None:
    """`labels.*` (see `kssl.configured.labelled_subset`)."""
    chosen = [f"labels.{name}" for name in ("count", "fraction", "split_file")
              if values[name] is not None]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} are both set: give one of labels.count, "
                          "labels.fraction and labels.split_file (or none, to label every "
                          "training image)")
    check_integer("labels.count", values["count"], minimum=1, optional=True)
    check_number("labels.fraction", values["fraction"], low=0, high=1, low_open=True,
                 optional=True)
    check_string("labels.split_file", values["split_file"], optional=True)
    check_string("labels.unlabelled_file", values["unlabelled_file"], optional=True)
    check_integer("labels.seed", values["seed"])


def missing_weights_hint(path: str) -> str:
    """How to make a missing `model.weights` file: converted PyTorch weights come from
    bin/convert_weights, whose --arch is guessed from the file name."""
    if not path.endswith(".weights.h5"):
        return ""
    from kssl.models.checkpoints.convert import known_archs

    name = os.path.basename(path)
    matches = sorted((a for a in known_archs() if a in name), key=len)
    arch = matches[-1] if matches else "NAME"
    hint = "" if matches else " (--arch help lists the names)"
    return (f"; make it from the PyTorch checkpoint with bin/convert_weights --from "
            f"FILE.pth --arch {arch} --output {path}{hint}, see the README, "
            f"'PyTorch checkpoints'")


def check_model(values: dict) -> None:
    """`model.*` (see `kssl.configured.build_model` and `kssl.models.build_segmenter`)."""
    from kssl.models import factory as models
    from kssl.models.backbones.resnet import STRIDE_ON, STEM_POOLS, PREPROCESS
    from kssl.models.layers import NORMS

    check_choice("model.arch", values["arch"], sorted(models.HEADS))
    check_choice("model.backbone", values["backbone"], sorted(models.BACKBONES))
    check_choice("model.norm", values["norm"], ("auto",) + tuple(NORMS))
    check_choice("model.output_stride", values["output_stride"], (None, 8, 16, 32))
    weights = values["weights"]
    if weights is not None and weights != "imagenet":
        check_string("model.weights", weights)
        if not os.path.isfile(weights):
            where = "" if os.path.isabs(weights) else f" (in {os.getcwd()})"
            raise ConfigError(f"model.weights = {weights!r}: no such file{where}; expected "
                              f"None, 'imagenet' or a weight file"
                              f"{missing_weights_hint(weights)}")
    for name, choices in (("stride_on", STRIDE_ON), ("stem_pool", STEM_POOLS),
                          ("preprocess", tuple(PREPROCESS))):
        if values[name] is not None:
            check_choice(f"model.{name}", values[name], choices)
    check_bool("model.align_corners", values["align_corners"])
    for name in ("aspp_channels", "low_level_channels", "decoder_channels", "psp_channels"):
        check_integer(f"model.{name}", values[name], minimum=1, optional=True)
    check_number("model.dropout", values["dropout"], low=0, high=1, high_open=True,
                 optional=True)
    for name in ("separable", "mitrans"):
        if values[name] is not None:
            check_bool(f"model.{name}", values[name])
    rates = values["aspp_rates"]
    if rates is not None and (not isinstance(rates, (list, tuple)) or not rates
                              or not all(is_integer(r) and r > 0 for r in rates)):
        fail("model.aspp_rates", rates, "a list of positive integers or None")
    head_options = {name: values[name] for name in
                    ("aspp_rates", "aspp_channels", "low_level_channels", "decoder_channels",
                     "dropout", "separable", "psp_channels", "mitrans")
                    if values[name] is not None}
    try:
        models._head_builder(values["arch"], head_options)
    except ValueError as error:  # an option the architecture does not have
        raise ConfigError(f"model.arch = {values['arch']!r}: {error}") from None


def check_optimizer(values: dict) -> None:
    """`optimizer.*` (see `kssl.optimizers.build_optimizer`)."""
    from kssl.optimizers import BATCH_SCALING_RULES

    check_choice("optimizer.name", values["name"], OPTIMIZERS)
    check_number("optimizer.learning_rate", values["learning_rate"], low=0, low_open=True)
    check_number("optimizer.momentum", values["momentum"], low=0, high=1, high_open=True)
    check_bool("optimizer.nesterov", values["nesterov"])
    if values["nesterov"] and values["name"] != "sgd":
        raise ConfigError(f"optimizer.nesterov = True: Nesterov momentum is an SGD option; "
                          f"optimizer.name is {values['name']!r}")
    check_number("optimizer.weight_decay", values["weight_decay"], low=0, optional=True)
    check_choice("optimizer.schedule", values["schedule"], SCHEDULES)
    check_number("optimizer.power", values["power"], low=0, low_open=True)
    check_number("optimizer.end_learning_rate", values["end_learning_rate"], low=0)
    check_integer("optimizer.reference_batch_size", values["reference_batch_size"],
                  minimum=1, optional=True)
    check_choice("optimizer.batch_scaling", values["batch_scaling"], BATCH_SCALING_RULES)


def check_evaluation(values: dict) -> None:
    """`evaluation.*` (see `kssl.configured.evaluation_settings`)."""
    from kssl import evaluation

    check_choice("evaluation.mode", values["mode"], evaluation.MODES)
    for name in ("input_size", "window", "stride"):
        value = values[name]
        if value is not None and not (is_integer(value) and value > 0):
            check_size(f"evaluation.{name}", value, optional=True)
    check_bool("evaluation.flip", values["flip"])
    try:
        evaluation.resolve_mode(values["mode"], values["window"], values["stride"],
                                values["input_size"])
    except ValueError as error:  # sliding without a window, a stride above the window
        raise ConfigError(f"evaluation settings: {error}") from None


# -- a whole run ----------------------------------------------------------------------------
def check_workdir(workdir: str) -> None:
    """A run directory: a folder, or a path that does not exist yet."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} is a file; expected a folder for the run "
                          "(or a path that does not exist yet)")
