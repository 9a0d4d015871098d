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


@pytest.mark.parametrize("version,model,refused", [
    # Layout 1 (no marker): Mamba-2 in mamba_ssm's order, differing only with ngroups > 1.
    (1, {"ssm_cfg": {"layer": "Mamba2", "ngroups": 1}}, None),
    (1, {"ssm_cfg": {"layer": "Mamba2", "ngroups": 2}}, "ngroups > 1"),
    # Layouts 1 and 2: a gated Mamba-1 in_proj in mamba_ssm's [x | z] order.
    (2, {"ssm_cfg": {"layer": "Mamba2", "ngroups": 2}}, None),
    (2, {"ssm_cfg": {"layer": "Mamba1"}, "n_layer": 2}, "gated Mamba-1"),
    (1, {"n_layer": 2}, "gated Mamba-1"),  # "Mamba1" is the default layer
    (2, {"ssm_cfg": {"layer": "SSMNoGate"}, "n_layer": 2}, None),  # no z: unchanged
    (2, {"n_layer": 2, "attn_layer_idx": [0, 1]}, None),  # attention only
    (4, {"ssm_cfg": {"layer": "Mamba2"}}, "newer mamba_jax"),
])
def test_checkpoint_from_before_a_layout_change_is_refused(tmp_path, monkeypatch, version,
                                                           model, refused):
  """A state saved with an older layout marker restores unless it holds parameters whose
  column order changed since (Mamba-2 ngroups > 1: layout 2; gated Mamba-1 in_proj: layout
  3); those, and a newer layout, raise."""
  from mamba_jax.training import checkpointing
  current = checkpointing.PARAM_LAYOUT_VERSION
  assert current == 3
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0.0))
  config = ml_collections.ConfigDict({"model": model})
  monkeypatch.setattr(checkpointing, "PARAM_LAYOUT_VERSION", version)  # as that code wrote it
  old = Checkpointer(tmp_path)
  old.save(1, _state(1.0), {"next_index": 1}, config, force=True)
  old.close()
  monkeypatch.setattr(checkpointing, "PARAM_LAYOUT_VERSION", current)
  new = Checkpointer(tmp_path)
  if refused:
    with pytest.raises(ValueError, match=f"layout version {version}, .*{refused}"):
      new.restore(1, abstract)
  else:
    new.restore(1, abstract)
  new.close()
