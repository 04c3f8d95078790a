"""`bin/compare --workdir A --workdir B [...]`: where trained runs' predictions differ."""

from __future__ import annotations

import json

from absl import flags

from kssl.cli import common

flags.DEFINE_multi_string("workdir", None, "A finished training run directory (repeat the "
                          "flag for each run to compare).", required=True)
flags.DEFINE_string("split", None, "Split to score (default: the first run's eval split).")
flags.DEFINE_string("output", None, "Also write the comparison to this JSON file.")
FLAGS = flags.FLAGS


@common.guarded
def main(argv):
    del argv
    import gin

    from kssl import compare, configured
    from kssl.data import pipeline

    networks, class_lists, first = {}, [], None
    for workdir in FLAGS.workdir:
        if workdir in networks:
            common.fail(f"--workdir {workdir} is given twice")
        gin.clear_config()  # each run's own config, nothing left from the one before
        reader, eval_split, network = common.load_trained(workdir)
        networks[workdir] = (network, configured.evaluation_settings())
        class_lists.append(reader.info.class_names)
        first = first or (reader, eval_split)
    try:
        compare.check_same_classes(class_lists, FLAGS.workdir)
    except ValueError as error:
        common.fail(str(error))
    reader, eval_split = first
    split = FLAGS.split or eval_split
    result = compare.compare_predictions(
        networks, pipeline.eval_dataset(reader, reader.examples(split)))
    result["split"] = split
    print(compare.format_comparison(result))
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(result, f, indent=2)
        print(f"kssl: wrote {FLAGS.output}")


def run():
    common.run_tool(main, __name__)


if __name__ == "__main__":
    run()
