"""Synthetic task generators: hand-checked layouts, answers recomputed independently, determinism."""

import numpy as np
import pytest

from mamba_jax.data import synthetic


def test_selective_copying_target_is_the_data_tokens_in_order():
  task = synthetic.SelectiveCopying(length=20, num_tokens=4, vocab_size=8, seed=3)
  assert task.seq_len == 28  # 20 + 2·4
  for i in range(20):
    r = task[i]
    x, y, m = r["inputs"], r["targets"], r["mask"]
    # Noise 0, data 1..6, marker 7: the data tokens of the first 24 positions, read left to
    # right, are what the last 4 positions must produce.
    data = [t for t in x[:24] if t != 0]
    assert len(data) == 4 and all(1 <= t <= 6 for t in data)
    assert list(x[24:]) == [7, 7, 7, 7]
    assert list(y[24:]) == data and not y[:24].any()
    assert list(np.flatnonzero(m)) == [24, 25, 26, 27]


def test_selective_copying_hand_case():
  task = synthetic.SelectiveCopying(length=2, num_tokens=1, vocab_size=3, seed=0)
  # vocabulary 3: noise 0, the only data token 1, marker 2; one data token among 3 slots.
  r = task[5]
  assert sorted(r["inputs"][:3].tolist()) == [0, 0, 1]
  assert r["inputs"][3] == 2 and r["targets"].tolist() == [0, 0, 0, 1]


def test_induction_heads_answer_follows_first_special_token():
  task = synthetic.InductionHeads(length=32, vocab_size=6, seed=1)
  for i in range(50):
    r = task[i]
    x = r["inputs"]
    special = np.flatnonzero(x == 5)
    # s appears exactly twice: somewhere in [0, 29], and last.
    assert len(special) == 2 and special[1] == 31 and special[0] <= 29
    assert r["targets"][31] == x[special[0] + 1]
    assert x[special[0] + 1] != 5
    assert np.flatnonzero(r["mask"]).tolist() == [31]


def test_mqar_queries_answer_their_key_value():
  task = synthetic.MultiQueryAssociativeRecall(length=64, num_kv_pairs=8, vocab_size=40, seed=2)
  for i in range(20):
    r = task[i]
    x, y, m = r["inputs"], r["targets"], r["mask"]
    table = dict(zip(x[0:16:2].tolist(), x[1:16:2].tolist()))
    assert len(table) == 8 and all(1 <= k < 20 for k in table)
    assert all(20 <= v < 40 for v in table.values())
    queries = np.flatnonzero(m)
    assert len(queries) == 8 and queries.min() >= 16 and np.all((queries - 16) % 2 == 0)
    assert sorted(x[queries].tolist()) == sorted(table)
    assert [table[k] for k in x[queries].tolist()] == y[queries].tolist()
    rest = np.ones(64, bool)
    rest[:16] = False
    rest[queries] = False
    assert not x[rest].any()


@pytest.mark.parametrize("name,fields", [
    ("selective_copying", dict(length=30, num_tokens=5, vocab_size=10)),
    ("induction_heads", dict(length=30, vocab_size=10)),
    ("mqar", dict(length=40, num_kv_pairs=4, vocab_size=20)),
])
def test_records_are_pure_functions_of_seed_and_index(name, fields):
  a = synthetic.make_task(name, seed=7, **fields)
  b = synthetic.make_task(name, seed=7, **fields)
  c = synthetic.make_task(name, seed=8, **fields)
  for i in (0, 1, 12345, 2**33):
    assert all(np.array_equal(a[i][k], b[i][k]) for k in a[i])
    assert a[i]["inputs"].dtype == np.int32 and a[i]["mask"].dtype == bool
  assert not np.array_equal(a[3]["inputs"], a[4]["inputs"])
  assert not np.array_equal(a[3]["inputs"], c[3]["inputs"])


def test_bad_fields_raise():
  with pytest.raises(ValueError, match="num_kv_pairs"):
    synthetic.MultiQueryAssociativeRecall(length=10, num_kv_pairs=4, vocab_size=64)
  with pytest.raises(ValueError, match="vocab_size"):
    synthetic.InductionHeads(length=10, vocab_size=2)
  with pytest.raises(ValueError, match="task must be one of"):
    synthetic.make_task("copying", length=3)
