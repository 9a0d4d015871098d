"""grain pipelines over random-access sources: deterministic, sharded per process, resumable.

The global batch k holds records [k·B, (k+1)·B) of the source, whatever the number of
processes: process p of P reads records p, p+P, p+2P, ... and batches them b = B/P at a time,
so the union of the processes' k-th batches is that global batch. The training iterator is a
grain ``DatasetIterator`` whose ``get_state()`` / ``set_state()`` (a small JSON-able dict) is
saved in every checkpoint; restoring it yields the same next batches.

Batches are dicts of numpy arrays with a leading batch axis: ``inputs`` (b, l) int32,
``targets`` (b, l) int32, ``mask`` (b, l) bool (see ``mamba_jax.data.synthetic``).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np

from mamba_jax.data.synthetic import Record


def process_shard(process_index: int | None = None,
                  process_count: int | None = None) -> tuple[int, int]:
  """(index, count) of this process, from jax unless given."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index must be in [0, {count}), got {index}")
  return index, count


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """B / P, which must be a whole number."""
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"batch_size must be a positive multiple of the process count "
                     f"{process_count}, got {global_batch_size}")
  return global_batch_size // process_count


def batched_dataset(source: Sequence[Record], global_batch_size: int, *,
                    process_index: int | None = None,
                    process_count: int | None = None) -> grain.MapDataset:
  """This process's batches of ``source``, in order; batch k is its part of global batch k."""
  index, count = process_shard(process_index, process_count)
  per_process = local_batch_size(global_batch_size, count)
  return grain.MapDataset.source(source)[index::count].batch(per_process, drop_remainder=True)


def train_iterator(source: Sequence[Record], global_batch_size: int, *,
                   num_threads: int = 1, prefetch: int = 4,
                   process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator over this process's training batches.

  Args:
    source: random-access records (e.g. a ``mamba_jax.data.synthetic`` task).
    global_batch_size: B, records per step summed over processes.
    num_threads: grain reader threads (0 reads in the calling thread).
    prefetch: batches read ahead (only with num_threads > 0).
  """
  ds = batched_dataset(source, global_batch_size, process_index=process_index,
                       process_count=process_count)
  options = grain.ReadOptions(num_threads=num_threads,
                              prefetch_buffer_size=prefetch if num_threads > 0 else 0)
  return iter(ds.to_iter_dataset(options))


def eval_batches(source: Sequence[Record], global_batch_size: int, num_batches: int, *,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """The first ``num_batches`` batches of ``source`` for this process (the same every call)."""
  ds = batched_dataset(source, global_batch_size, process_index=process_index,
                       process_count=process_count)
  if num_batches > len(ds):
    raise ValueError(f"num_batches must be <= {len(ds)} for this source, got {num_batches}")
  for k in range(num_batches):
    yield ds[k]


def iterator_state(iterator: grain.DatasetIterator) -> dict[str, Any]:
  """The iterator's state as a JSON-able dict (numpy scalars made Python ints)."""
  return {k: (v.item() if isinstance(v, np.generic) else v)
          for k, v in iterator.get_state().items()}
