"""generate() against independent references: greedy == argmax of the full forward re-run on
the growing sequence; padded batches (left and right) == each prompt alone; EOS per row;
sampling determinism; one compilation per shape; a tiny HF Mamba checkpoint."""

import functools
import inspect
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mamba_jax
from mamba_jax.config import MambaConfig
from mamba_jax.convert import load_pretrained
from mamba_jax.convert.hf_layout import read_safetensors
from mamba_jax.inference.cache import abstract_model, init_cache
from mamba_jax.inference.decode import TRACE_COUNTS, _decode
from mamba_jax.inference.generate import generate, jit_prefill
from mamba_jax.inference.sampling import SamplingParams
from mamba_jax.nn.lm import MambaLM

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
KINDS = ("Mamba1", "Mamba2", "hybrid")
LENGTH, NEW = 9, 4
N_TOKENS = (9, 5)  # tokens per row of the padded batches


def _model(kind: str, dtype=jnp.float64) -> MambaLM:
  return MambaLM(MambaConfig.tiny(kind), dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))


def greedy_by_full_forward(model: MambaLM, ids: jax.Array, new: int) -> np.ndarray:
  """The reference: append argmax of the full forward's logits at the last token, new times.

  The forward runs on a fixed (b, l + new) buffer whose tail is not yet filled: the model is
  causal, so the logits at position t depend on tokens ≤ t only (one compilation).
  """
  vocab, length = model.config.vocab_size, ids.shape[1]
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
  buffer = np.zeros((ids.shape[0], length + new), np.int32)
  buffer[:, :length] = np.asarray(ids)
  for i in range(new):
    logits = forward(state, jnp.asarray(buffer))[:, length + i - 1, :vocab]
    buffer[:, length + i] = np.asarray(jnp.argmax(logits, axis=-1))
  return buffer


@functools.cache
def _runs(kind: str) -> dict:
  """Everything the per-kind tests compare, computed once (compilation dominates)."""
  model = _model(kind)
  ids = jax.random.randint(jax.random.key(1), (2, LENGTH), 0, model.config.vocab_size,
                           jnp.int32)
  prompts = [ids[r:r + 1, :n] for r, n in enumerate(N_TOKENS)]
  left = np.full((2, LENGTH), 3, np.int32)  # pad id 3: an ordinary token, must not matter
  right = np.full((2, LENGTH), 3, np.int32)
  left_mask = np.zeros((2, LENGTH), np.int32)
  for r, n in enumerate(N_TOKENS):
    left[r, LENGTH - n:] = prompts[r][0]
    right[r, :n] = prompts[r][0]
    left_mask[r, LENGTH - n:] = 1
  return dict(
      model=model, prompts=prompts,
      alone=[np.asarray(generate(model, p, NEW)) for p in prompts],
      left=np.asarray(generate(model, jnp.asarray(left), NEW, attention_mask=left_mask)),
      right=np.asarray(generate(model, jnp.asarray(right), NEW,
                                attention_mask=left_mask[:, ::-1].copy())))


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_equals_argmax_of_repeated_full_forward(kind):
  runs = _runs(kind)  # row 0's prompt; the padded-batch tests extend this to row 1
  np.testing.assert_array_equal(
      runs["alone"][0], greedy_by_full_forward(runs["model"], runs["prompts"][0], NEW))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_prompt_alone(kind, side):
  runs = _runs(kind)
  out = runs[side]
  assert out.shape == (2, LENGTH + NEW)
  for r, n in enumerate(N_TOKENS):
    alone = runs["alone"][r][0]  # (n + NEW,)
    if side == "left":  # pads, prompt, new tokens
      np.testing.assert_array_equal(out[r, LENGTH - n:], alone)
      assert np.all(out[r, :LENGTH - n] == 3)
    else:  # prompt, new tokens, then the row's pads
      np.testing.assert_array_equal(out[r, :n + NEW], alone)
      assert np.all(out[r, n + NEW:] == 3)


def test_eos_stops_each_row_and_fills_with_eos():
  runs = _runs("Mamba2")
  model, prompt = runs["model"], runs["prompts"][0]
  greedy = runs["alone"][0]
  eos = int(greedy[0, N_TOKENS[0] + 1])  # the second new token of row 0
  batch = jnp.concatenate([prompt, prompt[:, ::-1]], axis=0)
  out = np.asarray(generate(model, batch, NEW, eos_id=eos))
  new0 = greedy[0, N_TOKENS[0]:]
  stop = int(np.flatnonzero(new0 == eos)[0])
  expected0 = np.concatenate([new0[:stop + 1], np.full(NEW - stop - 1, eos)])
  np.testing.assert_array_equal(out[0, LENGTH:], expected0)
  reference1 = greedy_by_full_forward(model, batch[1:], NEW)[0, LENGTH:]
  hit = np.flatnonzero(reference1 == eos)
  if hit.size:
    reference1[hit[0] + 1:] = eos
  np.testing.assert_array_equal(out[1, LENGTH:], reference1)


