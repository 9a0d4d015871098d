"""One name → task table over the data modules, for the training loop and the configs.

Each module in :data:`TASK_MODULES` defines ``TASKS = {name: constructor}``; a constructor
takes the task's fields (``config.task`` without "name", plus ``seed``) and returns a
random-access source of records (``inputs`` / ``targets`` / ``mask``, see
``mamba_jax.data.synthetic``). Modules are imported in order only until the name is found, so
a data module's optional dependencies are needed only by the configs that name its tasks.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable

TASK_MODULES = ("mamba_jax.data.synthetic", "mamba_jax.data.text", "mamba_jax.data.dna",
                "mamba_jax.data.audio")


def _tasks_of(module_name: str) -> dict[str, Callable[..., Any]]:
  if importlib.util.find_spec(module_name) is None:  # a module this checkout does not have
    return {}
  return importlib.import_module(module_name).TASKS


def find_task(name: str) -> Callable[..., Any]:
  """The constructor of task ``name`` (ValueError listing every known name otherwise)."""
  for module_name in TASK_MODULES:
    table = _tasks_of(module_name)
    if name in table:
      return table[name]
  known = sorted(n for m in TASK_MODULES for n in _tasks_of(m))
  raise ValueError(f"task must be one of {known}, got {name!r}")


def make_task(name: str, **fields: Any) -> Any:
  """Builds the task ``name`` from its fields."""
  return find_task(name)(**fields)
