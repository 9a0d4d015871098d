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

On a device mesh (``mamba_jax.sharding``) the steps take ``state_shardings`` (a tree of
NamedShardings like the state: parameters and optimizer moments by the logical rules) and
``batch_shardings`` (per batch key) as jit in/out shardings, and with ``parallel=True`` the
SSM mixers run their tensor / sequence-parallel forwards (``parallel_mixers.parallelize``,
inside the traced function, so gradients are those of the plain parameter state).
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import optax

from mamba_jax.nn.lm import check_remat
from mamba_jax.ops.cross_entropy import softmax_cross_entropy_with_accuracy
from mamba_jax.sharding.parallel_mixers import parallelize

Batch = dict[str, jax.Array]
TrainState = dict[str, Any]


def masked_loss_and_accuracy(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                             vocab_size: int) -> dict[str, jax.Array]:
  """Sums over the scored positions: cross-entropy, correct predictions and their count.

  Args:
    logits: (b, l, v_padded) floating; only the first ``vocab_size`` entries are real tokens.
      Read in their own dtype: the cross-entropy is taken in float32 by
      ``ops.cross_entropy.softmax_cross_entropy_with_accuracy`` (on a GPU its fused kernels,
      whose gradient comes back in the logits' dtype).
    targets: (b, l) int.
    mask: (b, l) bool, True where scored.
  Returns:
    {"loss_sum", "correct", "count"}: float32 scalars.
  """
  loss, correct = softmax_cross_entropy_with_accuracy(logits, targets, vocab_size)
  weights = mask.astype(jnp.float32)
  return {"loss_sum": jnp.sum(loss.astype(jnp.float32) * weights),
          "correct": jnp.sum(correct.astype(jnp.float32) * weights),
          "count": jnp.sum(weights)}


def chunked_masked_loss_and_accuracy(head: Callable[[jax.Array], jax.Array],
                                     hidden: jax.Array, targets: jax.Array, mask: jax.Array,
                                     vocab_size: int, chunk: int) -> dict[str, jax.Array]:
  """:func:`masked_loss_and_accuracy` of ``head(hidden)``, ``chunk`` positions at a time.

  The logits of a chunk are made, scored and dropped inside ``jax.checkpoint`` under a
  ``lax.scan``, so neither the forward nor the backward holds more than (b, chunk, v) of them
  (against (b, l, v) float32 plus its gradient for the whole sequence: 13 GB at 32K tokens
  and a 50K vocabulary); the backward recomputes each chunk's logits. The sums are the same
  as the unchunked ones up to float32 summation order.

  Args:
    head: hidden (b, chunk, d) -> logits (b, chunk, v_padded) float32 (the LM head).
    hidden: (b, l, d) final hidden states; targets (b, l) int; mask (b, l) bool.
    vocab_size: real vocabulary entries of the logits.
    chunk: positions per piece, >= 1; a length not a multiple of it is padded (unscored).

  Returns:
    {"loss_sum", "correct", "count"}: float32 scalars.
  """
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"chunk must be a positive int (positions of logits at a time), "
                     f"got {chunk!r}")
  batch, length, d = hidden.shape
  if targets.shape != (batch, length) or mask.shape != (batch, length):
    raise ValueError(f"targets {targets.shape} and mask {mask.shape} must have hidden's "
                     f"(batch, length) = {(batch, length)}")
  chunk = min(chunk, length)
  pad = -length % chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))   # padding is not scored
  pieces = (length + pad) // chunk
  by_piece = lambda v: jnp.swapaxes(v.reshape(batch, pieces, chunk, *v.shape[2:]), 0, 1)

  @jax.checkpoint
  def piece(h, t, m):
    return masked_loss_and_accuracy(head(h), t, m, vocab_size)

  def body(total, xs):
    return jax.tree.map(jnp.add, total, piece(*xs)), None

  zero = jnp.zeros((), jnp.float32)
  total, _ = jax.lax.scan(body, {"loss_sum": zero, "correct": zero, "count": zero},
                          (by_piece(hidden), by_piece(targets), by_piece(mask)))
  return total


def _loss_sums(model: nnx.Module, batch: Batch, vocab_size: int, remat: bool | int | float,
               loss_chunk: int) -> dict[str, jax.Array]:
  """The masked sums of ``model`` on ``batch``: whole logits, or the LM head ``loss_chunk``
  positions at a time (language models only); blocks rematerialized with ``remat``."""
  if loss_chunk:
    if not hasattr(model, "hidden_states"):
      raise ValueError(f"loss_chunk={loss_chunk} needs a language model (MambaLM) whose "
                       f"logits cover every position; {type(model).__name__} has none: use "
                       "loss_chunk=0")
    hidden = model.hidden_states(batch["inputs"], remat=remat)
    return chunked_masked_loss_and_accuracy(model.logits_from_hidden, hidden,
                                            batch["targets"], batch["mask"], vocab_size,
                                            loss_chunk)
  logits = model(batch["inputs"], remat=remat) if remat else model(batch["inputs"])
  return masked_loss_and_accuracy(logits, batch["targets"], batch["mask"], vocab_size)