def test_sampling_is_deterministic_and_top_k_1_is_greedy():
  runs = _runs("Mamba2")
  model, prompt, greedy = runs["model"], runs["prompts"][0], runs["alone"][0]
  kwargs = dict(temperature=0.8, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
  a = generate(model, prompt, NEW, key=jax.random.key(7), **kwargs)
  b = generate(model, prompt, NEW, key=jax.random.key(7), **kwargs)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  top1 = generate(model, prompt, NEW, temperature=1.5, top_k=1, key=jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(top1), greedy)


def test_bf16_state_dtype_generates_the_float32_state_tokens():
  """generate(state_dtype=bfloat16): the prefill's cache holds bf16 SSM states, the decoding
  loop carries them, and the greedy tokens are the full-precision states' (this prompt's
  top-2 logit gaps are ≥ 3e-3, bf16 states move the logits by ~1e-5: test_prefill.py)."""
  runs = _runs("Mamba2")
  model, prompt, greedy = runs["model"], runs["prompts"][0], runs["alone"][0]
  out = generate(model, prompt, NEW, state_dtype=jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(out), greedy)
  _, cache = jit_prefill(model, prompt, max_length=prompt.shape[1] + NEW,
                         state_dtype=jnp.bfloat16)  # generate's prefill, compiled already
  assert all(s.ssm_state.dtype == jnp.bfloat16 for s in cache.layers)


@pytest.mark.parametrize("kind", ("Mamba1", "Mamba2"))
def test_decode_loop_writes_ssm_states_in_place(kind):
  """The compiled decoding loop updates every SSM state in its carried buffer: no
  state-sized copy per step (XLA's CPU program at batch 64, where decoding is bound by the
  state's memory traffic; a grouped (b, g, ...) view of the state in the step used to cost
  one copy per layer and step)."""
  model = abstract_model(MambaConfig.tiny(kind))  # shapes only: compiled, never run
  cache = jax.eval_shape(lambda: init_cache(model, 64, 8))
  graphdef, params = nnx.split(model)
  logits = jax.ShapeDtypeStruct((64, model.config.vocab_size_padded), jnp.float32)
  hlo = _decode.lower(graphdef, params, cache, logits, None, jax.random.key(0),
                      max_new_tokens=4, params=SamplingParams(), eos_id=None,
                      callback=None).compile().as_text()
  ssm = "f32[" + ",".join(map(str, cache.layers[0].ssm_state.shape)) + "]"
  assert ssm in hlo  # the carried states are there...
  assert not re.search(re.escape(ssm) + r"\S* copy\(", hlo)  # ...and never copied


def test_decode_loop_compiles_once_per_shape():
  model = _model("Mamba1", jnp.float32)
  ids = jax.random.randint(jax.random.key(4), (3, 6), 0, model.config.vocab_size, jnp.int32)
  before = dict(TRACE_COUNTS)
  first = generate(model, ids, 5)
  second = generate(model, (ids + 1) % model.config.vocab_size, 5)
  assert TRACE_COUNTS["decode"] - before.get("decode", 0) == 1
  assert TRACE_COUNTS["prefill"] - before.get("prefill", 0) == 1
  assert not np.array_equal(np.asarray(first), np.asarray(second))


@pytest.mark.parametrize("name", [
    "mamba1_tied_residual_fp32",
    "mamba2_ngroups1",
    pytest.param("mamba1_untied_residual_model_dtype", marks=pytest.mark.slow),
    pytest.param("mamba2_ngroups2", marks=pytest.mark.slow)])  # dt_limit, 2 groups
def test_hf_checkpoint_greedy_equals_hf_generate(name):
  """Greedy generate on a load_pretrained checkpoint == HF transformers' greedy generate.

  ``greedy_ids``: HF's ``model.generate(do_sample=False, max_new_tokens=5)`` (its cached
  decoding path) written by tests/fixtures/make_hf_fixtures.py (``make fixtures``).
  """
  expected = read_safetensors(FIXTURES / name / "expected.safetensors")
  model = load_pretrained(FIXTURES / name, dtype=jnp.float32)
  ids = jnp.asarray(expected["input_ids"], jnp.int32)
  hf = expected["greedy_ids"]
  new = hf.shape[1] - ids.shape[1]
  out = np.asarray(generate(model, ids, new))
  np.testing.assert_array_equal(out, hf)
  # The first new token is also the argmax of HF's own last logits (no near tie there).
  last = np.sort(expected["logits"][:, -1], axis=-1)
  assert np.all(last[:, -1] - last[:, -2] > 1e-4)
  np.testing.assert_array_equal(out[:, ids.shape[1]], expected["logits"][:, -1].argmax(-1))


def test_public_generate_has_the_documented_signature():
  """mamba_jax.generate(model, input_ids, max_new_tokens, *, temperature=0.0, top_k=0,
  top_p=1.0, min_p=0.0, repetition_penalty=1.0, eos_id=None, attention_mask=None, key=None),
  in this order; further keyword-only options may only follow, with defaults."""
  params = list(inspect.signature(mamba_jax.generate).parameters.values())
  positional = [(p.name, p.kind) for p in params[:3]]
  assert positional == [(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                        for n in ("model", "input_ids", "max_new_tokens")]
  assert all(p.default is inspect.Parameter.empty for p in params[:3])
  documented = [("temperature", 0.0), ("top_k", 0), ("top_p", 1.0), ("min_p", 0.0),
                ("repetition_penalty", 1.0), ("eos_id", None), ("attention_mask", None),
                ("key", None)]
  got = [(p.name, p.default) for p in params[3:3 + len(documented)]]
  assert got == documented
  for p in params[3:]:
    assert p.kind == inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=1.0), "key"),
    (dict(eos_id=61), "eos_id"),
    (dict(attention_mask=np.zeros((1, 3), np.int32)), "no token"),
    (dict(attention_mask=np.full((1, 3), 2, np.int32)), "only 0"),
    (dict(attention_mask=np.ones((2, 3), np.int32)), "attention_mask"),
    (dict(state_dtype=jnp.int32), "state_dtype"),
    (dict(max_new_tokens=0, state_dtype="nonsense"), "state_dtype")])
def test_generate_validation(kwargs, match):
  model = _model("Mamba1", jnp.float32)
  args = dict(max_new_tokens=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    generate(model, jnp.zeros((1, 3), jnp.int32), args.pop("max_new_tokens"), **args)
