"""What every command-line tool shares: quiet TensorFlow logs and one-line errors."""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's Python INFO lines (e.g. one per collective all-reduce it builds when a
# multi-worker step is traced) would bury the tools' own output.
logging.getLogger("tensorflow").setLevel(logging.WARNING)


def fail(message: str) -> None:
    """Prints a one-line error and exits with status 2 (nothing half-written)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def guarded(main):
    """Wraps an absl main so that expected user errors print one line, not a traceback."""

    def wrapped(argv):
        # Imported here, not when the tool's module is: `--help` needs no TensorFlow.
        from kssl.config import ConfigError, without_gin_context
        from kssl.data.readers.base import DataError

        try:
            return main(argv)
        except (ConfigError, DataError, FileNotFoundError) as error:
            # Raised inside a gin configurable, the message carries gin's call context.
            message = without_gin_context(error)
            fail(" ".join(message.split()) if isinstance(error, ConfigError) else message)
    return wrapped


def run_tool(main, module_name: str) -> None:
    """Runs the absl `main` of the tool defined in `module_name`, with a `--help` that
    shows that module's docstring and flags.

    absl's `--help` describes the launching script (bin/X, or the kssl-X entry point),
    which defines no flags of its own.
    """
    from absl import app, flags

    sys.modules["__main__"].__doc__ = sys.modules[module_name].__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)


def load_run(workdir: str, bindings=()):
    """Re-reads a training run's operative config, then `bindings` (`--gin_param`, which
    can point the reader elsewhere); returns (reader, eval_split). A staged method's run
    directory and each of its `stage_N/` directories read like any run (see
    `kssl.config.parse_saved_run`)."""
    from kssl import config, training

    path = os.path.join(workdir, "config.gin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a kssl training directory?")
    config.parse_saved_run(path, bindings, stage=run_stage(workdir))
    reader, _, eval_split = config.call_configured(training.dataset_setup)
    return reader, eval_split


def run_stage(workdir: str):
    """The stage of a staged method whose run `workdir` holds: the `stage` its
    metrics.json records, else N for a folder named `stage_N`; None for a whole run (its
    config.gin is the last stage's)."""
    import json
    import re

    try:
        with open(os.path.join(workdir, "metrics.json")) as f:
            stage = json.load(f).get("stage")
        if isinstance(stage, int):
            return stage
    except (OSError, ValueError, AttributeError):  # unfinished, or not a run's metrics
        pass
    match = re.fullmatch(r"stage_(\d+)", os.path.basename(os.path.normpath(workdir)))
    return int(match.group(1)) if match else None


def load_inference_network(workdir: str, num_classes: int):
    """Builds the configured segmenter and loads the run's trained weights."""
    from kssl import training

    weights = os.path.join(workdir, "model.weights.h5")
    if not os.path.exists(weights):
        raise FileNotFoundError(
            f"{weights} not found: the run in {workdir} has not finished (run bin/train "
            "again with the same --workdir to resume it)")
    network = training.build_model(num_classes, weights=None)
    network.load_weights(weights)
    return network


def load_trained(workdir: str):
    """A finished run: (reader, eval split, trained inference network)."""
    reader, eval_split = load_run(workdir)
    return reader, eval_split, load_inference_network(workdir, reader.info.num_classes)


def parse_run_config(config_files, bindings, workdir=None, prefix="") -> str:
    """Parses the config flags; returns the run directory (default runs/<prefix><config>)."""
    from kssl import config

    if not config_files:
        fail("--config is required, e.g. --config configs/quickstart.gin")
    config.parse(config_files, bindings)
    name = os.path.splitext(os.path.basename(config_files[-1]))[0]
    return workdir or os.path.join("runs", prefix + name)
