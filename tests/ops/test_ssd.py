"""Tests for the SSD op (mamba_jax/ops/ssd.py and its forms).

Every fast form (quadratic dual, chunked SSD) is compared, forward and through ``jax.vjp`` with
a random cotangent for every floating input, with the sequential oracle evaluated in float64 on
the same (rounded) inputs. The oracle itself is checked by hand and by running packed segments
separately.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.ssd import ssd
from tests.numerics import assert_close

# Norm-relative tolerances of each form against the float64 oracle, per input dtype.
RTOL = {jnp.float64: 1e-10, jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# The floating arguments of ssd, in the order the vjp differentiates them.
FLOATS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
# Which of them stay float32 when the activations are bf16 (parameters and states).
PARAMS = ("A", "D", "dt_bias", "initial_states")

# name: (batch, length, heads, head_dim, groups, d_state, chunk_size, options). Chunk sizes do
# not divide the lengths, so padding is exercised; every option appears in some case.
CASES = {
    "l1": (1, 1, 2, 4, 1, 3, 16, dict(D="head", z=True)),
    "l63_groups": (2, 63, 4, 3, 2, 5, 16,
                   dict(D="channel", dt_bias=True, dt_softplus=True, initial_states=True)),
    "l257_resets": (1, 257, 4, 4, 1, 4, 64,
                    dict(z=True, dt_bias=True, dt_softplus=True, initial_states=True,
                         seq_idx=True)),
    "l500_limit": (2, 500, 2, 2, 2, 4, 64,
                   dict(D="head", dt_limit=(0.02, 0.4), initial_states=True, seq_idx=True)),
}


def make_inputs(seed, b, l, h, p, g, n, options):
  """float64 numpy inputs for ssd, plus the static keyword options."""
  rng = np.random.default_rng(seed)
  softplus = options.get("dt_softplus", False)
  arrays = dict(
      x=rng.standard_normal((b, l, h, p)),
      # Raw dt: around softplus^-1(0.1) when softplus follows, else already positive.
      dt=rng.normal(-2.0, 1.0, (b, l, h)) if softplus else rng.uniform(0.01, 0.5, (b, l, h)),
      A=-rng.uniform(0.05, 1.5, h),
      B=rng.standard_normal((b, l, g, n)),
      C=rng.standard_normal((b, l, g, n)),
  )
  if options.get("D") == "head":
    arrays["D"] = rng.standard_normal(h)
  if options.get("D") == "channel":
    arrays["D"] = rng.standard_normal((h, p))
  if options.get("z"):
    arrays["z"] = rng.standard_normal((b, l, h, p))
  if options.get("dt_bias"):
    arrays["dt_bias"] = rng.uniform(-0.5, 0.5, h)
  if options.get("initial_states"):
    arrays["initial_states"] = rng.standard_normal((b, h, p, n))
  static = dict(dt_softplus=softplus, dt_limit=options.get("dt_limit", (0.0, float("inf"))))
  seq_idx = None
  if options.get("seq_idx"):
    # Batch 0 starts in segment 0 (the initial state feeds it); batch 1 (if any) starts at 2,
    # so its initial state is ignored. Segment starts include position 1 and a chunk boundary.
    cuts = np.sort(np.concatenate([[1, 64], rng.choice(np.arange(2, l), 3, replace=False)]))
    seq_idx = np.stack([np.searchsorted(cuts, np.arange(l), side="right") + 2 * i
                        for i in range(b)]).astype(np.int32)
  return arrays, static, seq_idx


def cast(arrays, dtype):
  """Rounds the inputs to ``dtype`` (parameters and states to float32 when bf16)."""
  out = {}
  for k, v in arrays.items():
    want = jnp.float32 if (dtype == jnp.bfloat16 and k in PARAMS) else dtype
    out[k] = jnp.asarray(v, want)
  return out


@functools.partial(jax.jit, static_argnames=("names", "impl", "chunk_size", "dt_softplus",
                                             "dt_limit"))
def forward_and_vjp(floats, seq_idx, cotangents, *, names, impl, chunk_size, dt_softplus,
                    dt_limit):
  """(y, final_states) and the vjp of both wrt every floating input, in one compilation."""

  def f(*values):
    kwargs = dict(zip(names, values))
    return ssd(kwargs.pop("x"), kwargs.pop("dt"), kwargs.pop("A"), kwargs.pop("B"),
               kwargs.pop("C"), chunk_size=chunk_size, dt_softplus=dt_softplus,
               dt_limit=dt_limit, seq_idx=seq_idx, return_final_states=True, impl=impl,
               **kwargs)

  outputs, vjp = jax.vjp(f, *floats)
  return outputs, vjp(cotangents)


def run(arrays, static, seq_idx, cotangents, impl, chunk_size):
  names = tuple(k for k in FLOATS if k in arrays)
  seq = None if seq_idx is None else jnp.asarray(seq_idx)
  (y, final), grads = forward_and_vjp(tuple(arrays[k] for k in names), seq, cotangents,
                                      names=names, impl=impl, chunk_size=chunk_size, **static)
  return y, final, dict(zip(names, grads))


@functools.lru_cache(maxsize=None)
def oracle(case, dtype):
  """Inputs rounded to ``dtype``, and the float64 sequential oracle's results on them."""
  b, l, h, p, g, n, chunk, options = CASES[case]
  arrays, static, seq_idx = make_inputs(len(case), b, l, h, p, g, n, options)
  rounded = cast(arrays, dtype)
  rng = np.random.default_rng(7)
  cot_y = np.asarray(jnp.asarray(rng.standard_normal((b, l, h, p)), dtype), np.float64)
  cot_final = rng.standard_normal((b, h, p, n))
  as64 = {k: jnp.asarray(v, jnp.float64) for k, v in rounded.items()}
  expected = run(as64, static, seq_idx, (jnp.asarray(cot_y), jnp.asarray(cot_final)),
                 "sequential", chunk)
  final_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
  cotangents = (jnp.asarray(cot_y, dtype), jnp.asarray(cot_final, final_dtype))
  return rounded, static, seq_idx, cotangents, expected


