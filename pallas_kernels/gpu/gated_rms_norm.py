"""Mamba-2's gated, grouped RMSNorm as Pallas GPU kernels (Triton lowering), forward and backward.

The kernel form of ``mamba_jax.ops.norms.gated_rms_norm`` (Mamba-2 §7.1, ``RMSNormGated`` in
``mamba_ssm``). With G(v) the RMSNorm of each group of ``group_size`` consecutive channels,
G(v)_j = v_j · rstd,  rstd = rsqrt(mean_{i in group(j)} v_i² + eps),  silu(z) = z · σ(z):

  norm_before_gate=False:  v = x · silu(z),  y = G(v) · w        (Mamba-2's choice)
  norm_before_gate=True:   v = x,            y = G(v) · w · silu(z)
  z None:                  v = x,            y = G(v) · w

all in float32, y rounded to x's dtype. The backward, with g = silu(z) (1 without z),
g' = σ(z)(1 + z(1 − σ(z))), xhat = v · rstd and mean the mean over the group:

  norm_before_gate=False:  dxhat = dy · w,      dv = rstd · (dxhat − xhat · mean(dxhat xhat)),
                           dx = dv · g,  dz = dv · x · g',      dw = Σ_rows dy · xhat
  norm_before_gate=True:   dxhat = dy · w · g,  dx = rstd · (dxhat − xhat · mean(dxhat xhat)),
                           dz = dy · xhat · w · g',             dw = Σ_rows dy · xhat · g

(dv: d/dv of v · rstd(v) is rstd · (I − xhat xhatᵀ / group_size)).

Leading axes are flattened to rows. The forward runs one program per (block of rows, group),
normalising a (block_rows, padded group) tile and saving rstd (rows, groups) for the backward.
The backward runs about ``BACKWARD_PROGRAMS`` programs split across the groups; each walks a
contiguous range of rows in tiles (a ``fori_loop``), writes dx and dz, and accumulates its share
of dw in float32 registers, stored as one partial row; XLA sums the (programs, d) partials. No
(rows, d) float32 tensor is written.

Triton blocks are powers of two while Mamba-2's groups often are not (130M: d = 1536): a group
is loaded as the next power of two of columns, with the extra columns (and the rows past the
last) masked. The indices are integer arrays, row0 + iota and col0 + iota, not clamped (see
``_tile``), which the interpreter and the GPU handle alike; an out-of-range ``pl.ds`` slice
would read garbage in the interpreter.

Backend: Pallas with the Triton lowering; ``interpret=True`` runs it on CPU.

Shape legend: r rows (the flattened leading axes), d channels, g groups, s = d / g the group
size, bs the padded group (the next power of two >= s), p backward programs per group.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_BLOCK_COLS = 8192  # the largest padded group a program holds (in registers)
TILE_ELEMENTS = 4096  # elements of a (rows, padded group) tile, forward and backward
H100_SMS = 132
BACKWARD_PROGRAMS = 2 * H100_SMS  # backward programs, all groups together
# Pipeline stages of the backward's row loop: 2 lets Triton prefetch the next tile's x, z and dy
# (3 x 4K elements, 24 KiB of shared memory in bf16) while this one is computed, as mamba_ssm's
# row-loop backward gets from Triton's default. The forward has no loop (1).
BACKWARD_NUM_STAGES = 2


def padded_group(group_size: int) -> int:
  """The next power of two >= group_size: the columns one program loads per group."""
  return 1 << max(0, group_size - 1).bit_length()


def block_rows_for(rows: int, block_cols: int) -> int:
  """Rows per tile: a power of two with block_rows · block_cols ≈ TILE_ELEMENTS (4K).

  The kernels are memory bound: a tile of 4K elements gives 8 warps 16 elements per thread per
  tensor (the backward holds about ten such tensors, ~160 of a thread's 255 registers) and
  gives the forward thousands of programs at training sizes (2 × 2048 rows of 2048
  channels: 2048 programs of two rows). Never more than the next power of two >= rows, so a
  decoding step (one row) loads one row.
  """
  block = max(1, TILE_ELEMENTS // block_cols)
  return min(block, padded_group(max(rows, 1)))


def num_warps_for(tile_elements: int) -> int:
  """Warps for a tile: one per 256 elements (8 per thread per tensor at the least), from 1 up
  to 8; a 4K tile gets 8, as Triton's fused-norm tutorial gives a row of 4K columns."""
  return max(1, min(8, tile_elements // 256))


def backward_grid(rows: int, groups: int, tile_rows: int,
                  programs: Optional[int] = None) -> tuple[int, int]:
  """(programs per group p, rows per program) of the backward.

  About ``programs`` (default ``BACKWARD_PROGRAMS``, two per H100 SM) programs in all, so that
  every SM holds two and the dw partials are a small (p, d) array; each program takes a
  contiguous range of rows, a multiple of ``tile_rows``, the last one possibly short.
  """
  target = max(1, -(-(programs or BACKWARD_PROGRAMS) // groups))
  per_program = -(-max(rows, 1) // target)
  per_program = -(-per_program // tile_rows) * tile_rows
  return -(-max(rows, 1) // per_program), per_program


def check_supported(x: jax.Array, z: Optional[jax.Array], weight: jax.Array,
                    group_size: Optional[int]) -> str:
  """'' when the kernels take these shapes and dtypes (group_size None: one group of d), else
  a one-line reason."""
  if x.ndim < 1:
    return "the kernel needs x of rank >= 1, got a rank-0 x"
  if group_size is None:
    group_size = x.shape[-1]
  for name, a in (("x", x), ("z", z), ("weight", weight)):
    if a is not None and jnp.dtype(a.dtype) not in SUPPORTED_DTYPES:
      return f"the kernel takes float32/bfloat16/float16 {name}, got {a.dtype}"
  if group_size < 1 or x.shape[-1] % group_size:
    return f"group_size={group_size} must be positive and divide d={x.shape[-1]}"
  if padded_group(group_size) > MAX_BLOCK_COLS:
    return (f"group_size={group_size} is too large for the kernel (padded to "
            f"{padded_group(group_size)} > {MAX_BLOCK_COLS} columns)")
  return ""


def _check_dtypes(**arrays: Optional[jax.Array]) -> None:
  for name, a in arrays.items():
    if a is not None and jnp.dtype(a.dtype) not in SUPPORTED_DTYPES:
      raise ValueError(f"gated_rms_norm kernels take float32/bfloat16/float16 {name}, got "
                       f"{a.dtype}")


def _tile(row0, tile_rows: int, n_rows: int, col0, block_cols: int, group_size: int):
  """Indices and masks of the tile rows [row0, row0 + tile_rows) × the group's padded columns.

  Returns (rows (tile_rows, 1), cols (1, block_cols), row_ok (tile_rows, 1),
  col_ok (1, block_cols)). The indices are not clamped: masked lanes may point past the last
  row, or into the next group's columns (and past d for the last group). The GPU does not touch
  masked lanes; the interpreter gathers them (the values are replaced by ``other``) and
  scatters them back unchanged or, out of range, not at all. Clamped indices would be wrong in
  the interpreter (a masked lane clamped onto a real one scatters the old value over the new)
  and would hide the columns' contiguity from Triton, which then could not vectorise.
  """
  rows = row0 + lax.broadcasted_iota(jnp.int32, (tile_rows, 1), 0)
  c = lax.broadcasted_iota(jnp.int32, (1, block_cols), 1)
  return rows, col0 + c, rows < n_rows, c < group_size


def _load(ref, rows, cols, mask):
  """ref[rows, cols] (broadcast) in float32, zero where not ``mask``."""
  return pl_triton.load(ref.at[rows, cols], mask=mask, other=0.).astype(jnp.float32)


def _load_weight(w_ref, cols, col_ok):
  """w[cols] (1, block_cols) in float32, zero in the padding."""
  return pl_triton.load(w_ref.at[cols], mask=col_ok, other=0.).astype(jnp.float32)


def _silu_parts(z):
  """(silu(z), silu'(z)) in float32."""
  s = 1.0 / (1.0 + jnp.exp(-z))
  return z * s, s * (1.0 + z * (1.0 - s))


def _forward_kernel(*refs, has_z: bool, norm_before_gate: bool, n_rows: int,
                    group_size: int, block_rows: int, block_cols: int, eps: float,
                    z_offset: int):
  """x_ref, z_ref (r, d), w_ref (d,) -> y_ref (r, d), rstd_ref (r, g); z_ref only with z."""
  if has_z:
    x_ref, z_ref, w_ref, y_ref, rstd_ref = refs
  else:
    (x_ref, w_ref, y_ref, rstd_ref), z_ref = refs, None
  j = pl.program_id(1)
  rows, cols, row_ok, col_ok = _tile(pl.program_id(0) * block_rows, block_rows, n_rows,
                                     j * group_size, block_cols, group_size)
  mask = row_ok & col_ok
  v = _load(x_ref, rows, cols, mask)
  gate = None
  if has_z:
    gate = _silu_parts(_load(z_ref, rows, cols + z_offset, mask))[0]
    if not norm_before_gate:
      v = v * gate
  rstd = lax.rsqrt(jnp.sum(v * v, axis=1, keepdims=True) / group_size + eps)  # (tile rows, 1)
  w = _load_weight(w_ref, cols, col_ok)
  y = v * rstd * w
  if has_z and norm_before_gate:
    y = y * gate
  pl_triton.store(y_ref.at[rows, cols], y.astype(y_ref.dtype), mask=mask)
  pl_triton.store(rstd_ref.at[rows, j], rstd, mask=row_ok)


def _check_columns(name: str, a: jax.Array, offset: int, d: int) -> None:
  if not 0 <= offset <= a.shape[-1] - d:
    raise ValueError(f"{name} columns [{offset}, {offset + d}) are not inside its "
                     f"{a.shape[-1]} columns")


@functools.partial(jax.jit, static_argnames=("group_size", "norm_before_gate", "eps",
                                             "interpret", "z_offset"))
def gated_rms_norm_fwd(x: jax.Array, z: Optional[jax.Array], weight: jax.Array, *,
                       group_size: int, norm_before_gate: bool, eps: float,
                       interpret: bool = False, z_offset: int = 0
                       ) -> tuple[jax.Array, jax.Array]:
  """The forward kernel on flattened rows (validated shapes).

  Args:
    x: (r, d) float32/bfloat16/float16. z: optional (r, d), same dtypes, or (r, d') holding
      the gate in columns [z_offset, z_offset + d) (read in place: e.g. Mamba-2's in_proj
      output). weight: (d,).
    group_size: s, divides d. norm_before_gate: see the module docstring. eps: >= 0.
    interpret: run in the Pallas interpreter (CPU).
    z_offset: the first of z's columns the gate reads.

  Returns:
    (y (r, d) in x's dtype, rstd (r, g) float32).
  """
  _check_dtypes(x=x, z=z, weight=weight)
  n_rows, d = x.shape
  if z is not None:
    _check_columns("z", z, z_offset, d)
  groups = d // group_size
  if n_rows == 0:
    return jnp.zeros_like(x), jnp.zeros((0, groups), jnp.float32)
  block_cols = padded_group(group_size)
  block_rows = block_rows_for(n_rows, block_cols)
  kernel = functools.partial(
      _forward_kernel, has_z=z is not None, norm_before_gate=norm_before_gate, n_rows=n_rows,
      group_size=group_size, block_rows=block_rows, block_cols=block_cols, eps=float(eps),
      z_offset=z_offset)
  args = [x] + ([z] if z is not None else []) + [weight]
  return pl.pallas_call(
      kernel,
      grid=(pl.cdiv(n_rows, block_rows), groups),
      out_shape=[jax.ShapeDtypeStruct((n_rows, d), x.dtype),
                 jax.ShapeDtypeStruct((n_rows, groups), jnp.float32)],
      compiler_params=pl_triton.CompilerParams(
          num_warps=num_warps_for(block_rows * block_cols), num_stages=1),
      interpret=interpret,
      name="gated_rms_norm_fwd",
  )(*args)


def _backward_kernel(*refs, has_z: bool, norm_before_gate: bool, n_rows: int,
                     group_size: int, tile_rows: int, block_cols: int, rows_per_program: int,
                     z_offset: int, dz_offset: int):
  """x_ref, z_ref, dy_ref (r, d), w_ref (d,), rstd_ref (r, g) -> dx_ref, dz_ref (r, d),
  dw_ref (p, d) (this program's partial Σ over its rows); z_ref and dz_ref only with z."""
  if has_z:
    x_ref, z_ref, w_ref, rstd_ref, dy_ref, dx_ref, dz_ref, dw_ref = refs
  else:
    x_ref, w_ref, rstd_ref, dy_ref, dx_ref, dw_ref = refs
    z_ref = dz_ref = None
  p, j = pl.program_id(0), pl.program_id(1)
  col0 = j * group_size
  first_row = p * rows_per_program
  _, cols, _, col_ok = _tile(0, 1, n_rows, col0, block_cols, group_size)
  w = _load_weight(w_ref, cols, col_ok)

  def body(t, acc):
    rows, cols, row_ok, col_ok = _tile(first_row + t * tile_rows, tile_rows, n_rows, col0,
                                       block_cols, group_size)
    mask = row_ok & col_ok
    x = _load(x_ref, rows, cols, mask)
    dy = _load(dy_ref, rows, cols, mask)
    rstd = pl_triton.load(rstd_ref.at[rows, j], mask=row_ok, other=0.)  # (tile rows, 1)
    if has_z:
      zv = _load(z_ref, rows, cols + z_offset, mask)
      gate, dgate = _silu_parts(zv)
    if has_z and not norm_before_gate:
      xhat = x * gate * rstd
      dxhat = dy * w
    else:
      xhat = x * rstd
      dxhat = dy * w * gate if has_z else dy * w
    mean = jnp.sum(dxhat * xhat, axis=1, keepdims=True) / group_size
    dv = rstd * (dxhat - xhat * mean)
    if has_z and not norm_before_gate:
      dx, dz = dv * gate, dv * x * dgate
      acc = acc + dy * xhat
    elif has_z:
      dx, dz = dv, dy * xhat * w * dgate
      acc = acc + dy * xhat * gate
    else:
      dx = dv
      acc = acc + dy * xhat
    pl_triton.store(dx_ref.at[rows, cols], dx.astype(dx_ref.dtype), mask=mask)
    if has_z:
      pl_triton.store(dz_ref.at[rows, cols + dz_offset], dz.astype(dz_ref.dtype), mask=mask)
    return acc

  acc = lax.fori_loop(0, rows_per_program // tile_rows, body,
                      jnp.zeros((tile_rows, block_cols), jnp.float32))
  dw = jnp.sum(acc, axis=0, keepdims=True)  # (1, block_cols)
  pl_triton.store(dw_ref.at[p, cols], dw, mask=col_ok)


@functools.partial(jax.jit, static_argnames=("group_size", "norm_before_gate", "interpret",
                                             "programs", "z_offset", "dz_width", "dz_offset"))
def gated_rms_norm_bwd(x: jax.Array, z: Optional[jax.Array], weight: jax.Array,
                       rstd: jax.Array, dy: jax.Array, *, group_size: int,
                       norm_before_gate: bool, interpret: bool = False,
                       programs: Optional[int] = None, z_offset: int = 0,
                       dz_width: Optional[int] = None, dz_offset: int = 0
                       ) -> tuple[jax.Array, Optional[jax.Array], jax.Array]:
  """The backward kernel on flattened rows (the module docstring's formulas).

  Args:
    x: (r, d), z: optional (r, d), weight: (d,), as given to ``gated_rms_norm_fwd``.
    rstd: (r, g) float32 from ``gated_rms_norm_fwd``.
    dy: (r, d) the cotangent of y (any supported dtype).
    group_size: s. norm_before_gate: as in the forward.
    interpret: run in the Pallas interpreter (CPU).
    programs: about how many programs in all (default ``BACKWARD_PROGRAMS``); fewer gives
      each program more row tiles (the tests use it to exercise the row loop).
    z_offset: as in the forward.
    dz_width, dz_offset: dz is written into columns [dz_offset, dz_offset + d) of an
      (r, dz_width) array (default d, 0) whose other columns the kernel leaves unwritten, for
      the caller to fill (e.g. Mamba-2's in_proj gradient, assembled column block by column
      block).

  Returns:
    (dx (r, d) in x's dtype, dz (r, dz_width) in z's dtype or None, dweight (d,) float32).
  """
  _check_dtypes(x=x, z=z, weight=weight, dy=dy)
  n_rows, d = x.shape
  dz_width = d if dz_width is None else dz_width
  if z is not None:
    _check_columns("z", z, z_offset, d)
    _check_columns("dz", jax.ShapeDtypeStruct((n_rows, dz_width), z.dtype), dz_offset, d)
  groups = d // group_size
  if n_rows == 0:
    return (jnp.zeros_like(x), None if z is None else jnp.zeros((0, dz_width), z.dtype),
            jnp.zeros((d,), jnp.float32))
  block_cols = padded_group(group_size)
  tile_rows = block_rows_for(n_rows, block_cols)
  per_group, rows_per_program = backward_grid(n_rows, groups, tile_rows, programs)
  has_z = z is not None
  kernel = functools.partial(
      _backward_kernel, has_z=has_z, norm_before_gate=norm_before_gate, n_rows=n_rows,
      group_size=group_size, tile_rows=tile_rows, block_cols=block_cols,
      rows_per_program=rows_per_program, z_offset=z_offset, dz_offset=dz_offset)
  args = [x] + ([z] if has_z else []) + [weight, rstd, dy]
  out_shape = [jax.ShapeDtypeStruct((n_rows, d), x.dtype)]
  if has_z:
    out_shape.append(jax.ShapeDtypeStruct((n_rows, dz_width), z.dtype))
  out_shape.append(jax.ShapeDtypeStruct((per_group, d), jnp.float32))
  outs = pl.pallas_call(
      kernel,
      grid=(per_group, groups),
      out_shape=out_shape,
      compiler_params=pl_triton.CompilerParams(
          num_warps=num_warps_for(tile_rows * block_cols), num_stages=BACKWARD_NUM_STAGES),
      interpret=interpret,
      name="gated_rms_norm_bwd",
  )(*args)
  dw = jnp.sum(outs[-1], axis=0)
  return outs[0], outs[1] if has_z else None, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gated_rms_norm(x, z, weight, group_size, norm_before_gate, eps, interpret):
  return _fwd(x, z, weight, group_size, norm_before_gate, eps, interpret)[0]


def _fwd(x, z, weight, group_size, norm_before_gate, eps, interpret):
  d = x.shape[-1]
  y, rstd = gated_rms_norm_fwd(
      x.reshape(-1, d), None if z is None else z.reshape(-1, d), weight,
      group_size=group_size, norm_before_gate=norm_before_gate, eps=eps, interpret=interpret)
  return y.reshape(x.shape), (x, z, weight, rstd)


def _bwd(group_size, norm_before_gate, eps, interpret, residuals, dy):
  del eps  # in rstd
  x, z, weight, rstd = residuals
  d = x.shape[-1]
  dx, dz, dw = gated_rms_norm_bwd(
      x.reshape(-1, d), None if z is None else z.reshape(-1, d), weight, rstd,
      dy.reshape(-1, d), group_size=group_size, norm_before_gate=norm_before_gate,
      interpret=interpret)
  return (dx.reshape(x.shape), None if z is None else dz.reshape(z.shape),
          dw.astype(weight.dtype))


_gated_rms_norm.defvjp(_fwd, _bwd)


def gated_rms_norm_pallas(x: jax.Array, z: Optional[jax.Array], weight: jax.Array, *,
                          group_size: int, norm_before_gate: bool, eps: float,
                          interpret: bool = False) -> jax.Array:
  """Mamba-2's gated grouped RMSNorm (the module docstring) with the Pallas kernels, forward
  and backward (a ``jax.custom_vjp``); validated arguments (``gated_rms_norm``'s checks) that
  ``check_supported`` accepts.

  Args:
    x: (..., d) float32/bfloat16/float16.
    z: optional (..., d) gate, the shape of x.
    weight: (d,).
    group_size: s, divides d (d for one group). norm_before_gate: see above. eps: >= 0.
    interpret: run in the Pallas interpreter (CPU).

  Returns:
    (..., d) in x's dtype. Gradients flow to x, z and weight (each in its own dtype).
  """
  return _gated_rms_norm(x, z, weight, int(group_size), bool(norm_before_gate), float(eps),
                         bool(interpret))
