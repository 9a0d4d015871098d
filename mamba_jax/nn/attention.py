"""Multi-head self-attention (MHA / GQA / MQA) with a KV cache, as in ``mamba_ssm``'s ``MHA``.

Vaswani et al. (2017, §3.2) scaled dot-product attention, with grouped key/value heads
(Ainslie et al., 2023, GQA: query head i reads key/value head ⌊i·h_kv/h⌋) and one of three
position schemes:

  "rope":     rotary embedding (RoFormer eq. 34, ``mamba_jax.nn.rotary``) of the first
              ``rotary_emb_dim`` channels of every query and key head (all of head_dim when
              rotary_emb_dim = 0);
  "xpos":     RoPE times xPos's decay (Sun et al., 2022; ``mamba_jax.nn.rotary.apply_xpos``):
              q_n·k_m gets ζ_i^((n − m)/xpos_scale_base) per rotary pair i, ζ_i =
              (2i/r + γ)/(1 + γ), γ = xpos_gamma (0.4, scale base 512 in the paper); causal
              only. The factors are taken relative to the last query position of each call
              (so a decoding step at any position has query factor 1 and key factors ≤ 1),
              and a call longer than ``xpos_span`` (where the query factor
              ζ_0^(−span/scale_base) would near float32's range, ≈ 24K tokens by default)
              attends in query blocks of that span, each with its own reference;
  "absolute": a learned table ``pos_emb`` (max_position, d), N(0, 0.02), added to this
              layer's input before ``in_proj`` (the residual stream is left untouched) —
              the "MHA-Abs" baseline of the Mamba paper's induction-heads task (Table 2);
  "none":     no position information (causality alone).

Positions count from the start of each sequence: with packed sequences (``seq_idx``) they
restart at every new sequence, and in decoding they continue from the cache.

Also ``mamba_ssm``'s optional extras: a causal depthwise conv over the fused qkv
(``d_conv`` > 0, used by the mamba2attn hybrids) and a gated-MLP side branch in the same
projections (``mlp_dim`` > 0).

Parameters (kernels in flax's (in, out) layout; mamba_ssm's PyTorch weights are (out, in)):
  pos_emb.embedding (max_position, d)       only with positions="absolute"
  in_proj.kernel (d, p·(h + 2·h_kv) + m)    columns [q heads | k heads | v heads | mlp up |
                                            mlp gate], each head p consecutive columns
  in_proj.bias   (p·(h + 2·h_kv) + m,)      only with qkv_proj_bias
  conv1d.kernel (p·(h + 2·h_kv), w), conv1d.bias    only with d_conv > 0
  out_proj.kernel (p·h + m/2, d), out_proj.bias (d,) (only with out_proj_bias); its input is
                                            [attention output | mlp output]

The attention itself is ``jax.nn.dot_product_attention``. ``implementation=None`` lets jax
choose (XLA's fused softmax today); ``implementation="cudnn"`` requests cuDNN's flash
attention on NVIDIA GPUs (it raises where cuDNN does not support the shapes/dtype). The
cached path (decoding, ``initial_state``) masks an arbitrary prefix of the cache and always
uses XLA. The XLA path takes the softmax in float32 (never wider, even for float64 inputs).

KV cache (:class:`KVCache`): k, v (b, L, h_kv, p) in the compute dtype, keys stored after
the rotation (with "xpos", before its scale, which depends on the attending query);
``index`` () int32, the number of slots written (the next write position,
shared by the batch); ``start`` (b,) int32, the slot where each row's current sequence
begins (non-zero after a packed prefill); ``conv_state`` (b, p·(h + 2·h_kv), w − 1) with
d_conv > 0. Writing beyond L cannot be detected under jit (the write is clamped by
``lax.dynamic_update_slice``): keep index + new tokens ≤ L.

Letter legend: b batch, l length, L cache length (max_length), d d_model, h heads,
h_kv kv heads, p head_dim, m mlp_dim (rounded up to a multiple of 256), w conv width.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from mamba_jax.nn.init import NO_WEIGHT_DECAY, embedding_init, torch_default_init
from mamba_jax.nn.linear import Linear
from mamba_jax.nn.mamba2 import CausalConv1d
from mamba_jax.nn.rotary import apply_rotary, apply_xpos_scale, xpos_scale, xpos_zeta
from mamba_jax.ops.checks import (check_choice, check_divisible, check_floating, check_integer,
                                  check_rank, check_shape, is_concrete)
from mamba_jax.ops.padding import check_token_mask, left_align, take_along_length

POSITIONS = ("rope", "xpos", "absolute", "none")
ROTARY_POSITIONS = ("rope", "xpos")
# xPos query factors ζ_0^(−span/scale_base) stay below e^XPOS_MAX_LOG_SCALE (float32: e^88).
XPOS_MAX_LOG_SCALE = 60.0
IMPLEMENTATIONS = (None, "xla", "cudnn")


@struct.dataclass
class KVCache:
  """Preallocated keys/values of one attention layer (see the module docstring)."""
  k: jax.Array
  v: jax.Array
  index: jax.Array
  start: jax.Array
  conv_state: Optional[jax.Array] = None


def segment_positions(seq_idx: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Positions within packed sequences: (b, l) ids -> (positions (b, l), starts (b, l)).

  starts[b, t] is the index of the first token of t's sequence (where seq_idx last changed)
  and positions[b, t] = t − starts[b, t].
  """
  t = jnp.arange(seq_idx.shape[1], dtype=jnp.int32)
  new = jnp.concatenate([jnp.ones_like(seq_idx[:, :1], dtype=bool),
                         seq_idx[:, 1:] != seq_idx[:, :-1]], axis=1)
  starts = jax.lax.cummax(jnp.where(new, t, 0), axis=1)
  return t - starts, starts


