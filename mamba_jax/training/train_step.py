"""The jitted train and eval steps: masked next-token loss, AdamW update, non-finite guard.

The model is an NNX module split once into (graphdef, params, rest); the steps are pure
functions of the train state

  state = {"step": int32 (), "params": nnx.State (float32), "opt_state": optax state,
           "nonfinite_count": int32 ()}

and a batch ``{"inputs": (b, l) int32, "targets": (b, l) int32, "mask": (b, l) bool}``.
Mixed precision is the model's business: its parameters are float32, its compute dtype (e.g.
bfloat16) is set in its config, its logits come back float32, and the loss is taken in float32.

A step whose loss, gradient norm or update norm is not finite leaves params and optimizer state unchanged
and adds one to ``nonfinite_count``; the loop decides whether to stop or go on.
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]
TrainState = dict[str, Any]


def masked_loss_and_accuracy(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                             vocab_size: int) -> dict[str, jax.Array]:
  """Sums over the scored positions: cross-entropy, correct predictions and their count.

  Args:
    logits: (b, l, v_padded); only the first ``vocab_size`` entries are real tokens.
    targets: (b, l) int.
    mask: (b, l) bool, True where scored.
  Returns:
    {"loss_sum", "correct", "count"}: float32 scalars.
  """
  logits = logits[..., :vocab_size].astype(jnp.float32)
  weights = mask.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {"loss_sum": jnp.sum(ce * weights), "correct": jnp.sum(correct * weights),
          "count": jnp.sum(weights)}


def init_train_state(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "nonfinite_count": jnp.zeros((), jnp.int32)}


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
                    vocab_size: int) -> Callable[[TrainState, Batch],
                                                 tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted ``(state, batch) -> (state, metrics)``; the input state's buffers are donated.

  metrics: loss (mean over scored positions), accuracy, grad_norm (before clipping), finite
  (bool: this step was applied).
  """

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params, rest)
    logits = model(batch["inputs"])
    sums = masked_loss_and_accuracy(logits, batch["targets"], batch["mask"], vocab_size)
    count = jnp.maximum(sums["count"], 1.0)
    return sums["loss_sum"] / count, sums["correct"] / count

  def step(state: TrainState, batch: Batch):
    with jax.named_scope("train_step"):
      (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state["params"], batch)
      grad_norm = optax.global_norm(grads)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                & jnp.isfinite(optax.global_norm(updates)))
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      new_state = {
          "step": state["step"] + 1,
          "params": keep(params, state["params"]),
          "opt_state": keep(opt_state, state["opt_state"]),
          "nonfinite_count": state["nonfinite_count"] + (~finite).astype(jnp.int32),
      }
    return new_state, {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm,
                       "finite": finite}

  return jax.jit(step, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State,
                   vocab_size: int) -> Callable[[nnx.State, Batch], dict[str, jax.Array]]:
  """A jitted ``(params, batch) -> {"loss_sum", "correct", "count"}`` (sums, for exact means)."""

  def step(params: nnx.State, batch: Batch):
    with jax.named_scope("eval_step"):
      model = nnx.merge(graphdef, params, rest)
      logits = model(batch["inputs"])
      return masked_loss_and_accuracy(logits, batch["targets"], batch["mask"], vocab_size)

  return jax.jit(step)
