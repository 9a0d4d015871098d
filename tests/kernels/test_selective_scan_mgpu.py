"""Mosaic GPU (Hopper) selective-scan (S6) forward against the float64 sequential oracle.

``scan_fwd_mgpu`` (pallas_kernels/gpu/selective_scan_mgpu.py) has ``scan_fwd``'s contract: y,
the final state and the float32 state entering every chunk of ``block_l`` positions (the
backward's residual). Every check compares with ``mamba_jax.ops.selective_scan(...,
impl="sequential")`` in float64 on the same (upcast) inputs: y and the final state; the saved
chunk states (the first, the second, a middle and the last) against the oracle's final states
of the length prefixes; seq_idx (which the oracle lacks) against running each segment alone.

Both the single launch and the split into sequence segments (``scan_fwd_mgpu_segments``: an
end-state launch, an XLA recurrence over the segments, the full launch) are checked.

The backward ``scan_bwd_mgpu`` (pallas_kernels/gpu/selective_scan_mgpu_bwd.py) is checked through
the wrapper: the vjp of ``selective_scan_pallas_gpu(..., backend="mosaic")`` (the Mosaic
forward and the Mosaic backward; ``backend="mosaic_fwd"`` pairs the forward with the
Triton-lowered backward) for every differentiable input (u, delta, A, B, C, D, z, delta_bias,
initial_state) against the vjp of the float64 oracle (of each seq_idx segment scanned alone where
seq_idx is given), with a random cotangent for y and the final state, in one launch and split
into segments (``scan_bwd_mgpu_segments``). On the GPU it is also compared result by result with
the Triton-lowered ``scan_bwd`` on the same residuals.

The GPU class compiles the kernels (sm_90 only) at real sizes (d_inner 2048). Its interpret twin
runs the same kernels in Mosaic GPU's interpreter on CPU with tiny shapes (64 channels per CTA,
so d_inner 64-128), forward and backward each once with the interpreter's race detector on; a
lowering test runs Mosaic GPU's layout inference and lowering of the forward and the backward
for an H100 without a GPU.
"""

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.selective_scan import selective_scan
from pallas_kernels.gpu.selective_scan import selective_scan_pallas_gpu
from pallas_kernels.gpu import selective_scan_mgpu, selective_scan_mgpu_bwd
from pallas_kernels.gpu.selective_scan_args import decay_keep
from pallas_kernels.gpu.selective_scan_bwd import scan_bwd
from pallas_kernels.gpu.selective_scan_fwd import ScanGpuBlockSizes
from pallas_kernels.gpu.selective_scan_mgpu import (scan_fwd_mgpu, scan_fwd_mgpu_segments,
                                                    segment_count)
from pallas_kernels.gpu.selective_scan_mgpu_bwd import (scan_bwd_mgpu, scan_bwd_mgpu_segments,
                                                        sub_rows)
from tests.kernels.test_selective_scan_gpu import (FULL, PLAIN, TOLERANCES, _compare_grads,
                                                   _inputs, _upcast)
from tests.numerics import assert_close


def _on_hopper() -> bool:
  dev = jax.devices()[0]
  return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


