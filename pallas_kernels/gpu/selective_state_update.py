"""One decoding step of the selective SSM (S6, Mamba-1) as a Pallas GPU kernel (Triton lowering).

The kernel form of ``mamba_jax.ops.selective_state_update`` (Mamba §3.2 Algorithm 2 advanced by
one token, real A), per channel i of d_inner and state k:

  Δ_i   = softplus(dt_i + dt_bias_i)                 (bias and softplus optional)
  h'_ik = exp(Δ_i A_ik) h_ik + Δ_i x_i B_k           (simplified ZOH, Mamba §2 eq. (4))
  out_i = (Σ_k C_k h'_ik + D_i x_i) · silu(z_i)       (D and z optional)

with B, C those of channel i's group. One program per (batch row, block of ``block_d``
channels): it reads its (block_d, n) state tile once, writes the new one in place
(``input_output_aliases``: a decoding loop's carried buffer is not copied) and writes out. At
batch 1 the XLA form of the same step is three kernels (Δ and the decay, the update, the
readout); this is one.

Backend: Pallas with the Triton lowering; ``interpret=True`` runs it on CPU.

Shape legend: b batch, e d_inner, n d_state, g groups.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp

from pallas_kernels.gpu.selective_scan_args import INPUT_DTYPES, is_power_of_two, softplus


def default_block_d(batch: int, d_inner: int, groups: int) -> int:
  """The largest power of two <= 128 dividing d_inner / groups, halved (down to 16) while
  there are fewer than 256 programs."""
  per_group = d_inner // groups
  block = 128
  while per_group % block:
    block //= 2
  while block > 16 and batch * (d_inner // block) < 256:
    block //= 2
  return block


def check_supported(state, x, A, groups: int) -> str:
  """'' when the kernel takes these shapes and dtypes, else why not."""
  d_inner, d_state = A.shape
  if jnp.iscomplexobj(A) or jnp.iscomplexobj(state):
    return "the kernel takes a real A and state (complex A runs in the XLA form)"
  if not is_power_of_two(d_state):
    return f"the kernel needs d_state a power of two, got {d_state}"
  if (d_inner // groups) % 16:
    return f"the kernel needs d_inner / groups a multiple of 16, got {d_inner // groups}"
  for name, a in (("state", state), ("x", x)):
    if jnp.dtype(a.dtype) not in INPUT_DTYPES:
      return f"the kernel takes float32/bfloat16/float16 {name}, got {a.dtype}"
  return ""


def _step(state, x, dt, a, B, C, D, z, dt_bias, dt_softplus: bool):
  """The module docstring's equations on loaded values, in float32: state (block_d, n), x, dt,
  D, z, dt_bias (block_d,) (D, z, dt_bias may be None), a (block_d, n), B, C (n,). Returns
  (out (block_d,), new state (block_d, n)), both float32."""
  f32 = lambda v: v.astype(jnp.float32)
  x, delta = f32(x), f32(dt)
  if dt_bias is not None:
    delta = delta + f32(dt_bias)
  if dt_softplus:
    delta = softplus(delta)
  new = jnp.exp(delta[:, None] * f32(a)) * f32(state) + (delta * x)[:, None] * f32(B)[None, :]
  out = jnp.sum(new * f32(C)[None, :], axis=1)
  if D is not None:
    out = out + f32(D) * x
  if z is not None:
    z = f32(z)
    out = out * z / (1.0 + jnp.exp(-z))
  return out, new


def _kernel(*refs, has_D: bool, has_z: bool, has_dt_bias: bool, dt_softplus: bool):
  """One (batch row, block of channels): the module docstring's equations in float32."""
  refs = list(refs)
  take = lambda present: refs.pop(0)[...] if present else None
  state_ref, x_ref, dt_ref, a_ref, b_ref, c_ref = (refs.pop(0) for _ in range(6))
  D, z, dt_bias = take(has_D), take(has_z), take(has_dt_bias)
  out_ref, new_state_ref = refs
  out, new = _step(state_ref[...], x_ref[...], dt_ref[...], a_ref[...], b_ref[...], c_ref[...],
                   D, z, dt_bias, dt_softplus)
  new_state_ref[...] = new.astype(new_state_ref.dtype)
  out_ref[...] = out.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("dt_softplus", "block_d", "interpret"))
