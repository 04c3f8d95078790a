"""`bin/evaluate --workdir DIR [--split NAME]`: scores a trained run, writes eval_NAME.json."""

from __future__ import annotations

import json
import os

from absl import app, flags

from kssl.cli import common

flags.DEFINE_string("workdir", None, "A finished training run directory.", required=True)
flags.DEFINE_string("split", None, "Split to score (default: the run's eval split).")
flags.DEFINE_multi_string("gin_param", [], "Extra gin bindings, e.g. evaluation.mode.")
FLAGS = flags.FLAGS


@common.guarded
def main(argv):
    del argv
    from kssl import config, evaluation, training
    from kssl.data import pipeline

    reader, eval_split = common.load_run(FLAGS.workdir)
    config.parse([], FLAGS.gin_param)
    split = FLAGS.split or eval_split
    network = common.load_inference_network(FLAGS.workdir, reader.info.num_classes)
    examples = reader.examples(split)
    class_names = list(reader.info.class_names)
    result = evaluation.evaluate(network, pipeline.eval_dataset(reader, examples),
                                 reader.info.num_classes, class_names=class_names,
                                 **training.evaluation_settings())
    result["split"] = split
    print(evaluation.format_iou_table(result, class_names))
    path = os.path.join(FLAGS.workdir, f"eval_{split.replace(os.sep, '_')}.json")
    with open(path, "w") as f:
        json.dump(training._jsonable(result), f, indent=2)
    print(f"kssl: wrote {path}")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
