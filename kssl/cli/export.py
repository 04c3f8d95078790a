"""`bin/export --workdir DIR --output PATH [--format saved_model|tflite|onnx]`: the
inference network for deployment (see `kssl.export` for what each format takes)."""

from __future__ import annotations

from absl import flags

from kssl.cli import common

flags.DEFINE_string("workdir", None, "A finished training run directory.", required=True)
flags.DEFINE_string("output", None, "Where to write the model: a directory for saved_model, "
                    "a file (e.g. model.tflite, model.onnx) otherwise.", required=True)
flags.DEFINE_enum("format", "saved_model", ["saved_model", "tflite", "onnx"],
                  "saved_model (any image size), tflite (fixed image size, needs an input "
                  "size) or onnx (any image size; needs pip install kssl[onnx]).")
flags.DEFINE_list("input_size", None, "H,W: the size the network runs at. Default: the "
                  "run's evaluation.input_size. saved_model and onnx resize images to it "
                  "inside the graph; a tflite model takes images of exactly this size.")
flags.DEFINE_bool("overwrite", False, "Replace a model already at --output.")
FLAGS = flags.FLAGS


def parse_size(values):
    """`["H", "W"]` from --input_size as (H, W); None when the flag is not given."""
    if values is None:
        return None
    try:
        size = tuple(int(v) for v in values)
    except ValueError:
        size = ()
    if len(size) != 2 or min(size) < 1:
        common.fail(f"--input_size must be H,W (two positive integers), got "
                    f"{','.join(values)!r}")
    return size


@common.guarded
def main(argv):
    del argv
    from kssl import configured, export

    input_size = parse_size(FLAGS.input_size)
    try:  # before any work: nothing is replaced unless --overwrite says so
        export.check_output_path(FLAGS.output, FLAGS.format, FLAGS.overwrite)
    except export.ExportError as error:
        common.fail(str(error))
    reader, _ = common.load_run(FLAGS.workdir)
    # A model trained at reduced resolution is served the way it was scored: resized to
    # its evaluation input size, probabilities resized back to the image's size.
    if input_size is None:
        input_size = configured.evaluation_settings()["input_size"]
    # Settings and converters are checked before the network is built and loaded.
    if FLAGS.format == "tflite" and input_size is None:
        common.fail("--format tflite makes a model for one fixed image size: pass "
                    "--input_size H,W (e.g. the training crop size), or set "
                    "evaluation.input_size in the run's config")
    if FLAGS.format == "onnx" and not export.onnx_available():
        common.fail("--format onnx needs tf2onnx: pip install kssl[onnx]")
    network = common.load_inference_network(FLAGS.workdir, reader.info.num_classes)
    try:
        export.export_model(network, FLAGS.output, reader.info.num_classes,
                            format=FLAGS.format, input_size=input_size)
    except export.ExportError as error:
        common.fail(str(error))
    names = {"saved_model": "SavedModel", "tflite": "TFLite model", "onnx": "ONNX model"}
    size = "" if input_size is None else f" (network input {input_size[0]}x{input_size[1]})"
    print(f"kssl: wrote {names[FLAGS.format]} to {FLAGS.output}{size}")


def run():
    common.run_tool(main, __name__)


if __name__ == "__main__":
    run()
