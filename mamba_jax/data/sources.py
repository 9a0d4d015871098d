"""Where the offline data sets live, and the on-disk cache of what is derived from them.

Nothing is downloaded: every source is a file installed by a Debian or PyPI package
(``scripts/setup_data.sh`` installs them all). :func:`require_file` and
:func:`require_package_dir` fail with the exact command that installs a missing source.
Parsed or generated data (token arrays, rendered audio) are cached as compressed ``.npz``
files under :func:`cache_dir`, named by a hash of their parameters and stamped with the versions
of the tools that made them: a change of parameters gives a new file, a change of tool version
a rebuild, never a stale file. The key names no source file's contents, so a cache directory
can be copied to a machine without the sources (``scripts/build_data_cache.py``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from typing import Any, Callable

import numpy as np

SETUP_COMMAND = "bash scripts/setup_data.sh"


def check_split(split: str) -> None:
  """Raises unless ``split`` names one of a source's two splits."""
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def cache_dir() -> str:
  """``$MAMBA_JAX_CACHE`` or ``~/.cache/mamba_jax`` (created on first use)."""
  path = os.environ.get("MAMBA_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "mamba_jax")
  os.makedirs(path, exist_ok=True)
  return path


def require_file(path: str, install: str) -> str:
  """``path`` if it exists, else FileNotFoundError naming the command that installs it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing; install it with `{install}` "
                            f"(or `{SETUP_COMMAND}`, which installs every data source)")
  return path


def require_executable(name: str, install: str) -> str:
  """The full path of the program ``name``, else FileNotFoundError with its install command."""
  for directory in os.environ.get("PATH", "").split(os.pathsep):
    candidate = os.path.join(directory, name)
    if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
      return candidate
  raise FileNotFoundError(f"the program {name!r} is not installed; install it with "
                          f"`{install}` (or `{SETUP_COMMAND}`)")


def require_package_dir(package: str, install: str) -> str:
  """The directory of an installed PyPI package, found without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the Python package {package!r} is not installed; install it "
                            f"with `{install}` (or `{SETUP_COMMAND}`)")
  return list(spec.submodule_search_locations)[0]


def cache_key(**fields: Any) -> str:
  """A short hash of JSON-able ``fields`` (sorted), for cache file names."""
  blob = json.dumps(fields, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:20]


def cached_arrays(name: str, key: str, build: Callable[[], dict[str, np.ndarray]],
                  versions: dict[str, str] | None = None) -> dict[str, np.ndarray]:
  """``build()``'s arrays, read from ``cache_dir()/name-key.npz`` when that file exists.

  ``versions`` ({tool: version} of the generators found on this machine) are stored with
  the arrays; a cached file made by another version of a tool that is present here is
  rebuilt, while tools absent here (e.g. a GPU machine without espeak-ng, handed a cache
  directory) are not checked. The file is written atomically (a temporary file renamed), so
  concurrent builders (test workers, grain threads) never read a partial file.
  """
  path = os.path.join(cache_dir(), f"{name}-{key}.npz")
  versions = dict(versions or {})
  if os.path.exists(path):
    with np.load(path) as data:
      arrays = {k: data[k] for k in data.files}
    stored = json.loads(str(arrays.pop(_VERSIONS, "{}")))
    if all(stored.get(tool, version) == version for tool, version in versions.items()):
      return arrays
  arrays = build()
  fd, tmp = tempfile.mkstemp(dir=cache_dir(), suffix=".npz.tmp")
  with os.fdopen(fd, "wb") as f:
    np.savez_compressed(f, **arrays, **{_VERSIONS: np.array(json.dumps(versions))})
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)
  return arrays


_VERSIONS = "__versions__"