def _kernel_args(primals, seq_idx, block_l):
  """The wrapper's preparation: (b, l, g, n) B / C, inputs padded to block_l, float32
  vectors and states, the keep mask of seq_idx."""
  u, delta, A, B, C, D, z, bias, init = primals
  b, l, d = u.shape
  n = A.shape[1]
  pad = -l % block_l
  padded = lambda x: None if x is None else jnp.pad(
      x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  grouped = lambda x: x.reshape(b, l, -1, n)
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  return (padded(u), padded(delta), f32(A), padded(grouped(B)), padded(grouped(C)), f32(D),
          padded(z), f32(bias), f32(init), decay_keep(seq_idx, b, l, l + pad))


def _oracle(primals, softplus, stop=None):
  """(y, final state) of the float64 sequential oracle on the first ``stop`` positions."""
  u, delta, A, B, C, D, z, bias, init = _upcast(primals)
  cut = lambda x: None if x is None else x[:, :stop]
  return selective_scan(cut(u), cut(delta), A, cut(B), cut(C), D, cut(z), bias, softplus, init,
                        True, impl="sequential")


def _segments_oracle(primals, seq_idx):
  """(y, final state) with each seq_idx segment scanned alone (softplus on): a row's first
  segment starts from its initial state only when its ids start at 0 (virtual seq_idx[−1] = 0)."""
  u, delta, A, B, C, D, z, bias, init = _upcast(primals)
  seq = np.asarray(seq_idx)
  outs, finals = [], []
  for row in range(seq.shape[0]):
    bounds = [0] + [t for t in range(1, seq.shape[1]) if seq[row, t] != seq[row, t - 1]]
    bounds.append(seq.shape[1])
    pieces, state = [], None
    for s, e in zip(bounds[:-1], bounds[1:]):
      take = lambda x: None if x is None else x[row:row + 1, s:e]
      h0 = init[row:row + 1] if (s == 0 and seq[row, 0] == 0) else None
      y, state = selective_scan(take(u), take(delta), A, take(B), take(C), D, take(z), bias,
                                True, h0, True, impl="sequential")
      pieces.append(y)
    outs.append(jnp.concatenate(pieces, axis=1))
    finals.append(state)
  return jnp.concatenate(outs), jnp.concatenate(finals)


def _shared_segments_oracle(primals, seq_idx):
  """``_segments_oracle`` for rows whose ids change at the same positions (any ids): one
  batched float64 scan per segment; a row's initial state is used only where its ids start at
  0. Cheaper to compile (with its vjp) than one scan per (row, segment)."""
  u, delta, A, B, C, D, z, bias, init = primals
  seq = np.asarray(seq_idx)
  cuts = [t for t in range(1, seq.shape[1]) if seq[0, t] != seq[0, t - 1]]
  assert all(cuts == [t for t in range(1, seq.shape[1]) if row[t] != row[t - 1]]
             for row in seq), "rows must change ids at the same positions"
  bounds = [0, *cuts, seq.shape[1]]
  use_init = jnp.asarray(seq[:, 0] == 0, init.dtype)[:, None, None]
  pieces, state = [], None
  for s, e in zip(bounds[:-1], bounds[1:]):
    take = lambda x: None if x is None else x[:, s:e]
    y, state = selective_scan(take(u), take(delta), A, take(B), take(C), D, take(z), bias, True,
                              init * use_init if s == 0 else None, True, impl="sequential")
    pieces.append(y)
  return jnp.concatenate(pieces, axis=1), state


class ScanMosaicCases:
  """The checks, shared by the compiled (GPU) and interpreted (CPU) classes below.

  Subclasses set INTERPRET (``scan_fwd_mgpu``'s ``interpret``), SHAPE (b, l, d, n) and
  BLOCK_L (the interval of the saved states; loads come in chunks of up to 32 positions).
  """
  INTERPRET = False
  SHAPE = (2, 1100, 2048, 16)
  BLOCK_L = 64

  def _forward(self, dtype, flags, seed, *, shape=None, block_l=None, softplus=True,
               seq_idx=None, interpret=None, segments=None):
    """The kernel's (inputs, y, final state, saved states); ``segments`` None lets
    ``scan_fwd_mgpu`` choose, an int runs ``scan_fwd_mgpu_segments`` with that many."""
    b, l, d, n = shape or self.SHAPE
    block_l = block_l or self.BLOCK_L
    primals = _inputs(jax.random.key(seed), dtype, b, l, d, n, **flags)
    kwargs = dict(length=l, delta_softplus=softplus, save_states=True,
                  blocks=ScanGpuBlockSizes(block_l=block_l, sub_l=block_l // 4),
                  interpret=self.INTERPRET if interpret is None else interpret)
    args = _kernel_args(primals, seq_idx, block_l)
    if segments is None:
      y, final, states = scan_fwd_mgpu(*args, **kwargs)
    else:
      y, final, states = scan_fwd_mgpu_segments(*args, segments=segments, **kwargs)
    assert y.dtype == dtype and y.shape == (b, -(-l // block_l) * block_l, d)
    assert final.dtype == jnp.float32 and final.shape == (b, d, n)
    assert states.dtype == jnp.float32 and states.shape == (b, -(-l // block_l), d, n)
    return primals, y[:, :l], final, states

  def _compare(self, dtype, flags, seed, *, shape=None, block_l=None, softplus=True,
               segments=None):
    """y, the final state and saved chunk states against the float64 oracle."""
    primals, y, final, states = self._forward(dtype, flags, seed, shape=shape,
                                              block_l=block_l, softplus=softplus,
                                              segments=segments)
    name = jnp.dtype(dtype).name
    tol = TOLERANCES[dtype]
    block_l = block_l or self.BLOCK_L
    chunks = states.shape[1]
    checked = sorted({1, 2, chunks // 2, chunks - 1} & set(range(1, chunks)))

    @jax.jit
    def oracle(primals):   # one program: y, the final state, the prefixes' final states
      return (*_oracle(primals, softplus),
              [_oracle(primals, softplus, stop=k * block_l)[1] for k in checked])

    y_ref, final_ref, prefix_finals = oracle(primals)
    assert_close(y, y_ref, tol, f"{name} y")
    assert_close(final, final_ref, tol, f"{name} final state")
    init = primals[-1]
    first = jnp.zeros_like(final) if init is None else init
    assert_close(states[:, 0], first, 0.0, f"{name} state entering chunk 0")
    for k, want in zip(checked, prefix_finals):
      assert_close(states[:, k], want, tol, f"{name} state entering chunk {k}")

  def _compare_seq_idx(self, seq_idx, *, shape, interpret=None, segments=None):
    """float32, all options, packed rows against each segment scanned alone."""
    primals, y, final, _ = self._forward(jnp.float32, FULL, 5, shape=shape,
                                         seq_idx=jnp.asarray(seq_idx), interpret=interpret,
                                         segments=segments)
    y_ref, final_ref = jax.jit(lambda p: _segments_oracle(p, seq_idx))(primals)
    assert_close(y, y_ref, TOLERANCES[jnp.float32], "seq_idx y")
    assert_close(final, final_ref, TOLERANCES[jnp.float32], "seq_idx final state")

  def _compare_vjp(self, dtype, flags, seed, *, shape, block_l=None, sub_l=None,
                   softplus=True, seq_idx=None, interpret=None, backend="mosaic"):
    """selective_scan_pallas_gpu(backend=...) ("mosaic": the Mosaic GPU forward and
    backward; "mosaic_fwd": with the Triton-lowered backward): y, the final state and the vjp of
    every input against the float64 oracle's (with ``seq_idx``, whose rows must change ids at
    the same positions: each segment scanned alone, softplus on).
    """
    b, l, d, n = shape
    block_l = block_l or self.BLOCK_L
    blocks = ScanGpuBlockSizes(block_l=block_l, sub_l=sub_l or block_l // 4)
    primals = _inputs(jax.random.key(seed), dtype, b, l, d, n, **flags)
    seq = None if seq_idx is None else jnp.asarray(seq_idx)

    def kernel(*args):
      return selective_scan_pallas_gpu(
          *args[:8], softplus, args[8], seq, True, blocks=blocks, backend=backend,
          interpret=self.INTERPRET if interpret is None else interpret)

    if seq_idx is None:
      oracle = lambda *args: selective_scan(*args[:8], softplus, args[8], True,
                                            impl="sequential")
    else:
      oracle = lambda *args: _shared_segments_oracle(args, seq_idx)
    out, vjp = jax.vjp(kernel, *primals)
    want, oracle_vjp = jax.vjp(jax.jit(oracle), *_upcast(primals))
    name = jnp.dtype(dtype).name
    assert out[0].dtype == dtype and out[0].shape == (b, l, d)
    for what, got, expected in zip(("y", "final_state"), out, want):
      assert_close(got, expected, TOLERANCES[dtype], f"{name} {what}")
    _compare_grads(vjp, oracle_vjp, out, primals, dtype, seed + 1, f"{backend} vjp")

  def _compare_bwd_kernels(self, shape, blocks, *, flags=FULL, segments=None, interpret=None):
    """scan_bwd_mgpu (``segments`` None: its own choice; an int: scan_bwd_mgpu_segments with
    that many) against the Triton-lowered scan_bwd on the same residuals (float32, every
    option, a seq_idx reset at l / 3): every result to float32 rounding, dB / dC after the
    wrapper's reduction over each group's channel blocks, dA / dD / dbias summed over rows."""
    b, l, d, n = shape
    primals = _inputs(jax.random.key(13), jnp.float32, b, l, d, n, **flags)
    seq_idx = jnp.asarray(np.arange(l) >= l // 3, jnp.int32)[None].repeat(b, 0)
    args = _kernel_args(primals, seq_idx, blocks.block_l)
    u, delta, a, B, C, D, z, bias, init, keep = args
    interpret = self.INTERPRET if interpret is None else interpret
    y, final, states = scan_fwd_mgpu(*args, length=l, delta_softplus=True, save_states=True,
                                     blocks=blocks, interpret=interpret)
    valid = (jnp.arange(y.shape[1]) < l)[None, :, None]
    dout = jnp.where(valid, jax.random.normal(jax.random.key(14), y.shape, jnp.float32), 0.0)
    dfinal = jax.random.normal(jax.random.key(15), final.shape, jnp.float32)
    residuals = (u, delta, a, B, C, D, z, bias, keep, states, dout, dfinal)
    kwargs = dict(length=l, delta_softplus=True, blocks=blocks, interpret=interpret)
    if segments is None:
      got = scan_bwd_mgpu(*residuals, **kwargs)
    else:
      got = scan_bwd_mgpu_segments(*residuals, segments=segments, **kwargs)
    want = scan_bwd(*residuals, **dict(kwargs, interpret=bool(interpret)))
    groups = B.shape[2]
    for name, x, x_ref in zip(("du", "ddelta", "dz", "dB", "dC", "dA", "dD", "ddelta_bias",
                               "dinitial_state"), got, want):
      if name in ("dB", "dC"):
        x = x.reshape(*x.shape[:2], groups, -1, n).sum(3)
        x_ref = x_ref.reshape(*x_ref.shape[:2], groups, -1, n).sum(3)
      assert x.shape == x_ref.shape and x.dtype == x_ref.dtype, name
      if name in ("dA", "dD", "ddelta_bias"):
        x, x_ref = x.sum(0), x_ref.sum(0)
      assert_close(x, x_ref, 1e-5, f"mosaic vs triton backward {name}")

  def test_full_float32(self):
    """Groups 2, D, z, delta_bias + softplus, initial state; a tail after the last chunk."""
    self._compare(jnp.float32, FULL, 0)

  def test_full_bfloat16(self):
    self._compare(jnp.bfloat16, FULL, 1)

  def test_plain_float16(self):
    """Batch 1, 3-D B / C, no D / z / bias / softplus / initial state."""
    _, l, d, n = self.SHAPE
    self._compare(jnp.float16, PLAIN, 2, shape=(1, l, d, n), softplus=False)

  def test_rejects_unsupported(self):
    """Sizes outside the kernel raise ValueError naming the Triton fallback."""
    for d, n, block_l, match in [
        (96, 16, 32, "d_inner / groups = 96.*backend=\"triton\""),
        (128, 4, 32, "d_state=4 must be a multiple of 8.*backend=\"triton\""),
        (64, 16, 4, "block_l=4 must be a multiple of 8.*backend=\"triton\""),
        (64, 512, 32, "shared memory.*backend=\"triton\""),
    ]:
      seq = jnp.zeros((1, 64, d), jnp.float32)
      bc = jnp.zeros((1, 64, 1, n), jnp.float32)
      with pytest.raises(ValueError, match=match):
        scan_fwd_mgpu(seq, seq, -jnp.ones((d, n), jnp.float32), bc, bc, None, None, None, None,
                      None, length=64, delta_softplus=False, save_states=True,
                      blocks=ScanGpuBlockSizes(block_l=block_l, sub_l=4),
                      interpret=self.INTERPRET)
    u = jnp.zeros((1, 16, 96), jnp.float32)
    a = -jnp.ones((96, 16), jnp.float32)
    bc = jnp.zeros((1, 16, 16), jnp.float32)
    with pytest.raises(ValueError, match="d_inner / groups = 96.*backend=\"triton\""):
      selective_scan_pallas_gpu(u, u, a, bc, bc, interpret=self.INTERPRET, backend="mosaic")
    with pytest.raises(ValueError, match="backend='cuda' must be None"):
      selective_scan_pallas_gpu(u, u, a, bc, bc, interpret=self.INTERPRET, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="Mosaic GPU's TMA / wgmma layouts need sm_90")
class TestScanMosaicGPU(ScanMosaicCases):
  """The compiled kernel on a Hopper GPU at real sizes (d_inner 2048, lengths with a tail)."""
  STATE_SIZES_SHAPE = (2, 300, 1024)
  LONG_SHAPE = (1, 8165, 2048, 16)

  def test_seq_idx_matches_separate_segments(self):
    """Row 0: two segments; row 1: ids start at 1 (its initial state is unused), then a
    short last segment."""
    _, l, d, n = self.SHAPE
    seq_idx = np.zeros((2, l), np.int32)
    seq_idx[0, l // 2:] = 1
    seq_idx[1, :] = 1
    seq_idx[1, l - l // 3:] = 2
    self._compare_seq_idx(seq_idx, shape=(2, l, d, n))

  @pytest.mark.parametrize("n", [32, 64])
  def test_state_sizes_bfloat16(self, n):
    self._compare(jnp.bfloat16, FULL, 3, shape=(*self.STATE_SIZES_SHAPE, n))

  @pytest.mark.parametrize("segments", [None, 1], ids=["auto", "one_launch"])
  def test_long_sequence_bfloat16(self, segments):
    """Batch 1, l = 8165 (padded 8192): 32 CTAs of 64 channels, which scan_fwd_mgpu splits
    into 16 segments (two launches); also the single launch."""
    b, l, d, _ = self.LONG_SHAPE
    assert segment_count(b, d, -(-l // self.BLOCK_L) * self.BLOCK_L, self.BLOCK_L) > 1
    self._compare(jnp.bfloat16, FULL, 8, shape=self.LONG_SHAPE, segments=segments)

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
  def test_vjp_full(self, dtype):
    """The Mosaic forward and backward: every option, groups 2, l = 1100 (a tail after the
    last chunk of 64), d_inner 2048."""
    self._compare_vjp(dtype, FULL, 4, shape=self.SHAPE)

  def test_vjp_plain_float16(self):
    """Batch 1, 3-D B / C, no D / z / bias / softplus / initial state."""
    _, l, d, n = self.SHAPE
    self._compare_vjp(jnp.float16, PLAIN, 9, shape=(1, l, d, n), softplus=False)

  def test_vjp_mosaic_forward_triton_backward(self):
    """backend="mosaic_fwd": the Mosaic forward with the Triton-lowered backward, every option."""
    self._compare_vjp(jnp.bfloat16, FULL, 10, shape=self.SHAPE, backend="mosaic_fwd")

  def test_vjp_seq_idx(self):
    """Packed rows against each segment scanned alone, forward and every gradient: resets
    inside a chunk (l / 3) and at a chunk bound (640); row 1's ids start at 1 (a zero
    initial-state gradient)."""
    _, l, d, n = self.SHAPE
    seq_idx = np.zeros((2, l), np.int32)
    seq_idx[:, l // 3:] = 1
    seq_idx[:, 640:] = 2
    seq_idx[1] += 1
    self._compare_vjp(jnp.float32, FULL, 10, shape=(2, l, d, n), seq_idx=seq_idx)

  def test_bwd_matches_triton_kernel(self):
    """scan_bwd_mgpu and the Triton-lowered scan_bwd on the same residuals (this forward's, with
    seq_idx, every option, float32): every result equal to float32 rounding (dB / dC after
    the wrapper's reduction over each group's channel blocks). Tells a backward bug from a
    forward one when a vjp test fails."""
    self._compare_bwd_kernels(self.SHAPE, ScanGpuBlockSizes(block_l=self.BLOCK_L))

  def test_bwd_segments_match_triton_kernel(self):
    """Batch 1, l = 8165: scan_bwd_mgpu splits the sequence into 16 segments (the adjoint
    launch, the XLA recurrence, the full launch); against the Triton-lowered scan_bwd."""
    b, l, d, n = self.LONG_SHAPE
    assert segment_count(b, d, -(-l // self.BLOCK_L) * self.BLOCK_L, self.BLOCK_L) == 16
    self._compare_bwd_kernels(self.LONG_SHAPE, ScanGpuBlockSizes(block_l=self.BLOCK_L))

  def test_vjp_long_sequence_bfloat16(self):
    """Batch 1, l = 8165: the forward and the backward in 16 segments (two launches each)."""
    self._compare_vjp(jnp.bfloat16, FULL, 11, shape=self.LONG_SHAPE)

  def test_vjp_state_size_32_bfloat16(self):
    """d_state 32 with block_l = 32 (at block_l = 64 the backward's buffers exceed shared
    memory): sub-chunks of sub_rows(32, 32, 8) = 4 positions."""
    assert sub_rows(32, 32, 8) == 4
    self._compare_vjp(jnp.bfloat16, FULL, 12, shape=(*self.STATE_SIZES_SHAPE, 32), block_l=32)


class TestScanMosaicInterpret(ScanMosaicCases):
  """The same kernel in Mosaic GPU's interpreter on CPU: d_inner 128 (two channel blocks, one
  per group); float32 / float16: l = 45, block_l = 16 (three load chunks, the last one partly
  padding); bfloat16: batch 1, l = 75, block_l = 64 (two load chunks of 32 per saved state)."""
  INTERPRET = True
  SHAPE = (2, 45, 128, 16)
  BLOCK_L = 16

  def test_full_bfloat16(self):
    """One group, d_inner 64 (one CTA per row)."""
    self._compare(jnp.bfloat16, dict(FULL, groups=1), 1, shape=(1, 75, 64, 16), block_l=64)

  def test_plain_float16(self):
    """Batch 1, 3-D B / C, no D / z / bias / softplus / initial state; the sequence split into
    3 segments of 16 (``scan_fwd_mgpu_segments``: two launches and the XLA combination)."""
    _, l, d, n = self.SHAPE
    self._compare(jnp.float16, PLAIN, 2, shape=(1, l, d, n), softplus=False, segments=3)

  def test_seq_idx_matches_separate_segments_no_races(self):
    """Packed rows against separate segments, split into 3 kernel segments (resets inside and
    at the segment bounds: keep products), under the interpreter's race detector (TMA loads /
    stores against the threads' reads and writes of the same buffers)."""
    l = 40
    seq_idx = np.zeros((2, l), np.int32)
    seq_idx[0, 5:] = 1
    seq_idx[0, 16:] = 2
    seq_idx[1, :] = 1
    seq_idx[1, l - 9:] = 2
    params = plgpu.InterpretGPUParams(detect_races=True)
    self._compare_seq_idx(seq_idx, shape=(2, l, 128, 16), interpret=params, segments=3)
    assert not gpu_callbacks.get_races().races_found

  def test_vjp_seq_idx_segments_float32_no_races(self, monkeypatch):
    """Mosaic forward and backward, float32: groups 2 (two CTAs, one per group), D, z,
    delta_bias + softplus, initial state, l = 29 (two chunks of 16, the last one mostly
    padding; sub-chunks of 4: two levels of recomputation) and seq_idx with a reset inside the
    first chunk (11; row 1's ids start at 1: a zero initial-state gradient), against each
    segment scanned alone, under the interpreter's race detector (TMA loads / stores against
    the threads' reads and writes). Both kernels split each sequence into 2 segments of 16
    (``segment_count`` patched: sequences shorter than 2 · ``MIN_SEGMENT`` are not split
    otherwise): the forward's end-state and full launches, the backward's adjoint and full
    launches (``scan_bwd_mgpu_segments``). No reset in segment 1, so both terms of the
    cotangent leaving segment 0, P_1 ⊙ G_1 + E_1, are nonzero."""
    l = 29
    assert sub_rows(self.BLOCK_L, 16, self.BLOCK_L // 4) == 4
    chosen = set()
    for module in (selective_scan_mgpu, selective_scan_mgpu_bwd):
      def two_segments(*args, name=module.__name__):
        chosen.add(name)
        return 2
      monkeypatch.setattr(module, "segment_count", two_segments)
    seq_idx = np.zeros((2, l), np.int32)
    seq_idx[:, 11:] = 1
    seq_idx[1] += 1
    params = plgpu.InterpretGPUParams(detect_races=True)
    self._compare_vjp(jnp.float32, FULL, 20, shape=(2, l, 128, 16), seq_idx=seq_idx,
                      interpret=params)
    assert chosen == {selective_scan_mgpu.__name__, selective_scan_mgpu_bwd.__name__}, chosen
    assert not gpu_callbacks.get_races().races_found

  def test_vjp_plain_bfloat16(self):
    """bf16 inputs and gradients; batch 1, 3-D B / C, no D / z / bias / softplus / initial
    state; block_l = sub = 8 (one sub-chunk per chunk: no sub-chunk states in shared memory),
    l = 21."""
    assert sub_rows(8, 16, 8) == 8
    self._compare_vjp(jnp.bfloat16, PLAIN, 22, shape=(1, 21, 64, 16), softplus=False,
                      block_l=8, sub_l=8)

  def test_wrapper_backend_mosaic(self):
    """selective_scan_pallas_gpu(backend="mosaic") runs this forward (one launch, with a
    seq_idx reset): its outputs equal the kernel's, and equal the default (Triton-lowered)
    forward's to float32 rounding."""
    b, l, d, n = 1, 21, 64, 16
    primals = _inputs(jax.random.key(6), jnp.float32, b, l, d, n, **dict(FULL, groups=1))
    seq_idx = jnp.asarray(np.arange(l) >= 11, jnp.int32)[None]
    blocks = ScanGpuBlockSizes(block_d=32, block_l=8, sub_l=4)
    run = lambda backend: selective_scan_pallas_gpu(
        *primals[:8], True, primals[8], seq_idx, True, blocks=blocks, interpret=True,
        backend=backend)
    y, final = run("mosaic")
    y_k, final_k, _ = scan_fwd_mgpu(*_kernel_args(primals, seq_idx, 8), length=l,
                                    delta_softplus=True, save_states=True, blocks=blocks,
                                    interpret=True)
    np.testing.assert_array_equal(y, y_k[:, :l])
    np.testing.assert_array_equal(final, final_k)
    y_t, final_t = run(None)
    assert_close(y, y_t, 1e-6, "mosaic vs triton y")
    assert_close(final, final_t, 1e-6, "mosaic vs triton final state")


def test_segment_count():
  """Sequences are split only while the grid is below TARGET_CTAS, into whole block_l chunks
  of at least MIN_SEGMENT positions."""
  assert segment_count(64, 2048, 1024, 64) == 1      # 2048 CTAs
  assert segment_count(1, 2048, 65536, 64) == 16     # 32 CTAs -> 512
  assert segment_count(1, 2048, 320, 64) == 1        # 5 chunks of 64
  assert segment_count(1, 2048, 1024, 64) == 4       # segments of 256 positions


def test_keep_slots_are_tma_aligned():
  """Every ring slot of keep (forward: load chunks of up to LOAD_ROWS positions; backward:
  block_l) holds its rows and starts 128 bytes after the previous one: a TMA target must be
  128-byte aligned (16 floats per slot misaligned every other slot on the GPU)."""
  for rows in (8, 16, 32, 64, 256):
    slot = selective_scan_mgpu.keep_slot(rows)
    assert slot >= rows and slot * 4 % 128 == 0, (rows, slot)


def test_bwd_rejects_unsupported():
  """Sizes outside the backward raise ValueError naming the Triton fallback (before any kernel
  runs): block_l above one TMA box, buffers beyond shared memory, the forward's limits."""
  for d, n, block_l, match in [
      (64, 16, 512, "block_l=512 must be a multiple of 8 and at most 256.*backend=\"triton\""),
      (64, 64, 64, "shared memory.*smaller block_l.*backend=\"triton\""),
      (96, 16, 64, "d_inner / groups = 96.*backend=\"triton\""),
  ]:
    seq = jnp.zeros((1, block_l, d), jnp.float32)
    bc = jnp.zeros((1, block_l, 1, n), jnp.float32)
    state = jnp.zeros((1, d, n), jnp.float32)
    with pytest.raises(ValueError, match=match):
      scan_bwd_mgpu(seq, seq, -jnp.ones((d, n), jnp.float32), bc, bc, None, None, None, None,
                    state[:, None], seq, state, length=block_l, delta_softplus=False,
                    blocks=ScanGpuBlockSizes(block_l=block_l, sub_l=block_l // 4),
                    interpret=True)


def test_lowers_for_hopper():
  """Mosaic GPU's layout inference and lowering for an H100 (no GPU needed) of the gradient of
  selective_scan_pallas_gpu(backend="mosaic"): bf16 with every option (seq_idx, D, z, bias +
  softplus, initial state, groups 2), batch 1 of l = 500 (padded 512), which both the forward
  and the backward split into 2 segments: four Mosaic GPU kernels (the forward's end-state
  launch without y and its full launch saving the states every two load chunks, the backward's
  adjoint and full launches) and no Triton one, within Hopper's shared memory (checked by the
  lowering). Backward sub-chunks of 4 positions (the default 8 unrolls twice the code: the
  same operations, twice the lowering time; the GPU class compiles the default blocks)."""
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=1,
                                       platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  b, l, d, n = 1, 500, 256, 16
  assert segment_count(b, d, 512, 64) == 2
  primals = _inputs(jax.random.key(0), jnp.bfloat16, b, l, d, n, **FULL)
  seq_idx = jnp.zeros((b, l), jnp.int32)

  def loss(*args):
    y, final = selective_scan_pallas_gpu(*args[:8], True, args[8], seq_idx, True,
                                         blocks=ScanGpuBlockSizes(block_l=64, sub_l=4),
                                         backend="mosaic")
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final)

  with jax.sharding.use_abstract_mesh(mesh):
    lowered = jax.jit(jax.grad(loss, argnums=tuple(range(9)))).trace(*primals).lower(
        lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count("custom_call @mosaic_gpu") == 4
  assert "xla.gpu.triton" not in text
