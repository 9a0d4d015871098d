"""The public token mask: a padded batch through MambaLM / the mixers equals each row alone.

``MambaLM(ids, attention_mask=m)`` (and ``Block`` / mixer ``mask=``) must give, at every
row's tokens, the logits of that row's tokens alone, and return the state after its last
token, whatever the layout of the pads (left, right, inside). The state is checked by
continuing it with ``MambaLM.step``. Float64 tiny models: tight comparisons (attention takes
its softmax in float32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.nn.attention import Attention
from mamba_jax.nn.lm import MambaLM
from mamba_jax.nn.mamba1 import Mamba1Mixer
from mamba_jax.nn.mamba2 import Mamba2Mixer
from tests.numerics import assert_close

RTOL = {"Mamba1": 1e-10, "Mamba2": 1e-10, "H3": 1e-10, "hybrid": 1e-6, "attention": 1e-6}
LENGTH, STEPS = 12, 2
# Token counts per row (row 0 unpadded; row 2 shorter than the conv window + 1).
N_TOKENS = (12, 7, 2)


def _model(kind: str) -> MambaLM:
  return MambaLM(MambaConfig.tiny(kind), dtype=jnp.float64, param_dtype=jnp.float64,
                 rngs=nnx.Rngs(0))


def _mask(layout: str) -> np.ndarray:
  """(3, LENGTH) 0/1 with N_TOKENS tokens per row in the given layout."""
  t = np.arange(LENGTH)[None, :]
  n = np.array(N_TOKENS)[:, None]
  if layout == "left":
    return (t >= LENGTH - n).astype(np.int32)
  if layout == "right":
    return (t < n).astype(np.int32)
  # "inside": tokens split around pads in the middle of the row (first half, then the rest).
  head = n // 2
  pads = LENGTH - n
  return ((t < head) | (t >= head + pads)).astype(np.int32)


def _ids(shape, vocab: int, seed: int) -> np.ndarray:
  return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32))


# Fast cases cover every mixer kind and every layout; the rest of the grid is slow.
FAST = {("Mamba1", "inside"), ("Mamba2", "right"), ("H3", "left"), ("hybrid", "left"),
        ("hybrid", "right")}
GRID = [pytest.param(k, l, id=f"{k}-{l}",
                     marks=() if (k, l) in FAST else pytest.mark.slow)
        for k in ("Mamba1", "Mamba2", "H3", "hybrid") for l in ("left", "right", "inside")]


@pytest.mark.parametrize("kind,layout", GRID)
def test_padded_batch_equals_rows_alone(kind, layout):
  model = _model(kind)
  vocab = model.config.vocab_size
  mask = _mask(layout)
  tokens = _ids((3, LENGTH), vocab, seed=1)
  padded = np.where(mask == 1, tokens, 5)  # pad ids are arbitrary: they must not matter
  nxt = _ids((3, STEPS), vocab, seed=2)
  max_length = LENGTH + STEPS
  logits, state = model(jnp.asarray(padded), attention_mask=jnp.asarray(mask),
                        return_state=True, max_length=max_length)
  stepped = []
  for t in range(STEPS):
    out, state = model.step(jnp.asarray(nxt[:, t]), state)
    stepped.append(out)
  for r in range(3):
    row = jnp.asarray(tokens[r][mask[r] == 1])[None]
    alone, alone_state = model(row, return_state=True, max_length=max_length)
    assert_close(logits[r][mask[r] == 1], alone[0], RTOL[kind], f"{kind} {layout} row {r}")
    for t in range(STEPS):
      out, alone_state = model.step(jnp.asarray(nxt[r:r + 1, t]), alone_state)
      assert_close(stepped[t][r], out[0], RTOL[kind], f"{kind} {layout} row {r} step {t}")


def test_all_ones_mask_equals_no_mask():
  model = _model("hybrid")
  ids = jnp.asarray(_ids((3, LENGTH), model.config.vocab_size, seed=3))
  ones = jnp.ones((3, LENGTH), jnp.int32)
  assert_close(model(ids, attention_mask=ones), model(ids), RTOL["hybrid"], "all-ones mask")


def _continuation_case(mixer, u, state, mask, rtol, what):
  """mixer(u, initial_state, mask) at tokens == mixer(row tokens, initial_state) per row."""
  y, new = mixer(u, initial_state=state, mask=jnp.asarray(mask), return_state=True)
  np.testing.assert_array_equal(np.asarray(y)[mask == 0], 0.0)
  for r in range(u.shape[0]):
    keep = mask[r] == 1
    row_state = jax.tree.map(lambda a: a[r:r + 1], state)
    y_r, new_r = mixer(u[r:r + 1, keep], initial_state=row_state, return_state=True)
    assert_close(y[r, keep], y_r[0], rtol, f"{what} row {r} output")
    for i, (a, b) in enumerate(zip(jax.tree.leaves(new), jax.tree.leaves(new_r))):
      assert_close(np.asarray(a)[r:r + 1], b, rtol, f"{what} row {r} state leaf {i}")


@pytest.mark.parametrize("cls,layout", [
    pytest.param(Mamba1Mixer, "inside", id="Mamba1-inside"),
    pytest.param(Mamba2Mixer, "left", id="Mamba2-left"),
    pytest.param(Mamba1Mixer, "left", id="Mamba1-left", marks=pytest.mark.slow),
    pytest.param(Mamba2Mixer, "right", id="Mamba2-right", marks=pytest.mark.slow)])
def test_ssm_mixer_mask_continues_a_state(cls, layout):
  """From a non-zero state the tokens see the carried conv history, never the pads."""
  kwargs = dict(d_state=4) if cls is Mamba1Mixer else dict(d_state=8, headdim=16,
                                                           chunk_size=4)
  mixer = cls(16, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **kwargs)
  prefix = jax.random.normal(jax.random.key(1), (3, 5, 16), jnp.float64)
  _, state = mixer(prefix, return_state=True)
  u = jax.random.normal(jax.random.key(2), (3, LENGTH, 16), jnp.float64)
  _continuation_case(mixer, u, state, _mask(layout), 1e-10, f"{cls.__name__} {layout}")


def test_attention_left_padded_continuation():
  """A cached (decoding) call with left pads: the row's sequence starts at its first token."""
  attn = Attention(16, num_heads=2, dtype=jnp.float64, param_dtype=jnp.float64,
                   rngs=nnx.Rngs(0))
  u = jax.random.normal(jax.random.key(2), (3, LENGTH, 16), jnp.float64)
  mask = _mask("left")
  state = attn.init_state(3, LENGTH + 4)
  y, cache = attn(u, initial_state=state, mask=jnp.asarray(mask), return_state=True)
  extra = jax.random.normal(jax.random.key(3), (3, 16), jnp.float64)
  y_next, _ = attn.step(extra, cache)
  for r in range(3):
    keep = mask[r] == 1
    y_r, cache_r = attn(u[r:r + 1, keep], return_state=True, max_length=LENGTH + 4)
    assert_close(y[r, keep], y_r[0], 1e-6, f"attention row {r}")
    assert_close(y_next[r], attn.step(extra[r:r + 1], cache_r)[0][0], 1e-6,
                 f"attention row {r} next step")


def test_mask_errors():
  model = _model("Mamba2")
  ids = jnp.zeros((2, 4), jnp.int32)
  with pytest.raises(ValueError, match="attention_mask must have shape"):
    model(ids, attention_mask=jnp.ones((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="only 0 .pad. and 1"):
    model(ids, attention_mask=jnp.full((2, 4), 2, jnp.int32))
  with pytest.raises(ValueError, match="bool or integer"):
    model(ids, attention_mask=jnp.ones((2, 4), jnp.float32))
  with pytest.raises(ValueError, match="cannot be combined with seq_idx"):
    model(ids, attention_mask=jnp.ones((2, 4), jnp.int32), seq_idx=jnp.zeros((2, 4), jnp.int32))
  attn = Attention(16, num_heads=2, d_conv=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="d_conv=4"):
    attn(jnp.zeros((1, 4, 16)), mask=jnp.ones((1, 4), jnp.int32))
  attn = Attention(16, num_heads=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="left-padded"):
    attn(jnp.zeros((1, 4, 16)), initial_state=attn.init_state(1, 8),
         mask=jnp.asarray([[1, 1, 0, 0]]))