# Every case and form in float64 (exactness); float32 and bf16 (the casting, preferred element
# types and output dtypes) on a subset, to keep compilations few.
COMBOS = ([(case, impl, jnp.float64) for case in CASES for impl in ("quadratic", "chunked")]
          + [("l500_limit", "chunked", jnp.float32), ("l500_limit", "chunked", jnp.bfloat16),
             ("l63_groups", "chunked", jnp.bfloat16)]
          + [("l257_resets", "quadratic", dtype) for dtype in (jnp.float32, jnp.bfloat16)])


@pytest.mark.parametrize("case,impl,dtype", COMBOS,
                         ids=[f"{c}-{i}-{jnp.dtype(d).name}" for c, i, d in COMBOS])
def test_form_matches_oracle(case, impl, dtype):
  rounded, static, seq_idx, cotangents, (y_ref, final_ref, grads_ref) = oracle(case, dtype)
  chunk = CASES[case][6]
  y, final, grads = run(rounded, static, seq_idx, cotangents, impl, chunk)
  assert y.dtype == dtype
  assert final.dtype == (jnp.float64 if dtype == jnp.float64 else jnp.float32)
  rtol = RTOL[dtype]
  assert_close(y, y_ref, rtol, f"{case} {impl} y")
  assert_close(final, final_ref, rtol, f"{case} {impl} final_states")
  for name, grad in grads.items():
    assert grad.dtype == rounded[name].dtype
    assert_close(grad, grads_ref[name], rtol, f"{case} {impl} d{name}")


