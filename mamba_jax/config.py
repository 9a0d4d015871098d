"""Language-model configuration: ``MambaConfig``, the named presets and ``tiny()``.

``MambaConfig`` mirrors ``mamba_ssm.models.config_mamba.MambaConfig`` field for field, so a
released checkpoint's ``config.json`` loads with :meth:`MambaConfig.from_dict` and writes
back with :meth:`MambaConfig.to_dict`. It is frozen and hashable (mappings are stored as
``flax.core.FrozenDict``, lists as tuples) so it can be a static argument under ``jax.jit``.
Everything is validated at construction; errors name the field.

Layers: ``ssm_cfg["layer"]`` picks the mixer of every layer not in ``attn_layer_idx``:

  "Mamba1"     Mamba's selective SSM block (Gu & Dao, 2023, §3.4)   mamba_jax.nn.mamba1
  "Mamba2"     Mamba-2's SSD block (Dao & Gu, 2024, §7)             mamba_jax.nn.mamba2
  "H3"         the H3 block (Fu et al., 2023; Mamba Figure 3)       mamba_jax.nn.h3
  "SSMNoGate"  an SSM layer without the z gate (Mamba Table 1)      mamba_jax.nn.h3

and layers in ``attn_layer_idx`` are multi-head attention (``mamba_jax.nn.attention``)
configured by ``attn_cfg``. ``d_intermediate > 0`` adds a gated MLP after every mixer.

Presets (:func:`preset`, :data:`PRESET_NAMES`):

* ``mamba-{130m,370m,790m,1.4b,2.8b}``: the released Mamba-1 checkpoints
  (state-spaces/mamba-*; d_model 768/1024/1536/2048/2560, n_layer 24/48/48/48/64,
  vocab 50277 padded to a multiple of 8 = 50280).
* ``mamba2-{130m,370m,780m,1.3b,2.7b}``: the released Mamba-2 checkpoints
  (state-spaces/mamba2-*; same widths and depths, d_state 128, headdim 64, expand 2 — the
  Mamba2 defaults — and vocab padded to a multiple of 16 = 50288, as their config.json).
* ``transformerpp-{125m,350m,760m,1.3b,2.7b}``: the Transformer++ baselines of the Mamba
  and Mamba-2 papers (Mamba §4.2.1 and Appendix E.2, Mamba-2 Appendix D): GPT-3 sizes
  (Brown et al., 2020, Table 2.1: n_layer 12/24/24/24/32, d_model 768/1024/1536/2048/2560,
  heads × head_dim 12×64 / 16×64 / 16×96 / 32×64 / 32×80), rotary embeddings on the full
  head dimension, SwiGLU MLP, RMSNorm, no linear biases. The MLP width d_intermediate is
  8/3·d_model rounded up to a multiple of 128 (2048/2816/4096/5504/6912), the default of
  mamba_ssm's ``GatedMLP``, which keeps the parameter count of GPT-3's 4·d GELU MLP; the
  papers state the recipe, not this number.

Letter legend: d model width, l layers (n_layer), v vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from flax.core import FrozenDict

SSM_LAYERS = ("Mamba1", "Mamba2", "H3", "SSMNoGate")
ATTENTION = "attention"

# mamba_ssm options that only choose a PyTorch implementation (fused kernels): accepted so
# that released config.json files load, and ignored (mamba_jax picks kernels with impl=).
IMPLEMENTATION_KEYS = ("use_fast_path", "use_mem_eff_path")

# Keyword arguments each mixer accepts from ssm_cfg / attn_cfg (besides d_model, layer_idx,
# dtype, param_dtype, rngs). tests/nn/test_config.py checks them against the constructors.
MAMBA1_KEYS = ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init",
               "dt_scale", "dt_init_floor", "conv_bias", "bias", "ssm_kind", "selective",
               "A_init")
SSM_CFG_KEYS: Mapping[str, tuple[str, ...]] = {
    "Mamba1": MAMBA1_KEYS,
    "Mamba2": ("d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups",
               "A_init_range", "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min",
               "dt_max", "dt_init_floor", "dt_limit", "bias", "conv_bias", "chunk_size"),
    "H3": ("d_state", "expand", "shift_width", "dt_rank", "dt_min", "dt_max", "dt_init",
           "dt_scale", "dt_init_floor", "conv_bias", "bias", "ssm_kind", "selective",
           "A_init"),
    "SSMNoGate": MAMBA1_KEYS,
}
ATTN_CFG_KEYS = ("num_heads", "num_heads_kv", "head_dim", "qkv_proj_bias", "out_proj_bias",
                 "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved", "positions",
                 "xpos_scale_base", "xpos_gamma", "max_position", "causal", "softmax_scale",
                 "d_conv", "mlp_dim", "implementation")

# Attention position kinds (mamba_jax.nn.attention.POSITIONS; tests/nn/test_config.py checks).
ATTN_POSITIONS = ("rope", "xpos", "absolute", "none")

_FIELDS_JSON = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg",
                "attn_layer_idx", "attn_cfg", "rms_norm", "residual_in_fp32",
                "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings")


def _freeze(value: Any) -> Any:
  """Mappings → FrozenDict, lists/tuples → tuples, recursively (hashable, immutable)."""
  if isinstance(value, Mapping):
    return FrozenDict({str(k): _freeze(v) for k, v in value.items()})
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def _thaw(value: Any) -> Any:
  """The inverse of :func:`_freeze`: plain dicts and lists, as in a config.json."""
  if isinstance(value, Mapping):
    return {k: _thaw(v) for k, v in value.items()}
  if isinstance(value, tuple):
    return [_thaw(v) for v in value]
  return value


@dataclasses.dataclass(frozen=True)
class MambaConfig:
  """A language model of ``n_layer`` pre-norm residual blocks (mamba_ssm ``MambaConfig``).

  Attributes:
    d_model: residual stream width d.
    d_intermediate: hidden width of the gated MLP after each mixer; 0 means no MLP.
    n_layer: number of blocks.
    vocab_size: tokenizer vocabulary; the embedding has :attr:`vocab_size_padded` rows.
    ssm_cfg: ``{"layer": one of SSM_LAYERS, **mixer keyword arguments}``; "layer" defaults
      to "Mamba1" like mamba_ssm.
    attn_layer_idx: indices of the layers that are attention instead of SSM.
    attn_cfg: keyword arguments of the attention layers (:data:`ATTN_CFG_KEYS`).
    rms_norm: RMSNorm (True) or LayerNorm (False) for the block and final norms.
    residual_in_fp32: keep the residual stream in float32.
    fused_add_norm: a PyTorch kernel choice in mamba_ssm, kept for config.json round
      trips; it does not change the model (the fused and unfused paths compute the same).
    pad_vocab_size_multiple: pad the vocabulary up to a multiple of this.
    tie_embeddings: the LM head reuses the embedding matrix.
    norm_epsilon: epsilon of every block norm and the final norm (mamba_ssm's 1e-5).
  """

  d_model: int = 2560
  d_intermediate: int = 0
  n_layer: int = 64
  vocab_size: int = 50277
  ssm_cfg: Mapping[str, Any] = dataclasses.field(default_factory=FrozenDict)
  attn_layer_idx: tuple[int, ...] = ()
  attn_cfg: Mapping[str, Any] = dataclasses.field(default_factory=FrozenDict)
  rms_norm: bool = True
  residual_in_fp32: bool = True
  fused_add_norm: bool = True
  pad_vocab_size_multiple: int = 8
  tie_embeddings: bool = True
  norm_epsilon: float = 1e-5

  def __post_init__(self):
    object.__setattr__(self, "ssm_cfg", _freeze(self.ssm_cfg or {}))
    object.__setattr__(self, "attn_cfg", _freeze(self.attn_cfg or {}))
    object.__setattr__(self, "attn_layer_idx", tuple(self.attn_layer_idx or ()))
    self._validate()

  def _validate(self) -> None:
    for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"MambaConfig.{name} must be a positive int, got {value!r}")
    if (not isinstance(self.d_intermediate, int) or isinstance(self.d_intermediate, bool)
        or self.d_intermediate < 0):
      raise ValueError(f"MambaConfig.d_intermediate must be an int >= 0 (0: no MLP), got "
                       f"{self.d_intermediate!r}")
    if not (isinstance(self.norm_epsilon, (int, float)) and self.norm_epsilon > 0):
      raise ValueError(f"MambaConfig.norm_epsilon must be > 0, got {self.norm_epsilon!r}")
    for i in self.attn_layer_idx:
      if not isinstance(i, int) or not 0 <= i < self.n_layer:
        raise ValueError(f"MambaConfig.attn_layer_idx={self.attn_layer_idx} has {i!r}, "
                         f"outside [0, n_layer={self.n_layer})")
    if len(set(self.attn_layer_idx)) != len(self.attn_layer_idx):
      raise ValueError(f"MambaConfig.attn_layer_idx={self.attn_layer_idx} has duplicates")
    layer = self.ssm_layer
    if layer not in SSM_LAYERS:
      raise ValueError(f"MambaConfig.ssm_cfg['layer']={layer!r} is not one of {SSM_LAYERS}")
    allowed = set(SSM_CFG_KEYS[layer]) | set(IMPLEMENTATION_KEYS) | {"layer"}
    unknown = sorted(set(self.ssm_cfg) - allowed)
    if unknown:
      raise ValueError(f"MambaConfig.ssm_cfg has keys {unknown} unknown to layer {layer!r}; "
                       f"expected some of {sorted(allowed)}")
    unknown = sorted(set(self.attn_cfg) - set(ATTN_CFG_KEYS))
    if unknown:
      raise ValueError(f"MambaConfig.attn_cfg has unknown keys {unknown}; expected some of "
                       f"{list(ATTN_CFG_KEYS)}")
    positions = self.attn_cfg.get("positions", "rope")
    if positions not in ATTN_POSITIONS:
      raise ValueError(f"MambaConfig.attn_cfg['positions']={positions!r} is not one of "
                       f"{ATTN_POSITIONS}")
    if self.attn_layer_idx and "num_heads" not in self.attn_cfg:
      raise ValueError("MambaConfig.attn_cfg must give num_heads when attn_layer_idx is "
                       f"not empty (attn_layer_idx={self.attn_layer_idx})")

  # Derived properties.

  @property
  def vocab_size_padded(self) -> int:
    """vocab_size rounded up to a multiple of pad_vocab_size_multiple (embedding rows)."""
    m = self.pad_vocab_size_multiple
    return int(math.ceil(self.vocab_size / m) * m)

  @property
  def ssm_layer(self) -> str:
    """The SSM mixer of non-attention layers: ssm_cfg["layer"], "Mamba1" by default."""
    return self.ssm_cfg.get("layer", "Mamba1")

  @property
  def ssm_kwargs(self) -> dict[str, Any]:
    """ssm_cfg without "layer" and the PyTorch implementation switches: mixer kwargs."""
    drop = {"layer", *IMPLEMENTATION_KEYS}
    return {k: v for k, v in self.ssm_cfg.items() if k not in drop}

  @property
  def attn_kwargs(self) -> dict[str, Any]:
    return dict(self.attn_cfg)

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    """Mixer kind of each layer: :data:`ATTENTION` or :attr:`ssm_layer`."""
    attn = set(self.attn_layer_idx)
    return tuple(ATTENTION if i in attn else self.ssm_layer for i in range(self.n_layer))

  @property
  def n_residuals_per_layer(self) -> int:
    """Residual branches per block: 1 (mixer), or 2 with an MLP (output-projection scale)."""
    return 2 if self.d_intermediate > 0 else 1

  # Conversion.

  def replace(self, **changes: Any) -> "MambaConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "MambaConfig":
    """From a mamba_ssm ``config.json`` dict (older files lack the newer keys: defaults)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise ValueError(f"MambaConfig.from_dict: unknown keys {unknown}; expected some of "
                       f"{sorted(known)}")
    return cls(**dict(data))

  def to_dict(self) -> dict[str, Any]:
    """A plain dict in mamba_ssm's ``config.json`` layout (plus norm_epsilon if not 1e-5)."""
    out = {name: _thaw(getattr(self, name)) for name in _FIELDS_JSON}
    if self.norm_epsilon != 1e-5:
      out["norm_epsilon"] = self.norm_epsilon
    return out

  @classmethod
  def tiny(cls, layer: str = "Mamba1") -> "MambaConfig":
    """A few-thousand-parameter model for tests: d_model 32, vocab 61 (padded to 64).

    ``layer``: "Mamba1", "Mamba2", "H3", "SSMNoGate" (2 SSM layers), "hybrid" (3 layers,
    Mamba-2 / attention / Mamba-2, with a gated MLP) or "attention" (2 attention layers with
    a gated MLP: a tiny Transformer++).
    """
    base = dict(d_model=32, n_layer=2, vocab_size=61, pad_vocab_size_multiple=8)
    attn_cfg = dict(num_heads=4, rotary_emb_dim=8, qkv_proj_bias=False, out_proj_bias=False)
    mamba2 = dict(layer="Mamba2", d_state=8, headdim=16, chunk_size=8)
    if layer == "Mamba1":
      return cls(**base, ssm_cfg=dict(layer="Mamba1", d_state=4))
    if layer == "Mamba2":
      return cls(**base, ssm_cfg=mamba2)
    if layer == "H3":
      return cls(**base, ssm_cfg=dict(layer="H3", d_state=4))
    if layer == "SSMNoGate":
      return cls(**base, ssm_cfg=dict(layer="SSMNoGate", d_state=4))
    if layer == "hybrid":
      return cls(**{**base, "n_layer": 3}, d_intermediate=64, ssm_cfg=mamba2,
                 attn_layer_idx=(1,), attn_cfg=attn_cfg)
    if layer == "attention":
      return cls(**base, d_intermediate=64, attn_layer_idx=(0, 1), attn_cfg=attn_cfg)
    raise ValueError(f"MambaConfig.tiny: layer={layer!r} is not one of "
                     f"{(*SSM_LAYERS, 'hybrid', 'attention')}")


def _mamba1(d_model: int, n_layer: int) -> MambaConfig:
  return MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=50277, ssm_cfg={},
                     pad_vocab_size_multiple=8)


