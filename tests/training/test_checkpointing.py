"""Checkpointer: save/restore round trip of state + iterator state + config, retention, resume."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mamba_jax.training import optimizer
from mamba_jax.training.checkpointing import Checkpointer


def _state(scale):
  params = {"kernel": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) * scale,
            "A_log": jnp.full((3,), scale, jnp.float32)}
  tx = optimizer.make_optimizer(optimizer.default_optimizer_config(), 10,
                                {"kernel": True, "A_log": False})
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return {"step": jnp.array(int(scale), jnp.int32), "params": params, "opt_state": opt_state}


def test_round_trip_and_retention(tmp_path):
  config = ml_collections.ConfigDict({"name": "row", "lr": 1e-3, "sizes": (1, 2)})
  ckpt = Checkpointer(tmp_path, max_to_keep=2)
  assert ckpt.latest_step() is None
  for step in (1, 2, 3):
    ckpt.save(step, _state(float(step)), {"next_index": 10 * step}, config, force=True)
  ckpt.wait()
  assert ckpt.latest_step() == 3 and ckpt.all_steps() == [2, 3]

  fresh = Checkpointer(tmp_path, max_to_keep=2)  # as a restarted process would
  target = _state(0.0)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
  state, data_state = fresh.restore(fresh.latest_step(), abstract)
  expected = _state(3.0)
  assert jax.tree.structure(state) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert data_state == {"next_index": 30}
  assert fresh.restore_config(3) == {"name": "row", "lr": 1e-3, "sizes": [1, 2]}
  fresh.close()
  ckpt.close()


def test_relative_directory_is_resolved_against_the_working_directory(tmp_path, monkeypatch):
  """orbax refuses relative paths; `make demo` passes a relative workdir."""
  monkeypatch.chdir(tmp_path)
  config = ml_collections.ConfigDict({"name": "row"})
  ckpt = Checkpointer("runs/row/checkpoints", async_save=False)
  ckpt.save(1, _state(1.0), {"next_index": 1}, config, force=True)
  ckpt.wait()
  assert ckpt.directory == tmp_path / "runs/row/checkpoints"
  assert Checkpointer("runs/row/checkpoints").latest_step() == 1
  ckpt.close()


def test_checkpoint_from_before_the_grouped_mamba2_layout_is_refused(tmp_path, monkeypatch):
  """A state saved without the layout marker (layout 1) restores unless a Mamba-2 layer has
  ngroups > 1, whose in_proj/conv columns changed order with layout 2: that one raises."""
  from mamba_jax.training import checkpointing
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0.0))
  for groups, refused in ((1, False), (2, True)):
    config = ml_collections.ConfigDict({"model": {"ssm_cfg": {"layer": "Mamba2",
                                                              "ngroups": groups}}})
    directory = tmp_path / f"g{groups}"
    monkeypatch.setattr(checkpointing, "PARAM_LAYOUT_VERSION", 1)  # as the old code wrote it
    old = Checkpointer(directory)
    old.save(1, _state(1.0), {"next_index": 1}, config, force=True)
    old.close()
    monkeypatch.setattr(checkpointing, "PARAM_LAYOUT_VERSION", 2)
    new = Checkpointer(directory)
    if refused:
      with pytest.raises(ValueError, match="ngroups > 1"):
        new.restore(1, abstract)
    else:
      new.restore(1, abstract)
    new.close()
