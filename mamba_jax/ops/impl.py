"""Choosing which implementation of an op runs.

Public ops take ``impl="auto" | "sequential" | ...``. ``auto`` is resolved here, in one place,
from the platform of the default device, and the choice is logged once per (op, platform).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Sequence

from absl import logging
import jax

from mamba_jax.ops.checks import check_choice


def platform() -> str:
  """The default backend: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
  return jax.default_backend()


def gpu_compute_capability() -> tuple[int, int] | None:
  """(major, minor) of the first GPU, or None when the default device is not an NVIDIA GPU."""
  if platform() != "gpu":
    return None
  cc = getattr(jax.devices()[0], "compute_capability", None)
  if not cc:
    return None
  major, minor = str(cc).split(".")[:2]
  return int(major), int(minor)


def is_hopper_or_newer() -> bool:
  cc = gpu_compute_capability()
  return cc is not None and cc >= (9, 0)


# op -> the implementation "auto" resolves to, set by ``resolve_auto_as``.
_AUTO_CHOICES: dict[str, str] = {}


@contextlib.contextmanager
def resolve_auto_as(**choices: str) -> Iterator[None]:
  """Within the block, ``impl="auto"`` of each named op resolves to the given implementation.

  E.g. ``with resolve_auto_as(ssd_decode_step="xla"): ...`` to time a model's decoding without
  that kernel. Resolution happens when a function is traced: a function jitted before the
  block keeps its compiled choice (``jax.clear_caches()`` or a fresh function retraces).
  An op's own validation rejects a name it does not have when it resolves.
  """
  previous = dict(_AUTO_CHOICES)
  _AUTO_CHOICES.update(choices)
  try:
    yield
  finally:
    _AUTO_CHOICES.clear()
    _AUTO_CHOICES.update(previous)


@functools.lru_cache(maxsize=None)
def _log_choice(op: str, where: str, chosen: str) -> None:
  logging.info("%s: impl='auto' resolved to %r on %s", op, chosen, where)


def resolve_impl(op: str, impl: str, choices: Sequence[str],
                 auto: Callable[[], str]) -> str:
  """Validates ``impl`` against ``choices`` and resolves ``"auto"`` with ``auto()``.

  Args:
    op: the op's name, for messages and the log line.
    impl: what the caller asked for.
    choices: the concrete implementations the op has.
    auto: returns the implementation to use on the current platform.
  """
  check_choice(f"{op}: impl", impl, ("auto", *choices))
  if impl != "auto":
    return impl
  if op in _AUTO_CHOICES:
    check_choice(f"{op}: resolve_auto_as", _AUTO_CHOICES[op], choices)
    return _AUTO_CHOICES[op]
  chosen = auto()
  cc = gpu_compute_capability()
  _log_choice(op, platform() + (f" sm_{cc[0]}{cc[1]}" if cc else ""), chosen)
  return chosen