def selective_state_update_pallas(state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array,
                                  B: jax.Array, C: jax.Array, D: jax.Array | None,
                                  z: jax.Array | None, dt_bias: jax.Array | None, *,
                                  dt_softplus: bool, block_d: int | None = None,
                                  interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """The module docstring's step on validated arguments (``selective_state_update``'s checks).

  Args:
    state: (b, e, n). x, dt: (b, e). A: (e, n) real. B, C: (b, g, n).
    D, dt_bias: optional (e,). z: optional (b, e).
    dt_softplus: Δ = softplus(dt + dt_bias) instead of dt + dt_bias.
    block_d: channels per program (a power of two dividing e / g); default
      ``default_block_d``.
    interpret: run in the Pallas interpreter (CPU).

  Returns:
    (out (b, e) in x's dtype, new state (b, e, n) in state's dtype).
  """
  batch, d_inner, d_state = state.shape
  groups = B.shape[1]
  block_d = block_d or default_block_d(batch, d_inner, groups)
  if not (is_power_of_two(block_d) and (d_inner // groups) % block_d == 0):
    raise ValueError(f"block_d must be a power of two dividing d_inner / groups = "
                     f"{d_inner // groups}, got {block_d}")
  per_group = d_inner // groups // block_d
  rows = pl.BlockSpec((None, block_d), lambda bi, j: (bi, j))
  state_tile = pl.BlockSpec((None, block_d, d_state), lambda bi, j: (bi, j, 0))
  group_row = pl.BlockSpec((None, None, d_state), lambda bi, j: (bi, j // per_group, 0))
  vector = pl.BlockSpec((block_d,), lambda bi, j: (j,))
  inputs = [(state, state_tile), (x, rows), (dt, rows),
            (A, pl.BlockSpec((block_d, d_state), lambda bi, j: (j, 0))),
            (B, group_row), (C, group_row)]
  for a, spec in ((D, vector), (z, rows), (dt_bias, vector)):
    if a is not None:
      inputs.append((a, spec))
  kernel = functools.partial(_kernel, has_D=D is not None, has_z=z is not None,
                             has_dt_bias=dt_bias is not None, dt_softplus=dt_softplus)
  return pl.pallas_call(
      kernel,
      grid=(batch, d_inner // block_d),
      in_specs=[spec for _, spec in inputs],
      out_specs=[rows, state_tile],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct(state.shape, state.dtype)],
      input_output_aliases={0: 1},  # the state, updated in place
      compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="selective_state_update",
  )(*[a for a, _ in inputs])


def _packed_kernel(state_ref, x_ref, dt_ref, x_dbl_ref, xz_ref, a_log_ref, d_ref, dt_bias_ref,
                   out_ref, new_state_ref, *, batch: int, out_rows: int, block_d: int,
                   dt_rank: int, n: int):
  """Mamba-1's step reading B, C, z in place: see ``selective_state_update_packed_pallas``."""
  bi = pl.program_id(0)
  rows = pl.ds(pl.program_id(1) * block_d, block_d)
  out, new = _step(
      state_ref[...], x_ref[bi, rows], dt_ref[bi, rows],
      -jnp.exp(a_log_ref[...].astype(jnp.float32)), x_dbl_ref[bi, pl.ds(dt_rank, n)],
      x_dbl_ref[bi, pl.ds(dt_rank + n, n)], d_ref[...], xz_ref[rows, 1], dt_bias_ref[...],
      dt_softplus=True)
  new_state_ref[...] = new.astype(new_state_ref.dtype)
  out_ref[bi, rows] = out.astype(out_ref.dtype)
  for extra in range(batch, out_rows):  # zero rows, written once (by batch row 0)
    @pl.when(bi == 0)
    def _():
      out_ref[extra, rows] = jnp.zeros((block_d,), out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("dt_rank", "out_rows", "block_d", "interpret"))
def selective_state_update_packed_pallas(state: jax.Array, x: jax.Array, dt: jax.Array,
                                         x_dbl: jax.Array, xz: jax.Array, A_log: jax.Array,
                                         D: jax.Array, dt_bias: jax.Array, *, dt_rank: int,
                                         out_rows: int | None = None,
                                         block_d: int | None = None,
                                         interpret: bool = False
                                         ) -> tuple[jax.Array, jax.Array]:
  """Mamba-1's decoding step, its inputs read where the layer's products left them.

  The module docstring's equations with dt_softplus, A = −exp(A_log), one group, and:
  B = x_dbl[:, r:r + n], C = x_dbl[:, r + n:r + 2n] (x_proj's output), z = xz[..., 1] (the
  gate half of in_proj's interleaved output), x and dt the first b rows of theirs. A custom
  call's operands are materialized buffers, so slices passed in would each cost a kernel.

  Args:
    state: (b, e, n). x, dt: (rows >= b, e) the conv's output and dt_proj's product (no bias).
    x_dbl: (rows >= b, r + 2n). xz: (b, e, 2). A_log: (e, n). D, dt_bias: (e,).
    dt_rank: r.
    out_rows: rows of out, >= b (default b); rows past b are zeros (out_proj's product is
      then a two-row GEMM at batch 1 without a pad kernel; ``mamba_jax.nn.linear``).
    block_d: channels per program; default ``default_block_d``.
    interpret: run in the Pallas interpreter (CPU).

  Returns:
    (out (out_rows, e) in x's dtype, new state (b, e, n) in state's dtype).
  """
  batch, d_inner, d_state = state.shape
  out_rows = out_rows or batch
  block_d = block_d or default_block_d(batch, d_inner, 1)
  whole = lambda a: pl.BlockSpec(a.shape, lambda bi, j: (0,) * a.ndim)
  state_tile = pl.BlockSpec((None, block_d, d_state), lambda bi, j: (bi, j, 0))
  vector = pl.BlockSpec((block_d,), lambda bi, j: (j,))
  kernel = functools.partial(_packed_kernel, batch=batch, out_rows=out_rows, block_d=block_d,
                             dt_rank=dt_rank, n=d_state)
  return pl.pallas_call(
      kernel,
      grid=(batch, d_inner // block_d),
      in_specs=[state_tile, whole(x), whole(dt), whole(x_dbl),
                pl.BlockSpec((None, d_inner, 2), lambda bi, j: (bi, 0, 0)),
                pl.BlockSpec((block_d, d_state), lambda bi, j: (j, 0)), vector, vector],
      out_specs=[pl.BlockSpec((out_rows, d_inner), lambda bi, j: (0, 0)), state_tile],
      out_shape=[jax.ShapeDtypeStruct((out_rows, d_inner), x.dtype),
                 jax.ShapeDtypeStruct(state.shape, state.dtype)],
      input_output_aliases={0: 1},  # the state, updated in place
      compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="selective_state_update",
  )(state, x, dt, x_dbl, xz, A_log, D, dt_bias)
