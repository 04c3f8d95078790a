"""`bin/predict --workdir DIR --input FOLDER --output FOLDER`: colour mask PNGs."""

from __future__ import annotations

from absl import flags

from kssl.cli import common

flags.DEFINE_string("workdir", None, "A finished training run directory.", required=True)
flags.DEFINE_string("input", None, "Folder of images (jpg, png, bmp).", required=True)
flags.DEFINE_string("output", None, "Folder for the colour masks.", required=True)
flags.DEFINE_bool("write_ids", False, "Also write class-id PNGs (<name>_ids.png).")
flags.DEFINE_bool("overwrite", False, "Replace masks of the same names already in --output.")
FLAGS = flags.FLAGS


@common.guarded
def main(argv):
    del argv
    from kssl import configured, predict

    reader, _, network = common.load_trained(FLAGS.workdir)
    try:
        written = predict.predict_folder(network, FLAGS.input, FLAGS.output,
                                         reader.info.palette, write_ids=FLAGS.write_ids,
                                         overwrite=FLAGS.overwrite,
                                         **configured.evaluation_settings())
    except (ValueError, FileExistsError) as error:  # no images, name clashes, bad --output
        common.fail(str(error))
    print(f"kssl: wrote {len(written)} mask(s) to {FLAGS.output}")


def run():
    common.run_tool(main, __name__)


if __name__ == "__main__":
    run()
