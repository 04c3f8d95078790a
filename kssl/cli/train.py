"""`bin/train --config F.gin [--gin_param 'x.y = z']... [--workdir DIR] [--start_stage N]
[--strategy NAME]`."""

from __future__ import annotations

import os

from absl import flags

from kssl.cli import common

flags.DEFINE_multi_string("config", [], "Gin config file(s), parsed in order.")
flags.DEFINE_multi_string("gin_param", [], "Gin binding(s), e.g. 'train.steps = 100'.")
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
flags.DEFINE_bool("overwrite", False, "Discard an earlier run in --workdir and start afresh.")
flags.DEFINE_integer("start_stage", None, "Staged methods (ThreeStage): start at stage N from "
                     "the pseudo-masks stage N-1 stored in --workdir.")
flags.DEFINE_enum("strategy", None, ["auto", "mirrored", "one_device", "multi_worker", "tpu"],
                  "Distribution strategy (sets train.strategy): multi_worker reads the "
                  "cluster from the TF_CONFIG environment variable; see the README, "
                  "'Distributed training'.")
FLAGS = flags.FLAGS


@common.guarded
def main(argv):
    del argv
    from kssl import config, training

    bindings = list(FLAGS.gin_param)
    if FLAGS.strategy:  # a binding, so every stage of a staged method uses it too
        bindings.append(f"train.strategy = {FLAGS.strategy!r}")
    workdir = common.parse_run_config(FLAGS.config, bindings, FLAGS.workdir)
    print(f"kssl: training into {workdir}", flush=True)
    extra = {} if FLAGS.start_stage is None else {"start_stage": FLAGS.start_stage}
    config.call_configured(training.train, workdir, overwrite=FLAGS.overwrite, **extra)
    print(f"kssl: done; metrics in {os.path.join(workdir, 'metrics.json')}", flush=True)


def run():
    common.run_tool(main, __name__)


if __name__ == "__main__":
    run()
