"""Runs every form of the two SSM ops on random data and prints their agreement and timing.

The selective scan (Mamba, S6) and SSD (Mamba-2) each have a sequential `lax.scan` oracle and
parallel forms. This script evaluates all of them on the same random inputs, reports each form's
relative error against the oracle (forward and gradient) and its compiled run time on the
default device.

  python scripts/demo_ops.py [--batch=2 --length=1000 --d_inner=256 --d_state=16
                              --heads=8 --head_dim=32 --ssd_state=64 --chunk_size=128]
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.ops.selective_scan import selective_scan
from mamba_jax.ops.ssd import ssd

_BATCH = flags.DEFINE_integer("batch", 2, "batch size")
_LENGTH = flags.DEFINE_integer("length", 1000, "sequence length (need not divide the chunk)")
_D_INNER = flags.DEFINE_integer("d_inner", 256, "selective scan channels")
_D_STATE = flags.DEFINE_integer("d_state", 16, "selective scan state size N")
_HEADS = flags.DEFINE_integer("heads", 8, "SSD heads")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 32, "SSD head dimension P")
_SSD_STATE = flags.DEFINE_integer("ssd_state", 64, "SSD state size N")
_CHUNK = flags.DEFINE_integer("chunk_size", 128, "SSD chunk size")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed repetitions (median reported)")

SCAN_FORMS = ("sequential", "associative", "chunked")
SSD_FORMS = ("sequential", "quadratic", "chunked")


def _median_ms(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return float(np.median(times))


def _rel(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _report(title: str, forms, make_fn, args) -> None:
  """Times forward and forward+backward of each form; errors are against forms[0]."""
  print(f"\n{title}")
  print(f"| form | fwd rel. err | grad rel. err | fwd ms | fwd+bwd ms |")
  print(f"|---|---|---|---|---|")
  ref_y = ref_g = None
  for form in forms:
    fwd = jax.jit(make_fn(form))
    loss = lambda *a, f=fwd: jnp.sum(f(*a).astype(jnp.float32) ** 2)
    grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
    y, g = fwd(*args), grad(*args)
    if ref_y is None:
      ref_y, ref_g = y, g
    err_y = _rel(y, ref_y)
    err_g = max(_rel(a, b) for a, b in zip(g, ref_g))
    print(f"| {form} | {err_y:.1e} | {err_g:.1e} | {_median_ms(fwd, *args):.2f} "
          f"| {_median_ms(grad, *args):.2f} |")


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  b, l, d, n = _BATCH.value, _LENGTH.value, _D_INNER.value, _D_STATE.value
  f32 = lambda *s, scale=1.0: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), float32")

  u, delta, z = f32(b, l, d), f32(b, l, d, scale=0.5), f32(b, l, d)
  A = -jnp.exp(f32(d, n, scale=0.5))
  B, C = f32(b, l, n), f32(b, l, n)
  D, delta_bias = f32(d), f32(d, scale=0.5)

  def scan_fn(form):
    return lambda u, delta, A, B, C: selective_scan(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True, impl=form)

  _report(f"selective_scan (Mamba S6): batch {b}, length {l}, d_inner {d}, d_state {n}",
          SCAN_FORMS, scan_fn, (u, delta, A, B, C))

  h, p, n2 = _HEADS.value, _HEAD_DIM.value, _SSD_STATE.value
  x, dt = f32(b, l, h, p), f32(b, l, h, scale=0.5)
  A2 = -jnp.exp(f32(h, scale=0.5))
  B2, C2 = f32(b, l, 1, n2), f32(b, l, 1, n2)
  D2, dt_bias = f32(h), f32(h, scale=0.5)

  def ssd_fn(form):
    return lambda x, dt, A, B, C: ssd(
        x, dt, A, B, C, chunk_size=_CHUNK.value, D=D2, dt_bias=dt_bias, dt_softplus=True,
        impl=form)

  _report(f"ssd (Mamba-2): batch {b}, length {l}, heads {h} x head_dim {p}, d_state {n2}, "
          f"chunk {_CHUNK.value}", SSD_FORMS, ssd_fn, (x, dt, A2, B2, C2))


if __name__ == "__main__":
  app.run(main)