def test_oracle_hand_computed():
  # One head, head_dim 2, d_state 2, two steps; dt = 0.5 and A = -2 ln 2 so exp(dt A) = 1/2.
  # t = 0: h = 1/2 · h_init + dt · x_0 ⊗ B_0 with h_init = [[4, 0], [0, 0]], x_0 = [1, 2],
  #        B_0 = [1, 3]:  h = [[2, 0], [0, 0]] + 0.5 · [[1, 3], [2, 6]] = [[2.5, 1.5], [1, 3]]
  #        y_0 = h C_0 with C_0 = [2, 1]:  [2.5·2 + 1.5, 1·2 + 3] = [6.5, 5]
  #        + D x_0 with D = 0.5:  [7, 6]
  # t = 1: x_1 = [2, 0], B_1 = [0, 1], C_1 = [1, 1]:
  #        h = 1/2 · [[2.5, 1.5], [1, 3]] + 0.5 · [[0, 2], [0, 0]] = [[1.25, 1.75], [0.5, 1.5]]
  #        y_1 = [1.25 + 1.75, 0.5 + 1.5] + 0.5 · [2, 0] = [4, 2]
  f64 = jnp.float64
  x = jnp.array([[[[1.0, 2.0]], [[2.0, 0.0]]]], f64)  # (1, 2, 1, 2)
  dt = jnp.full((1, 2, 1), 0.5, f64)
  A = jnp.array([-2.0 * np.log(2.0)], f64)
  B = jnp.array([[[[1.0, 3.0]], [[0.0, 1.0]]]], f64)
  C = jnp.array([[[[2.0, 1.0]], [[1.0, 1.0]]]], f64)
  h_init = jnp.array([[[[4.0, 0.0], [0.0, 0.0]]]], f64)
  y, final = jax.jit(functools.partial(ssd, impl="sequential", return_final_states=True))(
      x, dt, A, B, C, D=jnp.array([0.5], f64), initial_states=h_init)
  np.testing.assert_allclose(y[0, :, 0], [[7.0, 6.0], [4.0, 2.0]], rtol=1e-14)
  np.testing.assert_allclose(final[0, 0], [[1.25, 1.75], [0.5, 1.5]], rtol=1e-14)
  # A reset at t = 1 (seq_idx [0, 1]) drops the state: h = [[0, 1], [0, 0]], y_1 = [1, 0] + [1, 0].
  y, final = jax.jit(functools.partial(ssd, impl="sequential", return_final_states=True))(
      x, dt, A, B, C, D=jnp.array([0.5], f64), initial_states=h_init,
      seq_idx=jnp.array([[0, 1]], jnp.int32))
  np.testing.assert_allclose(y[0, 1, 0], [2.0, 0.0], rtol=1e-14)
  np.testing.assert_allclose(final[0, 0], [[0.0, 1.0], [0.0, 0.0]], rtol=1e-14, atol=1e-15)


def _numpy_recurrence(x, dt, A, B, C, h0):
  """Independent float64 reference: the recurrence step by step in numpy (one sequence).

  x (l, h, p), dt (l, h) processed, A (h,), B, C (l, g, n), h0 (h, p, n) -> y, final state.
  """
  l, h, p = x.shape
  group = np.arange(h) // (h // B.shape[1])
  state = h0.copy()
  y = np.zeros_like(x)
  for t in range(l):
    state = (np.exp(dt[t] * A)[:, None, None] * state
             + (dt[t][:, None] * x[t])[:, :, None] * B[t, group][:, None, :])
    y[t] = np.einsum("hpn,hn->hp", state, C[t, group])
  return y, state


@pytest.mark.parametrize("impl,chunk_size", [("sequential", 0), ("quadratic", 0),
                                             ("chunked", 16)])
