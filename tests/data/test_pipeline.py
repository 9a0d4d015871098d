"""grain pipelines: batch contents, per-process sharding, iterator state restore."""

import json

import numpy as np
import pytest

from mamba_jax.data import pipeline
from mamba_jax.data.synthetic import InductionHeads

TASK = InductionHeads(length=16, vocab_size=8, seed=4)


def _records(indices):
  return np.stack([TASK[i]["inputs"] for i in indices])


def test_global_batch_k_holds_records_kB_to_k1B():
  it = pipeline.train_iterator(TASK, 4, num_threads=0, process_index=0, process_count=1)
  for k in range(3):
    batch = next(it)
    np.testing.assert_array_equal(batch["inputs"], _records(range(4 * k, 4 * k + 4)))
    assert batch["mask"].shape == (4, 16)


def test_processes_split_the_same_global_batches():
  got = []
  for p in range(2):
    it = pipeline.train_iterator(TASK, 6, num_threads=0, process_index=p, process_count=2)
    got.append([next(it)["inputs"] for _ in range(2)])
  for k in range(2):
    union = np.concatenate([got[0][k], got[1][k]])
    expected = _records(range(6 * k, 6 * k + 6))
    # Same set of records: process p holds records p, p+2, p+4 of the global batch.
    assert sorted(map(bytes, union)) == sorted(map(bytes, expected))
    np.testing.assert_array_equal(got[1][k], _records([6 * k + 1, 6 * k + 3, 6 * k + 5]))


@pytest.mark.parametrize("threads", [0, 2])
def test_restored_iterator_yields_the_same_next_batches(threads):
  it = pipeline.train_iterator(TASK, 3, num_threads=threads, process_index=0, process_count=1)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(pipeline.iterator_state(it)))  # as stored in a checkpoint
  expected = [next(it)["inputs"] for _ in range(4)]
  fresh = pipeline.train_iterator(TASK, 3, num_threads=threads, process_index=0,
                                  process_count=1)
  fresh.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(fresh)["inputs"], e)


def test_eval_batches_repeat_and_validate():
  a = [b["inputs"] for b in pipeline.eval_batches(TASK, 2, 3, process_index=0,
                                                   process_count=1)]
  b = [b["inputs"] for b in pipeline.eval_batches(TASK, 2, 3, process_index=0,
                                                   process_count=1)]
  assert len(a) == 3 and all(np.array_equal(x, y) for x, y in zip(a, b))
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.local_batch_size(5, 2)
