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
    from kssl import config, configured

    if os.path.isfile(workdir):
        raise FileNotFoundError(f"--workdir {workdir} is a file; expected a training run's "
                                "folder")
    path = os.path.join(workdir, "config.gin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a kssl training directory?")
    config.parse_saved_run(path, bindings, stage=run_stage(workdir))
    reader, _, eval_split = config.call_configured(configured.dataset_setup)
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
    from kssl import configured

    weights = os.path.join(workdir, "model.weights.h5")
    if not os.path.exists(weights):
        raise FileNotFoundError(
            f"{weights} not found: the run in {workdir} has not finished (run bin/train "
            "again with the same --workdir to resume it)")
    network = configured.build_model(num_classes, weights=None)
    load_trained_weights(network, weights, os.path.join(workdir, "config.gin"), num_classes)
    return network


def load_trained_weights(network, path: str, config_path: str, num_classes: int) -> None:
    """`network.load_weights(path)`; a damaged file, or one whose variables do not fit
    the network that `config_path` describes, is a one-line ConfigError naming `path`."""
    from kssl.config import ConfigError

    try:
        network.load_weights(path)
    except (OSError, KeyError, RuntimeError) as error:  # h5py: truncated, empty, not HDF5
        raise ConfigError(
            f"{path} is not a readable Keras weight file ({' '.join(str(error).split())}): "
            "it is damaged or incomplete; copy it again, or train the run again") from None
    except ValueError as error:
        detail = weight_mismatch(network, path) or str(error).strip().splitlines()[0]
        raise ConfigError(
            f"{path} does not fit the network {config_path} describes ({num_classes} "
            f"classes): {detail}; were the weights trained with another class count or "
            "model.* settings?") from None


def weight_mismatch(network, path: str) -> str:
    """The first difference between the variables stored in the weight file `path` and
    those `network` saves ("" when none is found)."""
    import tempfile

    import h5py

    def shapes(file_path):
        found = {}
        with h5py.File(file_path, "r") as f:
            f.visititems(lambda name, item: found.__setitem__(name, tuple(item.shape))
                         if isinstance(item, h5py.Dataset) else None)
        return found

    with tempfile.TemporaryDirectory() as scratch:
        expected_path = os.path.join(scratch, "expected.weights.h5")
        network.save_weights(expected_path)
        expected = shapes(expected_path)
    stored = shapes(path)
    for name in sorted(set(stored) & set(expected)):
        if stored[name] != expected[name]:
            classes = ""
            if "classifier" in name and stored[name][-1:] != expected[name][-1:]:
                classes = (f" (a classifier for {stored[name][-1]} classes, the network has "
                           f"{expected[name][-1]})")
            return (f"variable {name} has shape {stored[name]} in the file, "
                    f"{expected[name]} in the network{classes}")
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the network's variables are not in the file "
                         f"(e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} of the file's are not in the network (e.g. "
                         f"{extra[0]})")
        return " and ".join(parts) + ": another architecture"
    return ""


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
