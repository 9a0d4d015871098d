"""The models' decoding steps through the decoding kernels give the XLA steps' logits and caches.

On a GPU ``impl="auto"`` routes Mamba-2's step through ``ssd_decode_step``'s kernel and
Mamba-1's through ``selective_decode_step``'s conv and SSM kernels. Here the
same routing runs with the kernels in the Pallas interpreter (``resolve_auto_as``), on float32
tiny models, so that the models' wiring of the kernels (argument order, channel layout, state
dtypes) is tested on CPU; the kernels themselves are tested in tests/kernels.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.inference.decode import STEP_KERNEL_OPS, decode_step
from mamba_jax.inference.cache import init_cache
from mamba_jax.nn.lm import MambaLM
from mamba_jax.ops.causal_conv1d import causal_conv1d_update
from mamba_jax.ops.impl import resolve_auto_as
from tests.numerics import assert_close

OPS = STEP_KERNEL_OPS


# Interpreted on CPU: each kind once, bf16 states for two of them (the interpreter is slow on 2
# cores); compiled on a GPU: every kind with both state dtypes.
CASES = [("Mamba1", jnp.bfloat16), ("Mamba2", None), ("hybrid", jnp.bfloat16)]
GPU_CASES = [(kind, dtype) for kind in ("Mamba1", "Mamba2", "hybrid")
             for dtype in (None, jnp.bfloat16)]


@pytest.mark.parametrize("kind, state_dtype, kernel_impl", [
    *[(k, d, "pallas_interpret") for k, d in CASES],
    *[pytest.param(k, d, "pallas", marks=pytest.mark.gpu) for k, d in GPU_CASES]])
def test_kernel_steps_equal_xla_steps(kind, state_dtype, kernel_impl):
  model = MambaLM(MambaConfig.tiny(kind), rngs=nnx.Rngs(0))  # float32
  batch = 2 if kind == "hybrid" else 1  # batch 1: the two-row steps (a second, zero row)
  ids = jax.random.randint(jax.random.key(1), (batch, 6), 0, model.config.vocab_size,
                           jnp.int32)
  cache = init_cache(model, batch, 6, state_dtype=state_dtype)  # six steps from empty
  caches = {"xla": cache, "kernel": cache}
  for t in range(6):
    logits = {}
    for name, impl in (("xla", "xla"), ("kernel", kernel_impl)):
      # decode_step is not jitted: it traces afresh under each choice. Full-precision matmuls:
      # a GPU's default (TF32) would round the two paths' 1e-7 differences up to 1e-3.
      with resolve_auto_as(**{op: impl for op in OPS}), jax.default_matmul_precision("highest"):
        logits[name], caches[name] = decode_step(model, ids[:, t], caches[name])
    assert_close(logits["kernel"], logits["xla"], 1e-5, f"{kind} step {t}")
  for a, b in zip(jax.tree.leaves(caches["kernel"]), jax.tree.leaves(caches["xla"])):
    assert a.dtype == b.dtype
    assert_close(a, b, 1e-5 if a.dtype == jnp.float32 else 1e-2, f"{kind} cache")


def test_resolve_auto_as_scopes_and_validates():
  args = (jnp.ones((1, 8), jnp.float64), jnp.ones((1, 8, 3), jnp.float64),
          jnp.ones((8, 4), jnp.float64))
  with resolve_auto_as(causal_conv1d_update="pallas"):  # the kernel takes no float64...
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
      causal_conv1d_update(*args)
  causal_conv1d_update(*args)  # ... and outside the block "auto" is the XLA form again
  with resolve_auto_as(causal_conv1d_update="triton"):
    with pytest.raises(ValueError, match="resolve_auto_as"):
      causal_conv1d_update(*args)
