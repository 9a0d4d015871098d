"""Train/eval steps: masked loss against numpy, bf16 compute, the non-finite guard."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.config import MambaConfig
from mamba_jax.training import models, optimizer
from mamba_jax.training.train_step import (init_train_state, make_eval_step, make_train_step,
                                           masked_loss_and_accuracy)
from tests.numerics import assert_close


def test_masked_loss_and_accuracy_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 8)).astype(np.float32)
  targets = rng.integers(0, 6, size=(2, 5)).astype(np.int32)
  mask = rng.random((2, 5)) < 0.6
  got = masked_loss_and_accuracy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask),
                                 vocab_size=6)
  # Only the first 6 logits are real tokens; padded ones are dropped before the softmax.
  z = logits[..., :6].astype(np.float64)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  assert_close(got["loss_sum"], (ce * mask).sum(), 1e-6, "loss_sum")
  assert float(got["correct"]) == float(((z.argmax(-1) == targets) & mask).sum())
  assert float(got["count"]) == float(mask.sum())


def _setup(dtype_name="float32"):
  config = MambaConfig.tiny("Mamba1")
  model = models.build_model(config, dtype_name=dtype_name, seed=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optimizer.default_optimizer_config()
  tx = optimizer.make_optimizer(opt, 100, models.weight_decay_mask(model))
  rng = np.random.default_rng(1)
  batch = {"inputs": jnp.asarray(rng.integers(0, 61, (2, 9)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, 61, (2, 9)), jnp.int32),
           "mask": jnp.asarray(rng.random((2, 9)) < 0.5)}
  return graphdef, rest, tx, init_train_state(params, tx), batch


def test_bf16_compute_keeps_float32_params_and_close_loss():
  losses = {}
  for name in ("float32", "bfloat16"):
    graphdef, rest, tx, state, batch = _setup(name)
    step = make_train_step(graphdef, rest, tx, 61)
    state, metrics = step(state, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
    assert bool(metrics["finite"])
    losses[name] = float(metrics["loss"])
  assert_close(losses["bfloat16"], losses["float32"], 2e-2, "bf16 loss")


def test_nan_parameter_is_refused_and_counted():
  graphdef, rest, tx, state, batch = _setup()
  params = jax.tree.map(lambda x: x, state["params"])
  leaf = params["backbone"]["embedding"]["embedding"]
  leaf.value = leaf.value.at[0, 0].set(jnp.nan)  # token 0's embedding → NaN loss if used
  batch["inputs"] = batch["inputs"].at[0, 0].set(0)
  batch["mask"] = jnp.ones_like(batch["mask"])
  state = {**state, "params": params}
  before = jax.tree.map(np.asarray, state)
  step = make_train_step(graphdef, rest, tx, 61)
  state, metrics = step(state, batch)
  assert not bool(metrics["finite"]) and int(state["nonfinite_count"]) == 1
  assert int(state["step"]) == 1
  for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(a, np.asarray(b))
  eval_step = make_eval_step(graphdef, rest, 61)
  assert not np.isfinite(float(eval_step(state["params"], batch)["loss_sum"]))
