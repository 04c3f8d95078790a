"""`bin/evaluate --workdir DIR [--split NAME]`: scores a trained run, writes eval_NAME.json."""

from __future__ import annotations

import os

from absl import flags

from kssl.cli import common

flags.DEFINE_string("workdir", None, "A finished training run directory.", required=True)
flags.DEFINE_string("split", None, "Split to score (default: the run's eval split).")
flags.DEFINE_multi_string("gin_param", [], "Extra gin bindings over the run's config.gin, "
                          "e.g. evaluation.mode or camvid.root (applied before the data "
                          "is read).")
flags.DEFINE_integer("recompute_batch_norm", 0, "Before scoring, set every batch norm's "
                     "moving statistics to the average batch statistics of this many "
                     "batches of the training split's images (all of them, labelled or "
                     "not, shuffled with a fixed seed; resized as the run's pipeline and "
                     "centre-cropped to its crop size, no other augmentation), with the "
                     "weights unchanged; scores go to eval_SPLIT_recomputed_bn.json. 0: off.",
                     lower_bound=0)
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
    suffix = ""
    if FLAGS.recompute_batch_norm:
        from kssl.models import batch_norm_statistics
        used = batch_norm_statistics.recompute_batch_norm_statistics(
            network, clean_training_batches(reader, FLAGS.recompute_batch_norm))
        print(f"kssl: batch-norm moving statistics recomputed from {used} batches of "
              "clean training images")
        suffix = "_recomputed_bn"
    class_names = list(reader.info.class_names)
    result = evaluation.evaluate(network, pipeline.eval_dataset(reader, examples),
                                 reader.info.num_classes, class_names=class_names,
                                 **configured.evaluation_settings())
    result["split"] = split
    print(evaluation.format_iou_table(result, class_names))
    path = os.path.join(FLAGS.workdir, f"eval_{split.replace(os.sep, '_')}{suffix}.json")
    run_files.write_json(path, result)
    print(f"kssl: wrote {path}")


def clean_training_batches(reader, batches: int):
    """`batches` batches of the training split's images (pipeline batch size), shuffled
    with a fixed seed, resized as the run's pipeline and centre-cropped (or padded) to its
    crop size: the images a training step sees, without their random augmentation."""
    import tensorflow as tf

    from kssl import config, configured
    from kssl.data import pipeline

    settings = config.call_configured(configured.pipeline_settings)
    examples = reader.examples("train")

    def prepare(example):
        image = example["image"]
        if settings["resize"] is not None:
            image = tf.image.resize(image, settings["resize"])
        return tf.image.resize_with_crop_or_pad(image, *settings["crop_size"])

    images = (pipeline.eval_dataset(reader, examples, with_masks=False).unbatch()
              .map(prepare).shuffle(len(examples), seed=0).batch(settings["batch_size"]))
    return images.take(batches)


def run():
    common.run_tool(main, __name__)


if __name__ == "__main__":
    run()
