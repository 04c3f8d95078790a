"""`bin/evaluate --workdir DIR [--split NAME]`: scores a trained run, writes eval_NAME.json."""

from __future__ import annotations

import json
import os

from absl import flags

from kssl.cli import common

flags.DEFINE_string("workdir", None, "A finished training run directory.", required=True)
flags.DEFINE_string("split", None, "Split to score (default: the run's eval split).")
flags.DEFINE_multi_string("gin_param", [], "Extra gin bindings over the run's config.gin, "
                          "e.g. evaluation.mode or camvid.root (applied before the data "
                          "is read).")
FLAGS = flags.FLAGS


@common.guarded
def main(argv):
    del argv
    from kssl import config, configured, evaluation, run_files
    from kssl.data import pipeline, validate

    # The bindings come before the reader is built: they may point it at other data.
    reader, eval_split = common.load_run(FLAGS.workdir, FLAGS.gin_param)
    split = FLAGS.split or eval_split
    examples = reader.examples(split)
    # Training's checks of its evaluation split, so that bad labels are not scored and an
    # unreadable file is named rather than crashing the pipeline.
    if config.call_configured(configured.pipeline_settings)["validate_data"]:
        validate.validate(reader, examples, with_masks=True,
                          num_classes=reader.info.num_classes, what="evaluation")
    network = common.load_inference_network(FLAGS.workdir, reader.info.num_classes)
    class_names = list(reader.info.class_names)
    result = evaluation.evaluate(network, pipeline.eval_dataset(reader, examples),
                                 reader.info.num_classes, class_names=class_names,
                                 **configured.evaluation_settings())
    result["split"] = split
    print(evaluation.format_iou_table(result, class_names))
    path = os.path.join(FLAGS.workdir, f"eval_{split.replace(os.sep, '_')}.json")
    with open(path, "w") as f:
        json.dump(run_files.jsonable(result), f, indent=2)
    print(f"kssl: wrote {path}")


def run():
    common.run_tool(main, __name__)


if __name__ == "__main__":
    run()
