"""`bin/export --workdir DIR --output PATH`: the inference network as a SavedModel."""

from __future__ import annotations

from absl import app, flags

from kssl.cli import common

flags.DEFINE_string("workdir", None, "A finished training run directory.", required=True)
flags.DEFINE_string("output", None, "Where to write the SavedModel.", required=True)
FLAGS = flags.FLAGS


@common.guarded
def main(argv):
    del argv
    from kssl import export, training

    reader, _, network = common.load_trained(FLAGS.workdir)
    # A model trained at reduced resolution is served the way it was scored: resized to
    # its evaluation input size, probabilities resized back to the image's size.
    input_size = training.evaluation_settings()["input_size"]
    export.export_saved_model(network, FLAGS.output, reader.info.num_classes,
                              input_size=input_size)
    print(f"kssl: wrote SavedModel to {FLAGS.output}")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