def _check_memory_options(remat: bool | int | float, loss_chunk: int) -> None:
  check_remat(remat)
  if not isinstance(loss_chunk, int) or loss_chunk < 0:
    raise ValueError(f"loss_chunk must be an int >= 0 (0: whole logits), got {loss_chunk!r}")


def init_train_state(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "nonfinite_count": jnp.zeros((), jnp.int32)}


def _merge(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, mesh: Mesh | None,
           parallel: bool) -> nnx.Module:
  """The model of ``params`` (inside a traced function); with ``parallel`` its SSM mixers
  replaced by their tensor / sequence-parallel forwards over ``mesh``."""
  model = nnx.merge(graphdef, params, rest)
  if parallel:
    if mesh is None:
      raise ValueError("parallel=True needs the mesh: pass mesh=")
    # A SequenceClassifier holds its MambaLM as .lm; parallelize walks a MambaLM's layers.
    parallelize(model.lm if hasattr(model, "lm") else model, mesh)
  return model


def _jit(fn: Callable, donate: bool, mesh: Mesh | None, in_shardings: Any,
         out_shardings: Any) -> Callable:
  """``jax.jit`` with in/out shardings when given a mesh (scalar outputs replicated)."""
  donate_argnums = (0,) if donate else ()
  if mesh is None:
    if in_shardings[0] is not None:
      raise ValueError("state_shardings were given without mesh=: pass both or neither")
    return jax.jit(fn, donate_argnums=donate_argnums)
  if any(s is None for s in in_shardings):
    raise ValueError("with mesh=, pass state_shardings (or param_shardings) and "
                     "batch_shardings too")
  return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                 donate_argnums=donate_argnums)


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
                    vocab_size: int, *, mesh: Mesh | None = None,
                    state_shardings: Any = None, batch_shardings: Any = None,
                    parallel: bool = False, remat: bool | int | float = False,
                    loss_chunk: int = 0) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted ``(state, batch) -> (state, metrics)``; the input state's buffers are donated.

  metrics: loss (mean over scored positions), accuracy, grad_norm (before clipping), finite
  (bool: this step was applied).

  Args:
    mesh: None (one device, or whatever the inputs' shardings say), or the device mesh;
      then ``state_shardings`` (a tree of NamedShardings shaped like the state) and
      ``batch_shardings`` ({key: NamedSharding} of the (b, l) batch arrays) are required and
      become the jit in/out shardings (the state keeps its layout; metrics are replicated).
    parallel: run the SSM mixers' tensor / sequence-parallel forwards over ``mesh``.
    remat: rematerialize every residual block in the backward (True or 1, ``lm.run_block``):
      activation memory of two (b, l, d) arrays per layer, one more forward of compute; an
      int k >= 2 checkpoints groups of k blocks (``lm.run_blocks``): n_layer / k + k pairs,
      two more forwards; a float in (0, 1) rematerializes that fraction of the blocks.
    loss_chunk: 0 (whole logits), or the LM head and loss taken this many positions at a time
      (:func:`chunked_masked_loss_and_accuracy`; language models).
  """
  _check_memory_options(remat, loss_chunk)

  def loss_fn(params, batch):
    model = _merge(graphdef, params, rest, mesh, parallel)
    sums = _loss_sums(model, batch, vocab_size, remat, loss_chunk)
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

  replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
  return _jit(step, True, mesh, (state_shardings, batch_shardings),
              (state_shardings, replicated))


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State, vocab_size: int, *,
                   mesh: Mesh | None = None, param_shardings: Any = None,
                   batch_shardings: Any = None, parallel: bool = False, loss_chunk: int = 0
                   ) -> Callable[[nnx.State, Batch], dict[str, jax.Array]]:
  """A jitted ``(params, batch) -> {"loss_sum", "correct", "count"}`` (sums, for exact means).

  ``mesh``, ``param_shardings`` (the state shardings' "params"), ``batch_shardings``,
  ``parallel`` and ``loss_chunk`` as in :func:`make_train_step`; the sums come back
  replicated.
  """
  _check_memory_options(False, loss_chunk)

  def step(params: nnx.State, batch: Batch):
    with jax.named_scope("eval_step"):
      model = _merge(graphdef, params, rest, mesh, parallel)
      return _loss_sums(model, batch, vocab_size, False, loss_chunk)

  replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
  return _jit(step, False, mesh, (param_shardings, batch_shardings), replicated)
