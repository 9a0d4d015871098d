"""Trains and evaluates the model rows of an experiment config.

  python -m experiments.main --config=experiments/configs/selective_copying.py:tiny \
      --workdir=/tmp/selective_copying_tiny

Rerunning a command with the same workdir resumes it from its latest checkpoints. On several
hosts, run the same command on each with ``--distributed`` (or with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set, or on a cluster jax detects): every process calls
``jax.distributed.initialize()`` before touching a device.
"""

from __future__ import annotations

import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mamba_jax.training.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics, results")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "call jax.distributed.initialize() (multi-host runs)")
flags.mark_flags_as_required(["config", "workdir"])


class _LibraryInfoFilter(std_logging.Filter):
  """Drops INFO and below from orbax and grain (a dozen lines per checkpoint); keeps warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, "/")
    chatty = "/orbax/" in path or "/grain/" in path
    return record.levelno >= std_logging.WARNING or not chatty


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  if _DISTRIBUTED.value or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()
  logging.info("process %d of %d; %d local of %d devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.local_devices())
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
