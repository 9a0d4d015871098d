"""Parameter initialisers shared by the SSM modules, as in ``mamba_ssm``.

Mamba (Gu & Dao, 2023, §3.6 and Appendix E) and Mamba-2 (Dao & Gu, 2024, §7) initialise a
handful of parameters specially; everything else follows PyTorch's defaults, which
``mamba_ssm`` keeps:

* Δ (dt): sampled log-uniformly in [dt_min, dt_max], floored at ``dt_init_floor``, stored as
  the bias that softplus maps back onto it: ``dt_bias = softplus⁻¹(dt)``.
* The low-rank Δ projection (Mamba-1 ``dt_proj``): U(±dt_rank^-1/2 · dt_scale), or that
  constant.
* A: Mamba-1 uses S4D-Real, A_n = -(n + 1), stored as ``A_log = log(n + 1)``; the ablations
  of Mamba Table 8 add S4D-Lin (complex, A_n = -1/2 + iπn), its real part alone, and a
  random real A; Mamba-2 uses one scalar per head, A ~ U(A_init_range).
* Linear and conv weights: PyTorch's default U(±1/√fan_in) (``kaiming_uniform_(a=√5)``);
  residual output projections (``out_proj``, ``fc2``) rescaled by 1/√(n_residuals · n_layer)
  (GPT-2 scheme, ``mamba_ssm.models.mixer_seq_simple._init_weights``); embeddings
  N(0, 0.02); Linear biases zero except the Δ bias.

Parameters that should not be weight-decayed (A_log, D, dt biases, norm weights, biases)
carry ``no_weight_decay=True`` in their ``nnx.Param`` metadata (:data:`NO_WEIGHT_DECAY`);
``mamba_jax.nn.lm.weight_decay_mask`` reads it.

Letter legend: e d_inner, n state, h heads, r dt_rank. All results are float32 unless a
dtype is given.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from mamba_jax.ops.checks import check_choice

Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]

# Metadata key on nnx.Param marking parameters excluded from weight decay.
NO_WEIGHT_DECAY = "no_weight_decay"

DT_INITS = ("random", "constant")
A_INITS = ("s4d_real", "s4d_lin", "s4d_lin_real", "random")


def inverse_softplus(x: jax.Array) -> jax.Array:
  """softplus⁻¹(x) = x + log(-expm1(-x)) = log(exp(x) - 1), for x > 0.

  Written with ``expm1`` so that it stays accurate for small x (dt ≈ 1e-3), as in
  ``mamba_ssm`` (pytorch/pytorch#72759).
  """
  x = jnp.asarray(x)
  return x + jnp.log(-jnp.expm1(-x))


def _check_dt_range(dt_min: float, dt_max: float, dt_init_floor: float) -> None:
  if not dt_min > 0:
    raise ValueError(f"dt_min must be > 0, got dt_min={dt_min}")
  if not dt_max >= dt_min:
    raise ValueError(f"dt_max must be >= dt_min, got dt_min={dt_min}, dt_max={dt_max}")
  if not dt_init_floor >= 0:
    raise ValueError(f"dt_init_floor must be >= 0, got dt_init_floor={dt_init_floor}")


def log_uniform_dt(key: jax.Array, shape: Sequence[int], dt_min: float = 0.001,
                   dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                   dtype: Any = jnp.float32) -> jax.Array:
  """Δ₀ = max(exp(U(log dt_min, log dt_max)), dt_init_floor) (Mamba §3.6, Appendix E).

  Args:
    key: PRNG key.
    shape: (e,) for Mamba-1 channels or (h,) for Mamba-2 heads.
    dt_min, dt_max: the log-uniform range; dt_init_floor: the lower clamp.
    dtype: result dtype (float32 by default).
  """
  _check_dt_range(dt_min, dt_max, dt_init_floor)
  u = jax.random.uniform(key, tuple(shape), jnp.float32)
  dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
  return jnp.maximum(dt, dt_init_floor).astype(dtype)


def dt_bias_init(key: jax.Array, shape: Sequence[int], dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 dtype: Any = jnp.float32) -> jax.Array:
  """dt_bias = softplus⁻¹(Δ₀) with Δ₀ from :func:`log_uniform_dt`.

  At initialisation softplus(dt_bias) lies in [max(dt_min, floor), dt_max]: Mamba-1's
  ``dt_proj.bias`` (e,) and Mamba-2's ``dt_bias`` (h,). Computed in float32, cast to dtype.
  """
  dt = log_uniform_dt(key, shape, dt_min, dt_max, dt_init_floor, jnp.float32)
  return inverse_softplus(dt).astype(dtype)


def dt_proj_kernel_init(key: jax.Array, shape: Sequence[int], dt_rank: int,
                        dt_scale: float = 1.0, dt_init: str = "random",
                        dtype: Any = jnp.float32) -> jax.Array:
  """Mamba-1 ``dt_proj`` kernel (r, e): U(±σ) ("random") or σ ("constant"), σ = r^-½·dt_scale.

  Keeps the variance of Δ's pre-activation at initialisation independent of r (Mamba
  Appendix E; ``mamba_simple.Mamba.__init__``).
  """
  check_choice("dt_init", dt_init, DT_INITS)
  std = dt_rank ** -0.5 * dt_scale
  if dt_init == "constant":
    return jnp.full(tuple(shape), std, dtype)
  return jax.random.uniform(key, tuple(shape), jnp.float32, -std, std).astype(dtype)


def s4d_real_A_log(d_inner: int, d_state: int, dtype: Any = jnp.float32) -> jax.Array:
  """S4D-Real: A[e, n] = -(n + 1), stored as A_log[e, n] = log(n + 1), shape (e, n).

  Mamba §3.6 / S4D (Gu et al., 2022). Kept in float32 like mamba_ssm (computed in the wider of
  float32 and dtype).
  """
  a = jnp.arange(1, d_state + 1, dtype=jnp.promote_types(dtype, jnp.float32))
  return jnp.broadcast_to(jnp.log(a), (d_inner, d_state)).astype(dtype)


def s4d_lin_A(d_inner: int, d_state: int,
              dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
  """S4D-Lin: A[e, n] = -1/2 + iπn, returned as (A_log, A_imag), each (e, n).

  The real part is stored as ``A_log = log(1/2)`` (so Re A = -exp(A_log) stays negative) and
  the imaginary part ``A_imag = πn`` as a separate real parameter (Mamba Table 8, S4D).
  """
  wide = jnp.promote_types(dtype, jnp.float32)
  a_log = jnp.full((d_inner, d_state), math.log(0.5), wide)
  a_imag = jnp.broadcast_to(math.pi * jnp.arange(d_state, dtype=wide), (d_inner, d_state))
  return a_log.astype(dtype), a_imag.astype(dtype)


def random_A_log(key: jax.Array, d_inner: int, d_state: int,
                 dtype: Any = jnp.float32) -> jax.Array:
  """Real random A (Mamba Table 8): A = -exp(A_log), A_log ~ N(0, 1), shape (e, n)."""
  return jax.random.normal(key, (d_inner, d_state), jnp.float32).astype(dtype)


def uniform_A_log(key: jax.Array, shape: Sequence[int],
                  A_init_range: tuple[float, float] = (1.0, 16.0),
                  dtype: Any = jnp.float32) -> jax.Array:
  """Mamba-2: A_log = log(U(A_init_range)), one value per head, shape (h,) (Mamba-2 §7).

  A = -exp(A_log) lies in [-A_init_range[1], -A_init_range[0]].
  """
  lo, hi = A_init_range
  if not (lo > 0 and hi >= lo):
    raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {A_init_range}")
  a = jax.random.uniform(key, tuple(shape), jnp.float32, lo, hi)
  return jnp.log(a).astype(dtype)


def A_log_init(kind: str, key: jax.Array, d_inner: int, d_state: int,
               dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array | None]:
  """The Mamba-1 A parameters for ``kind`` in :data:`A_INITS`: (A_log (e, n), A_imag or None).

  ``s4d_real``: A = -(n + 1). ``s4d_lin``: A = -1/2 + iπn (complex). ``s4d_lin_real``:
  A = -1/2. ``random``: A = -exp(N(0, 1)). A = -exp(A_log) (+ i·A_imag when complex).
  """
  check_choice("A_init", kind, A_INITS)
  if kind == "s4d_real":
    return s4d_real_A_log(d_inner, d_state, dtype), None
  if kind == "s4d_lin":
    return s4d_lin_A(d_inner, d_state, dtype)
  if kind == "s4d_lin_real":
    return s4d_lin_A(d_inner, d_state, dtype)[0], None
  return random_A_log(key, d_inner, d_state, dtype), None


def torch_default_init(fan_in: int, scale: float = 1.0) -> Initializer:
  """U(±scale/√fan_in): PyTorch's default for Linear and Conv1d weights and Conv1d biases.

  ``kaiming_uniform_(w, a=√5)`` has bound gain·√(3/fan_in) with gain = √(2/(1+5)), i.e.
  1/√fan_in. Linear: fan_in = in_features; depthwise Conv1d: fan_in = width. ``scale`` is
  the residual rescaling 1/√(n_residuals · n_layer) for ``out_proj`` / ``fc2``.
  """
  if fan_in <= 0:
    raise ValueError(f"fan_in must be positive, got fan_in={fan_in}")
  bound = scale / math.sqrt(fan_in)

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, tuple(shape), jnp.float32, -bound, bound).astype(dtype)

  return init


def residual_scale(n_layer: int, n_residuals_per_layer: int = 1) -> float:
  """1/√(n_residuals_per_layer · n_layer): the GPT-2 prenorm-residual rescaling."""
  if n_layer <= 0 or n_residuals_per_layer <= 0:
    raise ValueError(f"n_layer and n_residuals_per_layer must be positive, got "
                     f"n_layer={n_layer}, n_residuals_per_layer={n_residuals_per_layer}")
  return 1.0 / math.sqrt(n_residuals_per_layer * n_layer)


def embedding_init(std: float = 0.02) -> Initializer:
  """N(0, std²) for token embeddings (``initializer_range`` in mamba_ssm)."""
  return jax.nn.initializers.normal(stddev=std)