def _mamba2(d_model: int, n_layer: int) -> MambaConfig:
  return MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=50277,
                     ssm_cfg={"layer": "Mamba2"}, pad_vocab_size_multiple=16)


def _transformerpp(d_model: int, n_layer: int, num_heads: int) -> MambaConfig:
  head_dim = d_model // num_heads
  d_intermediate = int(math.ceil(int(8 * d_model / 3) / 128) * 128)
  attn_cfg = dict(num_heads=num_heads, rotary_emb_dim=head_dim, qkv_proj_bias=False,
                  out_proj_bias=False, causal=True)
  return MambaConfig(d_model=d_model, n_layer=n_layer, d_intermediate=d_intermediate,
                     vocab_size=50277, ssm_cfg={}, attn_layer_idx=tuple(range(n_layer)),
                     attn_cfg=attn_cfg, pad_vocab_size_multiple=16)


PRESETS: Mapping[str, MambaConfig] = {
    "mamba-130m": _mamba1(768, 24),
    "mamba-370m": _mamba1(1024, 48),
    "mamba-790m": _mamba1(1536, 48),
    "mamba-1.4b": _mamba1(2048, 48),
    "mamba-2.8b": _mamba1(2560, 64),
    "mamba2-130m": _mamba2(768, 24),
    "mamba2-370m": _mamba2(1024, 48),
    "mamba2-780m": _mamba2(1536, 48),
    "mamba2-1.3b": _mamba2(2048, 48),
    "mamba2-2.7b": _mamba2(2560, 64),
    "transformerpp-125m": _transformerpp(768, 12, 12),
    "transformerpp-350m": _transformerpp(1024, 24, 16),
    "transformerpp-760m": _transformerpp(1536, 24, 16),
    "transformerpp-1.3b": _transformerpp(2048, 24, 32),
    "transformerpp-2.7b": _transformerpp(2560, 32, 32),
}
PRESET_NAMES = tuple(PRESETS)


def preset(name: str) -> MambaConfig:
  """The named preset (:data:`PRESET_NAMES`); ValueError listing the names otherwise."""
  if name not in PRESETS:
    raise ValueError(f"preset: name={name!r} is not one of {PRESET_NAMES}")
  return PRESETS[name]