def test_seq_idx_equals_separate_segments(impl, chunk_size):
  b, l, h, p, g, n = 2, 100, 4, 3, 2, 4
  rng = np.random.default_rng(3)
  x = rng.standard_normal((b, l, h, p))
  dt = rng.uniform(0.01, 0.3, (b, l, h))
  A = -rng.uniform(0.05, 1.0, h)
  B, C = rng.standard_normal((2, b, l, g, n))
  h0 = rng.standard_normal((b, h, p, n))
  # Row 0 starts in segment 0 (fed by its initial state); row 1 starts in segment 3, so its
  # initial state feeds nothing. Boundaries fall inside and on the edges of 16-chunks.
  bounds = [[0, 30, 80, 100], [0, 16, 17, 100]]
  ids = [[0, 1, 4], [3, 5, 6]]
  seq_idx = np.zeros((b, l), np.int32)
  for row in range(b):
    for k in range(3):
      seq_idx[row, bounds[row][k]:bounds[row][k + 1]] = ids[row][k]
  y, final = jax.jit(functools.partial(ssd, impl=impl, chunk_size=chunk_size or 256,
                                       return_final_states=True))(
      *map(jnp.asarray, (x, dt, A, B, C)), initial_states=jnp.asarray(h0),
      seq_idx=jnp.asarray(seq_idx))
  for row in range(b):
    for k in range(3):
      lo, hi = bounds[row][k], bounds[row][k + 1]
      start = h0[row] if ids[row][k] == 0 else np.zeros((h, p, n))
      y_seg, final_seg = _numpy_recurrence(x[row, lo:hi], dt[row, lo:hi], A, B[row, lo:hi],
                                           C[row, lo:hi], start)
      assert_close(y[row, lo:hi], y_seg, 1e-12, f"row {row} segment {k} y")
    assert_close(final[row], final_seg, 1e-12, f"row {row} final_states")


@functools.partial(jax.jit, static_argnames="chunk_size")
def _forward_and_grads(x, dt, A, B, C, seq_idx, chunk_size):
  f = lambda *args: ssd(*args, chunk_size=chunk_size, seq_idx=seq_idx, impl="chunked")
  y, vjp = jax.vjp(f, x, dt, A, B, C)
  return y, vjp(y)


def test_long_sequence_extreme_decays_stay_finite():
  # 65536 bf16 tokens, dt up to 10 and |A| up to 20 (log-decays down to -200 per step, far
  # below float32's exp range over a chunk), with resets: no NaN or inf anywhere.
  b, l, h, p, g, n = 1, 65536, 2, 2, 1, 2
  rng = np.random.default_rng(5)
  bf16 = jnp.bfloat16
  x = jnp.asarray(rng.standard_normal((b, l, h, p)), bf16)
  dt = jnp.asarray(rng.uniform(0.0, 10.0, (b, l, h)), bf16)
  A = jnp.asarray([-20.0, -0.01], jnp.float32)
  B = jnp.asarray(rng.standard_normal((b, l, g, n)), bf16)
  C = jnp.asarray(rng.standard_normal((b, l, g, n)), bf16)
  seq_idx = jnp.asarray((np.arange(l) // 5000)[None], jnp.int32)
  y, grads = _forward_and_grads(x, dt, A, B, C, seq_idx, 64)
  assert y.dtype == bf16
  for name, value in zip(("y", "dx", "ddt", "dA", "dB", "dC"), (y, *grads)):
    assert np.all(np.isfinite(np.asarray(value, np.float32))), name
  # The fast-decaying head forgets everything but the current token: y_t = dt_t x_t (B_t·C_t).
  expected = (np.asarray(dt, np.float32)[0, :, 0, None] * np.asarray(x, np.float32)[0, :, 0]
              * np.sum(np.asarray(B, np.float32) * np.asarray(C, np.float32), -1)[0, :, 0, None])
  big = np.asarray(dt, np.float32)[0, :, 0] > 2.0  # exp(-20 · 2) ≈ 4e-18: nothing left
  assert_close(np.asarray(y, np.float32)[0, big, 0], expected[big], 2e-2, "fast head")


def test_chunked_memory_stays_linear():
  # batch 2, length 8192, 8 heads x head_dim 64 x d_state 64, float32, default chunk 256.
  # One full (b, l, h, p, n) float32 tensor is 2 GiB; the chunked form must never form one.
  b, l, h, p, n = 2, 8192, 8, 64, 64
  full = b * l * h * p * n * 4
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  args = (spec(b, l, h, p), spec(b, l, h), spec(h), spec(b, l, 1, n), spec(b, l, 1, n))
  f = lambda x, dt, A, B, C: ssd(x, dt, A, B, C, impl="chunked")
  grad = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3, 4))
  residuals = lambda *a: jax.vjp(f, *a)[1]  # what the forward keeps for the backward

  def analysis(fn):
    return jax.jit(fn).lower(*args).compile().memory_analysis()

  forward = analysis(f).temp_size_in_bytes
  kept = analysis(residuals).output_size_in_bytes
  backward = analysis(grad).temp_size_in_bytes
  # Measured on XLA:CPU (jax 0.11.2): forward 0.10, residuals 0.06, forward+backward 0.56 of
  # a full tensor. The backward holds about eight (b, c, h, q, q) tensors at once (mask,
  # weights, their cotangents, layout copies), each q / (p n) = 1/16 of a full tensor.
  assert forward < full / 8, f"forward temporaries {forward / 2**20:.0f} MiB"
  assert kept < full / 8, f"residuals kept for the backward {kept / 2**20:.0f} MiB"
  assert backward < 3 * full / 4, f"forward+backward temporaries {backward / 2**20:.0f} MiB"


