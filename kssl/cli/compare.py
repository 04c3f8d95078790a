"""`bin/compare --workdir A --workdir B [...]`: where trained runs' predictions differ."""

from __future__ import annotations

from absl import flags

from kssl.cli import common

flags.DEFINE_multi_string("workdir", None, "A finished training run directory (repeat the "
                          "flag for each run to compare).", required=True)
flags.DEFINE_string("split", None, "Split to score (default: the first run's eval split).")
flags.DEFINE_string("output", None, "Also write the comparison to this JSON file.")
flags.DEFINE_bool("overwrite", False, "Replace a file already at --output.")
FLAGS = flags.FLAGS


@common.guarded
def main(argv):
    del argv
    import gin

    from kssl import compare, configured, run_files
    from kssl.data import pipeline

    if FLAGS.output:  # before any run is loaded
        problem = run_files.output_file_problem(FLAGS.output, FLAGS.overwrite)
        if problem:
            common.fail(problem)

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
        run_files.write_json(FLAGS.output, result)
        print(f"kssl: wrote {FLAGS.output}")


def run():
    common.run_tool(main, __name__)


if __name__ == "__main__":
    run()
