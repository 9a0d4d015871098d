"""Builds (parses, synthesizes, renders) the data of an experiment config into the cache.

  python scripts/build_data_cache.py experiments/configs/dna_pretrain.py:gpu [--cache DIR]

Constructs every row's training task and evaluation tasks, which parses or generates their
data into ``$MAMBA_JAX_CACHE`` (or ``--cache``; default ``~/.cache/mamba_jax``), and prints the
cache files with their sizes. A machine without the data packages (a GPU host) can then run
the config with ``MAMBA_JAX_CACHE`` pointing at a copy of that directory: cache keys name the
parameters, not the source files (``mamba_jax.data.sources``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time


def _load_config(spec: str):
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("experiment_config", path)
  if module_spec is None or module_spec.loader is None:
    raise ValueError(f"config must be a path to a config file[:variant], got {spec!r}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("config", nargs="+", help="config file[:variant], one or more")
  parser.add_argument("--cache", default=None, help="cache directory (sets MAMBA_JAX_CACHE)")
  args = parser.parse_args(argv)
  if args.cache:
    os.environ["MAMBA_JAX_CACHE"] = os.path.abspath(args.cache)
  sys.path.insert(0, os.getcwd())
  from mamba_jax.data import sources, tasks  # pylint: disable=g-import-not-at-top
  from mamba_jax.training import loop  # pylint: disable=g-import-not-at-top

  for spec in args.config:
    config = _load_config(spec)
    for row in config.rows:
      cfg = loop.row_config(config, row)
      fields = cfg.task.to_dict()
      name = fields.pop("name")
      start = time.perf_counter()
      tasks.make_task(name, seed=0, **fields)
      for overrides in cfg.eval_tasks.values():
        extra = {k: v for k, v in dict(overrides).items()
                 if k not in ("batch_size", "num_batches")}
        tasks.make_task(name, seed=0, **{**fields, **extra})
      print(f"{spec} {cfg.name}: data ready in {time.perf_counter() - start:.1f} s",
            flush=True)
  directory = sources.cache_dir()
  total = 0
  for entry in sorted(os.listdir(directory)):
    size = os.path.getsize(os.path.join(directory, entry))
    total += size
  print(f"{directory}: {len(os.listdir(directory))} files, {total / 2**20:.1f} MiB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
