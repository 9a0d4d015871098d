"""Logical axis names: of every MambaLM parameter (by path), and of activations.

The modules take no distributed arguments, so parameters get their logical axes here, from
their path in ``nnx.state(model)`` (or in a train state / optimizer state that mirrors it),
through one ordered table of (regex → logical axes), first match wins (as EasyLM / t5x
partition rules). Before matching, ``layers/<i>/mixer`` is annotated with the layer's kind
from the config (``layers/3/mixer:Mamba2/in_proj/kernel``), so a Mamba-1 conv and a Mamba-2
conv can be told apart. A parameter the table does not cover, or whose rank differs from
its entry, raises ``ValueError``; a rank-0 leaf (step counters) is replicated.

Fused projections. H3's in_proj columns are the concatenation [q, k, v], the MLP's fc1
[y, gate], attention's [q, k, v, mlp]. A contiguous split of such an axis over devices
would give device 0 all of q and device 1 the rest: the wrong pieces. Their output axis is
named ``in_proj_fused`` / ``conv_fused`` / ``mlp_fused``, which no rule splits over
``tensor`` (the kernel is whole on every tensor device).

The gated Mamba-1 in_proj stores its x and z columns interleaved per channel
(``nn.mamba1``'s layout: column 2c is x channel c, 2c + 1 is z channel c), so a contiguous
split over ``tensor`` (d_inner % tensor == 0, checked by ``mesh.validate_mesh``) gives each
device the x and z columns of its own channels. Its axis is ``in_proj_interleaved``, split
over ``tensor`` like d_inner: each tensor device stores 1/tensor of it. SSMNoGate's in_proj
(x alone, (d, e)) is plainly ``inner``.

Mamba-2's in_proj columns and conv channels are stored group by group (``nn.mamba2``'s
grouped layout: [z0 | x0 | group 0 | group 1 | ...], group j = [z_j | x_j | B_j | C_j |
dt_j], conv [x_j | B_j | C_j] per group), so a contiguous split over ``tensor`` (ngroups %
tensor == 0, with d_ssm = d_inner, both checked by ``mesh.validate_mesh``) gives each
device whole groups: the z, x, B, C, dt columns of its own heads (Mamba-2 §8). Their axes
are ``in_proj_grouped`` / ``conv_grouped``, split over ``tensor`` like the heads: each
tensor device stores 1/tensor of them.

Activations use their own names (``act_*``), so that e.g. the batch of an activation and
the d_model axis of a weight map to different mesh axes. :func:`constrain` applies them
with ``with_sharding_constraint`` inside a :func:`use_rules` context, and is the identity
outside one.

Letter legend: b batch, l length, d d_model, e d_inner, h heads, p head_dim, n d_state,
g groups, r dt_rank, w conv width, v vocabulary.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mamba_jax.config import MambaConfig

# Weight axes.
VOCAB, EMBED, EMBED_VECTOR, POSITION = "vocab", "embed", "embed_vector", "position"
IN_PROJ_FUSED, CONV_FUSED, CONV_WIDTH = "in_proj_fused", "conv_fused", "conv_width"
IN_PROJ_GROUPED, CONV_GROUPED = "in_proj_grouped", "conv_grouped"
IN_PROJ_INTERLEAVED = "in_proj_interleaved"
HEADS, GROUPS, INNER, STATE = "heads", "groups", "inner", "state"
X_PROJ_OUT, DT_RANK = "x_proj_out", "dt_rank"
MLP, MLP_FUSED, ATTN_OUT_IN = "mlp", "mlp_fused", "attn_out_in"
WEIGHT_AXES = (VOCAB, EMBED, EMBED_VECTOR, POSITION, IN_PROJ_FUSED, CONV_FUSED, CONV_WIDTH,
               IN_PROJ_GROUPED, CONV_GROUPED, IN_PROJ_INTERLEAVED, HEADS, GROUPS, INNER, STATE,
               X_PROJ_OUT, DT_RANK, MLP, MLP_FUSED, ATTN_OUT_IN)

# Activation axes.
ACT_BATCH, ACT_LENGTH, ACT_EMBED = "act_batch", "act_length", "act_embed"
ACT_HEADS, ACT_GROUPS, ACT_INNER = "act_heads", "act_groups", "act_inner"
ACT_MLP, ACT_VOCAB = "act_mlp", "act_vocab"
ACTIVATION_AXES = (ACT_BATCH, ACT_LENGTH, ACT_EMBED, ACT_HEADS, ACT_GROUPS, ACT_INNER,
                   ACT_MLP, ACT_VOCAB)

LOGICAL_AXES = frozenset(WEIGHT_AXES + ACTIVATION_AXES)

_SSM = r"mixer:(Mamba1|SSMNoGate|H3)/"
_M2 = r"mixer:Mamba2/"
_ATTN = r"mixer:attention/"

# (regex searched in the annotated path, logical axes), first match wins.
PARAM_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Embeddings and the LM head.
    (r"backbone/embedding/embedding$", (VOCAB, EMBED)),
    (r"lm_head/kernel$", (EMBED, VOCAB)),
    # Mamba-2 (Mamba-2 §8: heads and groups over tensor, in_proj column-parallel through
    # its grouped layout, out_proj row-parallel).
    (_M2 + r"in_proj/kernel$", (EMBED, IN_PROJ_GROUPED)),
    (_M2 + r"in_proj/bias$", (IN_PROJ_GROUPED,)),
    (_M2 + r"conv1d/kernel$", (CONV_GROUPED, CONV_WIDTH)),
    (_M2 + r"conv1d/bias$", (CONV_GROUPED,)),
    (_M2 + r"(A_log|dt_bias|D)$", (HEADS,)),
    (_M2 + r"norm/weight$", (INNER,)),
    (_M2 + r"out_proj/kernel$", (INNER, EMBED)),
    (_M2 + r"out_proj/bias$", (EMBED_VECTOR,)),
    # Mamba-1, SSMNoGate, H3: channels of d_inner over tensor; x_proj row-parallel. The
    # gated Mamba-1 in_proj interleaved [x_c, z_c] (column-parallel), SSMNoGate's x alone,
    # H3's [q | k | v] fused.
    (r"mixer:Mamba1/in_proj/kernel$", (EMBED, IN_PROJ_INTERLEAVED)),
    (r"mixer:Mamba1/in_proj/bias$", (IN_PROJ_INTERLEAVED,)),
    (r"mixer:SSMNoGate/in_proj/kernel$", (EMBED, INNER)),
    (r"mixer:SSMNoGate/in_proj/bias$", (INNER,)),
    (_SSM + r"in_proj/kernel$", (EMBED, IN_PROJ_FUSED)),
    (_SSM + r"in_proj/bias$", (IN_PROJ_FUSED,)),
    (_SSM + r"conv1d/kernel$", (INNER, CONV_WIDTH)),
    (_SSM + r"conv1d/bias$", (INNER,)),
    (_SSM + r"x_proj/kernel$", (INNER, X_PROJ_OUT)),
    (_SSM + r"dt_proj/kernel$", (DT_RANK, INNER)),
    (_SSM + r"(dt_proj/bias|dt_bias|D)$", (INNER,)),
    (_SSM + r"(A_log|A_imag)$", (INNER, STATE)),
    (_SSM + r"(B|C|B_imag|C_imag)$", (STATE,)),
    (_SSM + r"out_proj/kernel$", (INNER, EMBED)),
    (_SSM + r"out_proj/bias$", (EMBED_VECTOR,)),
    # Attention: heads over tensor through out_proj's rows; the fused qkv stays whole.
    (_ATTN + r"pos_emb/embedding$", (POSITION, EMBED)),
    (_ATTN + r"in_proj/kernel$", (EMBED, IN_PROJ_FUSED)),
    (_ATTN + r"in_proj/bias$", (IN_PROJ_FUSED,)),
    (_ATTN + r"conv1d/kernel$", (CONV_FUSED, CONV_WIDTH)),
    (_ATTN + r"conv1d/bias$", (CONV_FUSED,)),
    (_ATTN + r"out_proj/kernel$", (ATTN_OUT_IN, EMBED)),
    (_ATTN + r"out_proj/bias$", (EMBED_VECTOR,)),
    # Gated MLP: fc1 fused [y | gate], fc2 row-parallel.
    (r"mlp/fc1/kernel$", (EMBED, MLP_FUSED)),
    (r"mlp/fc1/bias$", (MLP_FUSED,)),
    (r"mlp/fc2/kernel$", (MLP, EMBED)),
    (r"mlp/fc2/bias$", (EMBED_VECTOR,)),
    # Block norms and the final norm.
    (r"(norm|norm2|norm_f)/(weight|bias)$", (EMBED_VECTOR,)),
)

_COMPILED = tuple((re.compile(pattern), axes) for pattern, axes in PARAM_RULES)
_LAYER = re.compile(r"layers/(\d+)/mixer/")


def path_string(path: Sequence[Any]) -> str:
  """A jax key path as ``a/b/0/c`` (the trailing ``/value`` of nnx Variables dropped)."""
  text = jax.tree_util.keystr(tuple(path), simple=True, separator="/")
  return text[:-len("/value")] if text.endswith("/value") else text


def annotate(path: str, config: MambaConfig) -> str:
  """``layers/<i>/mixer/`` -> ``layers/<i>/mixer:<kind>/`` with the kind of layer i."""
  kinds = config.layer_kinds

  def kind(match: re.Match) -> str:
    i = int(match.group(1))
    if i >= len(kinds):
      raise ValueError(f"parameter path {path!r} names layer {i}, but the config has "
                       f"n_layer = {len(kinds)}")
    return f"layers/{i}/mixer:{kinds[i]}/"

  return _LAYER.sub(kind, path)


def param_logical_axes(path: str, ndim: int, config: MambaConfig) -> tuple[str, ...]:
  """The logical axes of the parameter (or optimizer moment) at ``path`` of rank ``ndim``.

  Raises:
    ValueError: when no rule matches (a parameter the table does not know) or the matching
      rule has another rank.
  """
  if ndim == 0:
    return ()
  annotated = annotate(path, config)
  for pattern, axes in _COMPILED:
    if pattern.search(annotated):
      if len(axes) != ndim:
        raise ValueError(f"parameter {path!r} ({annotated}) has rank {ndim} but its rule "
                         f"{pattern.pattern!r} gives {len(axes)} axes {axes}")
      return axes
  raise ValueError(f"no logical-axis rule covers parameter {path!r} ({annotated}, rank "
                   f"{ndim}); add one to mamba_jax.sharding.logical.PARAM_RULES")


# Activation constraints.

_CONTEXT: contextvars.ContextVar[Optional[tuple[Mesh, Mapping[str, Any]]]] = (
    contextvars.ContextVar("mamba_jax_sharding_rules", default=None))


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Mapping[str, Any]) -> Iterator[None]:
  """Within this context, :func:`constrain` shards activations over ``mesh`` by ``rules``."""
  token = _CONTEXT.set((mesh, rules))
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def current_rules() -> Optional[tuple[Mesh, Mapping[str, Any]]]:
  """(mesh, rules) of the enclosing :func:`use_rules`, or None."""
  return _CONTEXT.get()


def to_spec(axes: Sequence[Optional[str]], rules: Mapping[str, Any],
            shape: Optional[Sequence[int]] = None, mesh: Optional[Mesh] = None,
            what: str = "array") -> PartitionSpec:
  """Logical axes -> PartitionSpec through ``rules`` (logical name -> mesh axis / axes / None).

  With ``shape`` and ``mesh`` also checks that each sharded dimension divides evenly.

  Raises:
    ValueError: an unknown logical name, a mesh axis used twice, or a dimension that the
      product of its mesh axes does not divide.
  """
  spec, used = [], set()
  for i, name in enumerate(axes):
    if name is None:
      spec.append(None)
      continue
    if name not in LOGICAL_AXES:
      raise ValueError(f"{what}: unknown logical axis {name!r}; expected one of "
                       f"{sorted(LOGICAL_AXES)}")
    target = rules.get(name)
    mesh_axes = () if target is None else (target,) if isinstance(target, str) else tuple(
        target)
    for axis in mesh_axes:
      if axis in used:
        raise ValueError(f"{what}: mesh axis {axis!r} used twice by logical axes {tuple(axes)}")
      used.add(axis)
    if shape is not None and mesh is not None and mesh_axes:
      ways = 1
      for axis in mesh_axes:
        ways *= int(mesh.shape[axis])
      if shape[i] % ways:
        raise ValueError(
            f"{what}: dimension {i} ({name}) of size {shape[i]} is not divisible by "
            f"{'·'.join(mesh_axes)} = {ways}, the devices it is split over")
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1
                else mesh_axes)
  return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
  """``with_sharding_constraint`` of activation ``x`` by logical axes (``act_*`` names).

  The identity outside :func:`use_rules` (no mesh: nothing to shard over).
  """
  if len(logical_axes) != x.ndim:
    raise ValueError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} for "
                     f"an array of rank {x.ndim} (shape {x.shape})")
  context = current_rules()
  if context is None:
    return x
  mesh, rules = context
  spec = to_spec(logical_axes, rules, x.shape, mesh, what=f"activation {tuple(logical_axes)}")
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
