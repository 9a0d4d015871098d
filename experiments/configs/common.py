"""Fields shared by the experiment configs: schedule, logging, checkpoints, evaluation.

Each config file calls :func:`base_config` and fills in the task, the model and the rows.
Field meanings: ``mamba_jax.training.loop`` (run), ``mamba_jax.training.optimizer``
(``optimizer``), ``mamba_jax.training.results`` (``results``), ``mamba_jax.sharding.mesh``
(``mesh``: the device mesh, one size per axis, -1 = the remaining devices; e.g.
``--config.mesh.tensor=2`` or ``--config.mesh.fsdp=2 --config.mesh.sequence=2``).
"""

from __future__ import annotations

import ml_collections

from mamba_jax.training.optimizer import default_optimizer_config


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = ""
  config.reproduces = ""
  config.seed = 0
  config.data_seed = 1
  config.eval_seed = 2
  config.task = ml_collections.ConfigDict()
  config.eval_tasks = {"": {}}
  config.model = ml_collections.ConfigDict()
  config.rows = []
  config.only_rows = ""
  config.optimizer = default_optimizer_config()
  config.batch_size = 64
  config.num_train_steps = 1000
  config.eval_batch_size = 64
  config.eval_batches = 8
  config.max_eval_length = 0  # 0: no limit
  config.compute_dtype = "float32"
  # Training memory (mamba_jax.training.train_step): remat 0 keeps every activation, 1
  # rematerializes each block in the backward, k >= 2 groups of k blocks; take the LM head and
  # loss loss_chunk positions at a time (0: the whole logits).
  config.remat = 0
  config.loss_chunk = 0
  config.log_every_steps = 50
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.max_to_keep = 2
  config.async_checkpoint = True
  config.tensorboard = True
  config.skip_nonfinite = False
  config.profile_steps = ()
  config.data_threads = 1
  # Device mesh (docs/sharding.md): the product of the sizes is the number of devices, one
  # size may be -1 (the rest). The default is data parallelism over every device.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))
  config.results = ml_collections.ConfigDict(dict(columns=["accuracy"], plot="none",
                                                  group_by=""))
  return config