class Attention(nnx.Module):
  """Self-attention softmax(Q·Kᵀ·scale + mask)·V with fused qkv projection (Vaswani §3.2.2).

    [q, k, v] = x · in_proj                  (after adding pos_emb for "absolute")
    q, k = rope(q), rope(k)                  ("rope"; "xpos" also scales them, see above)
    o_i = softmax_j(q_i · k_j · scale + mask_ij) · v_j,  scale = softmax_scale or p^-1/2
    out = o · out_proj

  mask_ij allows j ≤ i (``causal``) within the same packed sequence (``seq_idx``).
  Initialisation as mamba_ssm: Linear kernels U(±1/√fan_in), biases 0; ``pos_emb``
  N(0, 0.02) like the token embedding. Biases and ``pos_emb`` carry ``no_weight_decay``
  (as the LM's token embedding does). The LM rescales ``out_proj`` for the residual.
  """

  def __init__(self, d_model: int, *, num_heads: int, num_heads_kv: Optional[int] = None,
               head_dim: Optional[int] = None, qkv_proj_bias: bool = True,
               out_proj_bias: bool = True, rotary_emb_dim: int = 0,
               rotary_emb_base: float = 10000.0, rotary_emb_interleaved: bool = False,
               positions: str = "rope", xpos_scale_base: float = 512.0,
               xpos_gamma: float = 0.4, max_position: int = 8192, causal: bool = True,
               softmax_scale: Optional[float] = None, d_conv: int = 0, mlp_dim: int = 0,
               implementation: Optional[str] = None, layer_idx: Optional[int] = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    check_choice("positions", positions, POSITIONS)
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    self.num_heads = num_heads
    self.num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
    check_divisible("num_heads", num_heads, "num_heads_kv", self.num_heads_kv)
    if head_dim is None:
      check_divisible("d_model", d_model, "num_heads", num_heads)
    self.d_model = d_model
    self.head_dim = d_model // num_heads if head_dim is None else head_dim
    if positions not in ROTARY_POSITIONS and rotary_emb_dim:
      raise ValueError(f"rotary_emb_dim={rotary_emb_dim} needs positions='rope' or 'xpos', "
                       f"got positions={positions!r}")
    self.rotary_dim = ((rotary_emb_dim or self.head_dim) if positions in ROTARY_POSITIONS
                       else 0)
    if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
      raise ValueError(f"rotary_emb_dim={self.rotary_dim} must be even and <= "
                       f"head_dim={self.head_dim}")
    if max_position < 1:
      raise ValueError(f"max_position must be >= 1, got {max_position}")
    if d_conv < 0 or mlp_dim < 0:
      raise ValueError(f"d_conv and mlp_dim must be >= 0, got {d_conv=}, {mlp_dim=}")
    self.rotary_base, self.rotary_interleaved = rotary_emb_base, rotary_emb_interleaved
    if positions == "xpos":
      if not causal:
        raise ValueError("positions='xpos' needs causal=True: its factor ζ^((n − m)/scale_base) "
                         "grows without bound for keys after the query")
      if not xpos_scale_base > 0 or not xpos_gamma > 0:
        raise ValueError(f"xpos_scale_base and xpos_gamma must be > 0 (the paper: 512, 0.4), "
                         f"got {xpos_scale_base=}, {xpos_gamma=}")
    self.xpos_scale_base, self.xpos_gamma = xpos_scale_base, xpos_gamma
    # Longest query span of one attention call before splitting it into query blocks.
    log_zeta0 = -float(np.log(xpos_zeta(2, xpos_gamma)[0])) if positions == "xpos" else 0.0
    self.xpos_span = (max(1, int(XPOS_MAX_LOG_SCALE * xpos_scale_base / log_zeta0))
                      if log_zeta0 > 0 else None)
    self.positions, self.max_position, self.causal = positions, max_position, causal
    self.softmax_scale = (1.0 / math.sqrt(self.head_dim) if softmax_scale is None
                          else softmax_scale)
    self.d_conv, self.implementation, self.layer_idx = d_conv, implementation, layer_idx
    self.mlp_dim = math.ceil(mlp_dim / 256) * 256
    self.dtype = dtype
    self.qkv_dim = self.head_dim * (num_heads + 2 * self.num_heads_kv)
    out_dim = self.head_dim * num_heads + self.mlp_dim // 2

    no_wd = {NO_WEIGHT_DECAY: True}
    self.pos_emb = (nnx.Embed(max_position, d_model, dtype=dtype, param_dtype=param_dtype,
                              embedding_init=embedding_init(0.02),
                              embedding_metadata=no_wd, rngs=rngs)
                    if positions == "absolute" else None)
    self.in_proj = Linear(d_model, self.qkv_dim + self.mlp_dim, use_bias=qkv_proj_bias,
                          dtype=dtype, param_dtype=param_dtype,
                          kernel_init=torch_default_init(d_model), bias_metadata=no_wd,
                          rngs=rngs)
    self.conv1d = (CausalConv1d(self.qkv_dim, d_conv, param_dtype=param_dtype, rngs=rngs)
                   if d_conv > 0 else None)
    self.out_proj = Linear(out_dim, d_model, use_bias=out_proj_bias, dtype=dtype,
                           param_dtype=param_dtype, kernel_init=torch_default_init(out_dim),
                           bias_metadata=no_wd, rngs=rngs)

  def init_state(self, batch: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty cache of ``max_length`` slots (k/v zeros, index 0, start 0)."""
    dtype = self.dtype if dtype is None else dtype
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    if self.positions == "absolute" and max_length > self.max_position:
      raise ValueError(f"max_length={max_length} exceeds max_position={self.max_position} "
                       "of the absolute position embedding")
    shape = (batch, max_length, self.num_heads_kv, self.head_dim)
    conv = (jnp.zeros((batch, self.qkv_dim, self.d_conv - 1), dtype) if self.d_conv
            else None)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   index=jnp.zeros((), jnp.int32), start=jnp.zeros((batch,), jnp.int32),
                   conv_state=conv)

  def _check_cache(self, cache: KVCache, batch: int, length: int) -> None:
    if not isinstance(cache, KVCache):
      raise ValueError(f"initial_state must be a KVCache, got {type(cache).__name__}")
    layout = "(batch, max_length, num_heads_kv, head_dim)"
    check_shape("initial_state.k", cache.k, (batch, None, self.num_heads_kv, self.head_dim),
                layout)
    check_shape("initial_state.v", cache.v, cache.k.shape, layout)
    check_shape("initial_state.start", cache.start, (batch,), "(batch,)")
    if self.d_conv:
      check_shape("initial_state.conv_state", cache.conv_state,
                  (batch, self.qkv_dim, self.d_conv - 1), "(batch, qkv_dim, d_conv - 1)")
    if not self.causal:
      raise ValueError("a KV cache (initial_state, step) needs causal=True")
    if is_concrete(cache.index) and int(cache.index) + length > cache.k.shape[1]:
      raise ValueError(f"the cache holds {int(cache.index)} of {cache.k.shape[1]} slots: no "
                       f"room for {length} more tokens")

  def _attend(self, q, k, v, mask, implementation):
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=self.softmax_scale, is_causal=self.causal,
        implementation=implementation)

  def __call__(self, x: jax.Array, *, initial_state: Optional[KVCache] = None,
               seq_idx: Optional[jax.Array] = None, mask: Optional[jax.Array] = None,
               return_state: bool = False, max_length: Optional[int] = None
               ) -> jax.Array | tuple[jax.Array, KVCache]:
    """Attention over a sequence, optionally continuing from / filling a KV cache.

    Args:
      x: (b, l, d) floating.
      initial_state: a KVCache: the l tokens are written at slots index .. index + l − 1
        and attend to the cache's current sequence (slots start .. their own); needs causal.
      seq_idx: optional (b, l) nondecreasing integer ids of packed sequences: a token
        attends only within its own sequence, and positions restart at each sequence.
        Not combined with initial_state.
      mask: optional (b, l) token mask, 1 token, 0 pad: pads are never attended to, and
        positions count a row's tokens only, so at its tokens a row gets the output of its
        tokens alone; the output is 0 at pads. Without initial_state any layout works (a
        returned cache holds each row's tokens at its end, ``start`` at its first token);
        with initial_state the pads of a row must come before its tokens and before any
        token of the cache's current sequence (left padding; the row's ``start`` moves to
        its first token). Not combined with seq_idx or d_conv > 0.
      return_state: also return the cache after the last token. Without initial_state it
        is a new cache of ``max_length`` slots (required, ≥ l) holding the l keys/values;
        its ``start`` is where the last packed sequence begins.
      max_length: the cache length for a prefill (return_state without initial_state).

    Returns:
      (b, l, d) in the compute dtype [, KVCache].
    """
    check_rank("x", x, 3, "(batch, length, d_model)")
    check_floating("x", x)
    batch, length, _ = x.shape
    check_shape("x", x, (batch, length, self.d_model), "(batch, length, d_model)")
    if initial_state is not None:
      self._check_cache(initial_state, batch, length)
      if seq_idx is not None:
        raise ValueError("seq_idx cannot be combined with initial_state")
      if max_length is not None:
        raise ValueError("max_length applies to a prefill only; the cache's length is fixed")
    elif return_state:
      if max_length is None or max_length < length:
        raise ValueError(f"return_state without initial_state needs max_length >= "
                         f"length={length}, got max_length={max_length}")
      if not self.causal:
        raise ValueError("a KV cache (return_state) needs causal=True")
    if seq_idx is not None:
      check_shape("seq_idx", seq_idx, (batch, length), "(batch, length)")
      check_integer("seq_idx", seq_idx)
      if is_concrete(seq_idx) and np.any(np.diff(np.asarray(seq_idx), axis=1) < 0):
        raise ValueError("seq_idx must be nondecreasing along the length axis")
    if self.positions == "absolute" and length > self.max_position:
      raise ValueError(f"length={length} exceeds max_position={self.max_position}")
    if mask is not None:
      self._check_mask(mask, batch, length, initial_state, seq_idx)

    with jax.named_scope("attention"):
      if mask is not None:
        tokens = mask.astype(jnp.int32)
        num_pads = length - jnp.sum(tokens, axis=1)
      if initial_state is not None:
        if mask is not None:
          # Left padding: the row's sequence starts at its first token of this piece.
          initial_state = initial_state.replace(start=jnp.where(
              num_pads > 0, initial_state.index + num_pads, initial_state.start))
        pos = ((initial_state.index - initial_state.start)[:, None]
               + jnp.arange(length, dtype=jnp.int32))
        if mask is not None:
          pos = jnp.maximum(pos, 0)
        seq_start = initial_state.start
      elif mask is not None:
        pos = jnp.maximum(jnp.cumsum(tokens, axis=1) - 1, 0)
        seq_start = num_pads
      elif seq_idx is not None:
        pos, starts = segment_positions(seq_idx)
        seq_start = starts[:, -1]
      else:
        pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        seq_start = jnp.zeros((batch,), jnp.int32)
      if self.pos_emb is not None:
        x = x + self.pos_emb(pos).astype(x.dtype)

      qkv = self.in_proj(x)
      qkv, x_mlp = jnp.split(qkv, (self.qkv_dim,), axis=-1)
      conv_state = None
      if self.conv1d is not None:
        conv = self.conv1d(
            qkv, seq_idx=seq_idx, return_final_states=return_state,
            initial_states=None if initial_state is None else initial_state.conv_state)
        qkv, conv_state = conv if return_state else (conv, None)
      h, hkv, p = self.num_heads, self.num_heads_kv, self.head_dim
      q, k, v = jnp.split(qkv, (h * p, (h + hkv) * p), axis=-1)
      q = q.reshape(batch, length, h, p)
      k = k.reshape(batch, length, hkv, p)
      v = v.reshape(batch, length, hkv, p)
      if self.rotary_dim:
        rope = dict(rotary_dim=self.rotary_dim, base=self.rotary_base,
                    interleaved=self.rotary_interleaved)
        q, k = apply_rotary(q, pos, **rope), apply_rotary(k, pos, **rope)

      if initial_state is None:
        allowed = None
        if seq_idx is not None:
          allowed = (seq_idx[:, :, None] == seq_idx[:, None, :])[:, None]  # (b, 1, l, l)
        elif mask is not None:
          # Keys at tokens only; a pad query sees itself (its output is discarded).
          eye = jnp.eye(length, dtype=bool)[None]
          allowed = ((mask.astype(bool)[:, None, :] | eye))[:, None]  # (b, 1, l, l)
        if self.positions == "xpos":
          # Scale positions: differences equal position differences within a sequence
          # (token indices across packed sequences), nondecreasing along the row.
          s_pos = (jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
                   if seq_idx is not None else pos)
          causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
          o = self._xpos_attend(q, k, v, s_pos, s_pos,
                                causal if allowed is None else allowed & causal,
                                allowed, fast=True)
        else:
          o = self._attend(q, k, v, allowed, self.implementation)
        if return_state:
          if mask is not None:  # each row's tokens at the end of its slots
            order = left_align(mask)[0]
            k, v = take_along_length(k, order), take_along_length(v, order)
          cache = self.init_state(batch, max_length, k.dtype)
          cache = KVCache(k=cache.k.at[:, :length].set(k), v=cache.v.at[:, :length].set(v),
                          index=jnp.asarray(length, jnp.int32), start=seq_start,
                          conv_state=conv_state)
      else:
        cache, o = self._attend_cached(q, k, v, initial_state, length, pos)
        cache = cache.replace(conv_state=conv_state)

      if mask is not None:
        o = jnp.where(mask.astype(bool)[:, :, None, None], o, jnp.zeros((), o.dtype))
      o = o.reshape(batch, length, h * p)
      if self.mlp_dim:
        up, gate = jnp.split(x_mlp, 2, axis=-1)
        o = jnp.concatenate([o, up * jax.nn.silu(gate)], axis=-1)
      out = self.out_proj(o)
    return (out, cache) if return_state else out

  def _check_mask(self, mask: jax.Array, batch: int, length: int,
                  initial_state: Optional[KVCache], seq_idx: Optional[jax.Array]) -> None:
    check_token_mask("mask", mask, batch, length)
    if seq_idx is not None:
      raise ValueError("mask cannot be combined with seq_idx: pass one of them")
    if self.d_conv:
      raise ValueError(f"mask is not supported with d_conv={self.d_conv} (the conv window "
                       "would see pads)")
    if initial_state is None or not is_concrete(mask):
      return
    tokens = np.asarray(mask).astype(np.int64)
    if np.any(np.diff(tokens, axis=1) < 0):
      raise ValueError("with initial_state, mask must be left-padded (pads before the "
                       "tokens in every row)")
    if is_concrete(initial_state.index) and is_concrete(initial_state.start):
      has_tokens = int(initial_state.index) > np.asarray(initial_state.start)
      if np.any(has_tokens & (tokens.sum(axis=1) < length)):
        raise ValueError("mask has pads in a row whose cache already holds tokens: pads must "
                         "come before a row's first token")

  def _xpos_attend(self, q, k, v, s_q, s_k, mask, allowed, fast):
    """xPos attention: q (b, l, h, p), k/v (b, L, h_kv, p) rotated, unscaled; s_q (b, l),
    s_k (b, L) scale positions; mask (b, 1, l, L) bool, causality included.

    Each block of at most ``xpos_span`` queries takes the scales relative to its last query
    position c (per row): q·ζ^(−(c − n)/s), k·ζ^((c − m)/s). A single block of a call without
    cache (``fast``) keeps ``_attend``'s causal path (``allowed``: mask without causality).
    """
    xpos = dict(rotary_dim=self.rotary_dim, interleaved=self.rotary_interleaved,
                scale_base=self.xpos_scale_base, gamma=self.xpos_gamma,
                dtype=jnp.promote_types(q.dtype, jnp.float32))
    length = q.shape[1]
    outs = []
    for a in range(0, length, self.xpos_span):
      e = min(a + self.xpos_span, length)
      c = s_q[:, e - 1]
      qb = apply_xpos_scale(q[:, a:e], xpos_scale(s_q[:, a:e], c, downscale=False, **xpos))
      kb = apply_xpos_scale(k, xpos_scale(s_k, c, downscale=True, **xpos))
      if fast and e - a == length:
        outs.append(self._attend(qb, kb, v, allowed, self.implementation))
      else:
        outs.append(jax.nn.dot_product_attention(
            qb, kb.astype(q.dtype), v.astype(q.dtype), mask=mask[:, :, a:e],
            scale=self.softmax_scale, implementation="xla"))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)

  def _attend_cached(self, q, k, v, cache: KVCache, length: int, pos=None):
    """Writes k, v at slots index .. index + l − 1 and attends over the cache.

    Query t (slot index + t) sees slots j with start ≤ j ≤ index + t: (b, 1, l, L) mask.
    """
    zero = jnp.zeros((), jnp.int32)
    where = (zero, cache.index, zero, zero)
    k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), where)
    v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), where)
    slots = jnp.arange(cache.k.shape[1], dtype=jnp.int32)
    query_slot = cache.index + jnp.arange(length, dtype=jnp.int32)
    mask = ((slots[None, None, :] <= query_slot[None, :, None])
            & (slots[None, None, :] >= cache.start[:, None, None]))[:, None]
    if self.positions == "xpos":  # keys at slot j sit at position j − start
      s_k = slots[None, :] - cache.start[:, None]
      o = self._xpos_attend(q, k_all, v_all, pos, s_k, mask, None, fast=False)
    else:
      # Batch 1, one query (decoding one sequence): attend as the first of two identical
      # queries. A single query row makes q·Kᵀ and P·V vector-matrix products, which XLA's
      # GPU compiler turns into multiply kernels writing (heads, L, head_dim) arrays before
      # reducing them (see mamba_jax.nn.linear); two rows keep them GEMMs that read the cache
      # once (H100, transformerpp-1.3b: 2.69 -> 2.21 ms per token). Not at batch > 1: there
      # the GEMM form makes XLA re-lay the whole cache in the decoding loop's carry, a second
      # cache-sized buffer (out of memory at batch 64 for the 1.3B model).
      rows = 2 if length == 1 and q.shape[0] == 1 else length
      o = jax.nn.dot_product_attention(
          jnp.repeat(q, rows // length, axis=1), k_all.astype(q.dtype), v_all.astype(q.dtype),
          mask=jnp.repeat(mask, rows // length, axis=2), scale=self.softmax_scale,
          implementation="xla")[:, :length]
    return KVCache(k=k_all, v=v_all, index=cache.index + length, start=cache.start,
                   conv_state=cache.conv_state), o

  def step(self, x_t: jax.Array, state: KVCache) -> tuple[jax.Array, KVCache]:
    """One decoding step: x_t (b, d) attends to the cache and itself -> (y_t (b, d), cache)."""
    check_rank("x_t", x_t, 2, "(batch, d_model)")
    y, state = self(x_t[:, None], initial_state=state, return_state=True)
    return y[:, 0], state