def _valid_args():
  b, l, h, p, g, n = 2, 5, 4, 3, 2, 6
  f32 = jnp.float32
  return dict(x=jnp.zeros((b, l, h, p), f32), dt=jnp.ones((b, l, h), f32),
              A=-jnp.ones(h, f32), B=jnp.zeros((b, l, g, n), f32),
              C=jnp.zeros((b, l, g, n), f32))


BAD_INPUTS = {
    "x rank": (dict(x=jnp.zeros((2, 5, 12))), "x must have shape"),
    "x empty": (dict(x=jnp.zeros((2, 0, 4, 3))), "x must have length >= 1"),
    "x integer": (dict(x=jnp.zeros((2, 5, 4, 3), jnp.int32)), "x must have a floating"),
    "dt length": (dict(dt=jnp.ones((2, 6, 4))), "dt must have shape"),
    "dt heads": (dict(dt=jnp.ones((2, 5, 3))), "dt must have shape"),
    "A shape": (dict(A=-jnp.ones(3)), "A must have shape"),
    "A positive": (dict(A=jnp.array([-1.0, 0.5, -1.0, -1.0])), "A must be negative"),
    "B batch": (dict(B=jnp.zeros((1, 5, 2, 6))), "B must have shape"),
    "C d_state": (dict(C=jnp.zeros((2, 5, 2, 5))), "C must have shape"),
    "groups": (dict(B=jnp.zeros((2, 5, 3, 6)), C=jnp.zeros((2, 5, 3, 6))), "groups"),
    "D shape": (dict(D=jnp.ones(3)), "D must have shape"),
    "D channels": (dict(D=jnp.ones((4, 2))), "D must have shape"),
    "D rank": (dict(D=jnp.ones((4, 3, 1))), "D must have shape"),
    "z shape": (dict(z=jnp.zeros((2, 5, 4, 2))), "z must have shape"),
    "dt_bias shape": (dict(dt_bias=jnp.zeros(2)), "dt_bias must have shape"),
    "initial_states": (dict(initial_states=jnp.zeros((2, 4, 3, 5))), "initial_states must"),
    "seq_idx float": (dict(seq_idx=jnp.zeros((2, 5))), "seq_idx must have an integer"),
    "seq_idx shape": (dict(seq_idx=jnp.zeros((2, 4), jnp.int32)), "seq_idx must have shape"),
    "seq_idx decreasing": (dict(seq_idx=jnp.array([[0, 1, 1, 0, 2]] * 2, jnp.int32)),
                           "seq_idx must be nondecreasing"),
    "dt_limit length": (dict(dt_limit=(0.0,)), "dt_limit"),
    "dt_limit order": (dict(dt_limit=(1.0, 0.5)), "dt_limit"),
    "dt_limit type": (dict(dt_limit="none"), "dt_limit"),
    "chunk_size zero": (dict(chunk_size=0), "chunk_size"),
    "chunk_size float": (dict(chunk_size=64.0), "chunk_size"),
    "impl": (dict(impl="fast"), "impl"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise(name):
  change, message = BAD_INPUTS[name]
  args = _valid_args()
  kwargs = {k: v for k, v in change.items() if k not in args}
  args.update({k: v for k, v in change.items() if k in args})
  with pytest.raises(ValueError, match=message):
    ssd(**args, **kwargs)
