"""The one entrypoint for every stage.

    python -m chimera_jax.train --config=configs/lm.py:arch=dense,size=tiny --workdir=runs/demo \
        [--config.model.num_layers=4 ...]

The same command on an existing workdir resumes from its latest checkpoint.
Multi-host: one process per host with --coordinator_address=HOST:PORT --num_processes=N --process_id=I
(or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables).
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from chimera_jax import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally with a variant: configs/lm.py:arch=dense",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, resolved config).")
flags.DEFINE_integer("stop_after", None, "Stop with a checkpoint after this many steps (as a preemption would).")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    distributed.initialize_from_flags()
    from chimera_jax.training import loop  # after distributed init: importing jax users is fine, using devices not

    _, result = loop.train(FLAGS.config, FLAGS.workdir, stop_after=FLAGS.stop_after)
    if result:
        print("final eval: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))


def run():
    try:
        app.run(main)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
