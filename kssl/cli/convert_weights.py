"""`bin/convert_weights --from FILE.pth --arch NAME --output FILE.weights.h5`.

Converts a PyTorch checkpoint (read without torch) into a kssl weight file that configs
load with `model.weights = 'FILE.weights.h5'`. Prints what was converted and every tensor
left unused; a missing or mis-shaped tensor fails with one line naming it.
Architectures: see `kssl.models.checkpoints.convert` (`--arch help` lists them).
"""

from __future__ import annotations

import sys

from absl import flags

from kssl.cli import common

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined when the tool runs, not on import: other tools define --output too, and a
    # test (or a script) may import several of them into one process.
    # Checked in main rather than by absl, so `--arch help` works on its own.
    flags.DEFINE_string("from", None, "The PyTorch checkpoint (.pth / .pt).")
    flags.DEFINE_string("arch", None, "What the checkpoint holds, e.g. deeplabv2_resnet101, "
                        "resnet101_torchvision; 'help' lists them.")
    flags.DEFINE_string("output", None, "The kssl weight file to write (FILE.weights.h5).")
    flags.DEFINE_string("key", None, "Checkpoint entry holding the state dict, if the "
                        "automatic unwrapping ({'state_dict': ...}, {'model': ...}) fails.")
    flags.DEFINE_bool("overwrite", False, "Replace a file already at --output.")
    flags.DEFINE_bool("verbose", False, "Also list every converted tensor and its target.")


def convert(source: str, arch: str, output: str, key: str | None = None,
            verbose: bool = False, stream=None):
    """Converts `source` for `arch` into `output` and prints the report; returns it.

    Raises the converter's errors (ConversionError, CheckpointError, ...) unchanged.
    """
    from kssl.models.checkpoints import convert as conversion

    report = conversion.convert_file(source, arch, output, key=key)
    print(report.format(verbose=verbose), file=stream or sys.stdout, flush=True)
    return report


def main(argv):
    """absl entry point: runs `convert` with the flags, errors as one line."""
    del argv
    from kssl.models.checkpoints import convert as conversion

    arch = FLAGS.arch
    if arch == "help":
        print("\n".join(conversion.known_archs()))
        return
    missing = [f"--{name}" for name in ("from", "arch", "output") if not FLAGS[name].value]
    if missing:
        common.fail(f"{', '.join(missing)} required: bin/convert_weights --from FILE.pth "
                    f"--arch {{{','.join(conversion.known_archs())}}} --output "
                    "FILE.weights.h5")
    from kssl import run_files

    problem = run_files.output_file_problem(FLAGS.output, FLAGS.overwrite)
    if problem:
        common.fail(problem)
    try:
        convert(FLAGS["from"].value, arch, FLAGS.output, key=FLAGS.key,
                verbose=FLAGS.verbose)
    except (ValueError, OSError) as error:  # ConversionError, CheckpointError, missing file
        common.fail(" ".join(str(error).split()))


def run():
    """What bin/convert_weights runs."""
    _define_flags()
    common.run_tool(main, __name__)


if __name__ == "__main__":
    run()
