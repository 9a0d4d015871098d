"""The language model: embedding, a stack of residual blocks, final norm, LM head.

``mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel`` for a :class:`MambaConfig`:

  x = embedding[input_ids]                               (b, l, d)
  hidden, residual = block_i(hidden, residual)           i = 0 .. n_layer − 1
  logits = norm_f(hidden + residual) · Wᵀ                (b, l, v_pad), float32

with W the embedding matrix (tied) or ``lm_head.kernel``ᵀ. Each layer's mixer is chosen by
``config.layer_kinds``: Mamba1 (:mod:`mamba_jax.nn.mamba1`), Mamba2 (:mod:`.mamba2`), H3 or
SSMNoGate (:mod:`.h3`), attention (:mod:`.attention`); a GatedMLP (:mod:`.mlp`) follows each
mixer when ``d_intermediate > 0``.

Parameters (paths of ``nnx.state(model)``, mirroring mamba_ssm's names):
  backbone.embedding.embedding (v_pad, d)       N(0, initializer_range²), not weight-decayed
  backbone.layers[i].{norm, mixer, norm2, mlp}  see :mod:`mamba_jax.nn.block`
  backbone.norm_f.weight (d,) [.bias]
  lm_head.kernel (d, v_pad)                     only without tie_embeddings; U(±1/√d)

Initialisation: each module's own (mamba_ssm's), then the GPT-2 residual rescaling of
``_init_weights``: every ``out_proj`` and ``fc2`` kernel is redrawn U(±1/√fan_in) divided by
√(n_residuals_per_layer · n_layer), n_residuals_per_layer = 1, or 2 with an MLP. (mamba_ssm's
``MixerModel`` applies exactly this; its ``MambaLMHeadModel`` then applies ``_init_weights``
a second time with the default n_residuals_per_layer = 1, so its released MLP models end with
1/√n_layer: pass ``n_residuals_per_layer=1`` to reproduce that.)

Decoding: :meth:`MambaLM.init_state` gives one state per layer (Mamba1State, Mamba2State or
a KVCache); :meth:`MambaLM.step` advances every layer by one token; ``__call__(...,
return_state=True)`` is the prefill. Prefill + steps equals the full forward.

:func:`weight_decay_mask` gives the optimizer's weight-decay mask.

Letter legend: b batch, l length, d d_model, v_pad padded vocabulary.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.config import ATTENTION, MambaConfig
from mamba_jax.nn.attention import Attention
from mamba_jax.nn.block import Block, Norm
from mamba_jax.nn.h3 import H3Mixer, SSMNoGate
from mamba_jax.nn.init import (NO_WEIGHT_DECAY, embedding_init, residual_scale,
                               torch_default_init)
from mamba_jax.nn.linear import Linear
from mamba_jax.nn.logits import logits_product
from mamba_jax.nn.mamba1 import Mamba1Mixer
from mamba_jax.nn.mamba2 import Mamba2Mixer
from mamba_jax.nn.mlp import GatedMLP
from mamba_jax.ops.checks import check_float_dtype, check_integer, check_rank
from mamba_jax.ops.padding import check_token_mask

MIXERS = {"Mamba1": Mamba1Mixer, "Mamba2": Mamba2Mixer, "H3": H3Mixer,
          "SSMNoGate": SSMNoGate, ATTENTION: Attention}

# Residual-branch output projections redrawn with the 1/√(n_residuals · n_layer) scale.
RESCALED = ("out_proj", "fc2")


def _mixer(config: MambaConfig, layer_idx: int, dtype: Any, param_dtype: Any,
           rngs: nnx.Rngs) -> nnx.Module:
  kind = config.layer_kinds[layer_idx]
  kwargs = config.attn_kwargs if kind == ATTENTION else config.ssm_kwargs
  return MIXERS[kind](config.d_model, layer_idx=layer_idx, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs, **kwargs)


def run_block(layer: nnx.Module, hidden: jax.Array, residual: Optional[jax.Array], *,
              remat: bool, **kwargs) -> tuple[jax.Array, jax.Array]:
  """One residual block: (hidden, residual) -> (hidden, residual), ``kwargs`` passed on.

  With ``remat`` the block is rematerialized (``nnx.remat``, i.e. ``jax.checkpoint``): its
  backward keeps only the block's inputs and recomputes the rest, so training memory holds
  two (b, l, d) arrays per layer instead of every intermediate of the mixer (for a Mamba-2
  block about ten arrays of up to (b, l, 2·d_inner), several in float32), at the cost of
  one more forward of the block in the backward. Values and gradients are unchanged.
  """
  if not remat:
    return layer(hidden, residual, **kwargs)[:2]
  return nnx.remat(lambda block, h, r: block(h, r, **kwargs)[:2])(layer, hidden, residual)


def remat_blocks(n_layer: int, fraction: float) -> frozenset[int]:
  """The blocks a ``remat`` fraction rematerializes: round(fraction · n_layer) of the n_layer,
  spread evenly (block ⌊i · n_layer / k⌋ for i < k)."""
  k = round(fraction * n_layer)
  return frozenset(i * n_layer // k for i in range(k)) if k else frozenset()


def run_blocks(layers, hidden: jax.Array, residual: Optional[jax.Array], *,
               remat: bool | int | float, **kwargs) -> tuple[jax.Array, jax.Array]:
  """The residual blocks ``layers`` in order: (hidden, residual) -> (hidden, residual).

  ``remat``: False (or 0) keeps every intermediate for the backward; True (or 1)
  rematerializes each block (:func:`run_block`): the backward keeps two (b, l, d) arrays per
  block. A float in (0, 1) rematerializes that fraction of the blocks, spread evenly
  (:func:`remat_blocks`), and keeps every intermediate of the others: memory and the extra
  forward both scale with the fraction (for a model that does not quite fit without
  rematerialization). An int k >= 2 checkpoints groups of k blocks, each block rematerialized
  inside its group: the backward keeps the two arrays at every group's entry, and while it
  recomputes one group, at its k blocks' entries (n_layer / k + k pairs instead of n_layer; k
  near sqrt(n_layer) keeps fewest), at the cost of a second recomputation of every block's
  forward. Values and gradients are unchanged in every mode.
  """
  if isinstance(remat, float):
    layers = list(layers)
    chosen = remat_blocks(len(layers), remat)
    for i, layer in enumerate(layers):
      hidden, residual = run_block(layer, hidden, residual, remat=i in chosen, **kwargs)
    return hidden, residual
  if isinstance(remat, bool) or remat <= 1:
    for layer in layers:
      hidden, residual = run_block(layer, hidden, residual, remat=bool(remat), **kwargs)
    return hidden, residual

  def run_group(group, h, r):
    for layer in group:
      h, r = run_block(layer, h, r, remat=True, **kwargs)
    return h, r

  layers = list(layers)
  for start in range(0, len(layers), remat):
    hidden, residual = nnx.remat(run_group)(tuple(layers[start:start + remat]), hidden,
                                            residual)
  return hidden, residual


def check_remat(remat) -> None:
  """Raises ValueError unless ``remat`` is a bool, an int >= 0 or a float in (0, 1) (see
  :func:`run_blocks`)."""
  if isinstance(remat, float):
    if not 0.0 < remat < 1.0:
      raise ValueError(f"a float remat is the fraction of blocks rematerialized, in (0, 1), "
                       f"got {remat!r}")
    return
  if not isinstance(remat, (bool, int)) or remat < 0:
    raise ValueError(f"remat must be a bool, a block-group size int >= 0 (1 = every block, "
                     f"k >= 2 = groups of k blocks) or a fraction of blocks in (0, 1), got "
                     f"{remat!r}")


class MixerModel(nnx.Module):
  """The backbone (mamba_ssm ``MixerModel``): embedding, blocks, final norm -> (b, l, d)."""

  def __init__(self, config: MambaConfig, *, initializer_range: float = 0.02,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config, self.dtype = config, dtype
    d = config.d_model
    self.embedding = nnx.Embed(config.vocab_size_padded, d, dtype=dtype,
                               param_dtype=param_dtype,
                               embedding_init=embedding_init(initializer_range),
                               embedding_metadata={NO_WEIGHT_DECAY: True}, rngs=rngs)
    norm = dict(rms_norm=config.rms_norm, norm_epsilon=config.norm_epsilon,
                residual_in_fp32=config.residual_in_fp32, dtype=dtype,
                param_dtype=param_dtype)
    layers = []
    for i in range(config.n_layer):
      mixer = _mixer(config, i, dtype, param_dtype, rngs)
      mlp = (GatedMLP(d, hidden_features=config.d_intermediate, out_features=d, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
             if config.d_intermediate > 0 else None)
      layers.append(Block(d, mixer, mlp, **norm))
    self.layers = nnx.List(layers)
    self.norm_f = Norm(d, rms=config.rms_norm, eps=config.norm_epsilon,
                       param_dtype=param_dtype)

  def __call__(self, input_ids: jax.Array, *, seq_idx: Optional[jax.Array] = None,
               remat: bool | int | float = False) -> jax.Array:
    """Final hidden states: input_ids (b, l) int -> norm_f(hidden + residual) (b, l, d).

    What :class:`MambaLM` feeds its LM head (float32, or wider); for heads of other tasks
    (``mamba_jax.nn.classifier``). ``remat``: see :func:`run_blocks`.
    """
    check_remat(remat)
    with jax.named_scope("mixer_model"):
      hidden, residual = self.embedding(input_ids), None
      hidden, residual = run_blocks(self.layers, hidden, residual, remat=remat,
                                    seq_idx=seq_idx)
      return self._final(hidden, residual)

  def _final(self, hidden: jax.Array, residual: Optional[jax.Array]) -> jax.Array:
    """norm_f(hidden + residual) in float32 (or wider)."""
    acc = jnp.promote_types(hidden.dtype, jnp.float32)
    total = hidden.astype(acc) if residual is None else hidden.astype(acc) + residual.astype(acc)
    return self.norm_f(total)


class MambaLM(nnx.Module):
  """Language model over a :class:`MambaConfig` (mamba_ssm ``MambaLMHeadModel``).

  Args:
    config: the architecture.
    initializer_range: standard deviation of the embedding init (mamba_ssm's 0.02).
    rescale_prenorm_residual: redraw out_proj / fc2 kernels with the 1/√(n_res·n_layer)
      scale (GPT-2 scheme).
    n_residuals_per_layer: override of config.n_residuals_per_layer for that scale.
    dtype: compute dtype (activations, matmul inputs); logits are float32 (float64 when
      dtype is float64).
    param_dtype: parameter dtype (A_log and D stay float32 as in mamba_ssm).
    rngs: parameter randomness (``rngs.params``).
  """

  def __init__(self, config: MambaConfig, *, initializer_range: float = 0.02,
               rescale_prenorm_residual: bool = True,
               n_residuals_per_layer: Optional[int] = None, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(config, MambaConfig):
      raise ValueError(f"config must be a MambaConfig, got {type(config).__name__}")
    self.config, self.dtype = config, dtype
    self.backbone = MixerModel(config, initializer_range=initializer_range, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
    self.lm_head = (None if config.tie_embeddings else
                    Linear(config.d_model, config.vocab_size_padded, use_bias=False,
                           dtype=dtype, param_dtype=param_dtype,
                           kernel_init=torch_default_init(config.d_model), rngs=rngs))
    if rescale_prenorm_residual:
      n_res = (config.n_residuals_per_layer if n_residuals_per_layer is None
               else n_residuals_per_layer)
      self._rescale_residual_projections(residual_scale(config.n_layer, n_res), rngs)

  def _rescale_residual_projections(self, scale: float, rngs: nnx.Rngs) -> None:
    """Redraws every out_proj / fc2 kernel (fan_in, fan_out) from U(±scale/√fan_in)."""
    for layer in self.backbone.layers:
      for module in (layer.mixer, layer.mlp):
        for name in RESCALED:
          linear = getattr(module, name, None) if module is not None else None
          if linear is None:
            continue
          kernel = linear.kernel
          fan_in = kernel.shape[0]
          kernel[...] = torch_default_init(fan_in, scale)(rngs.params(), kernel.shape,
                                                          kernel.dtype)

  def hidden_states(self, input_ids: jax.Array, *, seq_idx: Optional[jax.Array] = None,
                    remat: bool | int | float = False) -> jax.Array:
    """The final normed hidden states (b, l, d) float32 that the LM head reads: ``self(ids)``
    is ``self.logits_from_hidden(self.hidden_states(ids))``. For losses that take the head
    a piece at a time (``train_step.chunked_masked_loss_and_accuracy``); ``remat``: see
    :func:`run_blocks`."""
    self._check_ids("input_ids", input_ids, 2, "(batch, length)")
    return self.backbone(input_ids, seq_idx=seq_idx, remat=remat)

  def logits_from_hidden(self, x: jax.Array) -> jax.Array:
    """LM head: x (..., d) -> logits (..., v_pad) in float32 (wider for float64), the
    matmul in the compute dtype, its backward too (``mamba_jax.nn.logits``)."""
    x = x.astype(self.dtype)
    if self.lm_head is None:
      w = self.backbone.embedding.embedding[...].astype(self.dtype)
      return logits_product(x, w, "vd")
    return logits_product(x, self.lm_head.kernel[...].astype(self.dtype), "dv")

  def _check_ids(self, name: str, ids: jax.Array, rank: int, layout: str) -> None:
    check_rank(name, ids, rank, layout)
    check_integer(name, ids)

  def init_state(self, batch: int, max_length: int, dtype: Any = None,
                 state_dtype: Any = None) -> tuple[Any, ...]:
    """Empty decoding state: one per layer (SSM states; KV caches of max_length slots).

    dtype: conv states and KV caches (the compute dtype when None). state_dtype: the SSM
    states' storage dtype (None: float32, or wider; e.g. bfloat16 as mamba_ssm stores them
    for a bf16 model; the steps still compute in float32).
    """
    if state_dtype is not None:
      check_float_dtype("state_dtype", state_dtype)
    return tuple(layer.init_state(batch, max_length, dtype, state_dtype)
                 for layer in self.backbone.layers)

  def __call__(self, input_ids: jax.Array, *, attention_mask: Optional[jax.Array] = None,
               seq_idx: Optional[jax.Array] = None, return_state: bool = False,
               max_length: Optional[int] = None, remat: bool | int | float = False):
    """Logits of every position: input_ids (b, l) int -> (b, l, v_pad) float32.

    Args:
      input_ids: token ids (b, l).
      attention_mask: optional (b, l) token mask, 1 token, 0 pad, in any layout (left or
        right padding, pads anywhere). Pads never touch a layer's state: at a row's tokens
        the logits are those of its tokens alone, and the state returned with
        ``return_state`` is the one after its last token (attention caches hold each row's
        tokens at the end of its slots, pads before; ``mamba_jax.ops.padding``). Logits at
        pads are meaningless. Every mixer kind takes it except attention with d_conv > 0;
        not combined with seq_idx.
      seq_idx: optional (b, l) ids of packed sequences (Mamba-2 and attention layers;
        Mamba-1 / H3 layers raise).
      return_state: also return the per-layer state after the last token (prefill).
      max_length: KV-cache length for the prefill of a model with attention layers
        (≥ l; the prompt plus the tokens to generate).
      remat: rematerialize every block in the backward (training memory; see
        :func:`run_block`); not with ``return_state``.

    Returns:
      logits, or (logits, state) with ``return_state``.
    """
    self._check_ids("input_ids", input_ids, 2, "(batch, length)")
    if attention_mask is not None:
      check_token_mask("attention_mask", attention_mask, *input_ids.shape)
    if remat and return_state:
      raise ValueError("remat=True is for training (a backward to rematerialize); a prefill "
                       "with return_state=True takes remat=False")
    check_remat(remat)
    with jax.named_scope("mamba_lm"):
      hidden, residual = self.backbone.embedding(input_ids), None
      states = []
      if remat:
        hidden, residual = run_blocks(self.backbone.layers, hidden, residual, remat=remat,
                                      seq_idx=seq_idx, mask=attention_mask)
      for layer in () if remat else self.backbone.layers:
        out = layer(hidden, residual, seq_idx=seq_idx, mask=attention_mask,
                    return_state=return_state, max_length=max_length)
        hidden, residual = out[:2]
        if return_state:
          states.append(out[2])
      logits = self.logits_from_hidden(self.backbone._final(hidden, residual))
    return (logits, tuple(states)) if return_state else logits

  def step(self, token_ids: jax.Array, state: tuple[Any, ...]
           ) -> tuple[jax.Array, tuple[Any, ...]]:
    """One decoding step: token_ids (b,) int and the state -> (logits (b, v_pad), new state)."""
    self._check_ids("token_ids", token_ids, 1, "(batch,)")
    layers = self.backbone.layers
    if not isinstance(state, (tuple, list)) or len(state) != len(layers):
      raise ValueError(f"state must be a tuple of {len(layers)} per-layer states "
                       f"(init_state or a prefill's), got {type(state).__name__}"
                       f"{'' if not isinstance(state, (tuple, list)) else f' of {len(state)}'}")
    with jax.named_scope("mamba_lm_step"):
      hidden, residual = self.backbone.embedding(token_ids), None
      new_states = []
      for layer, layer_state in zip(layers, state):
        hidden, residual, layer_state = layer.step(hidden, residual, layer_state)
        new_states.append(layer_state)
      logits = self.logits_from_hidden(self.backbone._final(hidden, residual))
    return logits, tuple(new_states)


def weight_decay_mask(model: nnx.Module) -> nnx.State:
  """True for the parameters to weight-decay, False for the others, as an nnx.State.

  A parameter is excluded when its ``nnx.Param`` metadata has ``no_weight_decay=True``
  (A_log, A_imag, D, dt biases, norm weights, biases, non-selective B, and embeddings —
  mamba_ssm's ``_no_weight_decay`` plus the flash-attention training recipe's exclusion of
  biases, norms and ``nn.Embedding``) or when it is an embedding table (a Param named
  ``embedding``, e.g. an attention layer's ``pos_emb``). The result has the structure of
  ``nnx.state(model, nnx.Param)`` with a bool per parameter, usable as
  ``optax.adamw(..., mask=weight_decay_mask(model))`` under ``nnx.Optimizer``.
  """
  decay = []
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    excluded = (bool(variable.get_metadata().get(NO_WEIGHT_DECAY, False))
                or path[-1] == "embedding")
    decay.append((path, not excluded))
  return nnx.from_flat_state(decay)
