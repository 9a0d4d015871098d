"""Logit parity with HF transformers (and mamba_ssm's format) on the committed fixtures.

The fixtures under tests/fixtures/hf/ were written by tests/fixtures/make_hf_fixtures.py
with torch 2.13.0 and transformers 5.23.0: tiny randomly initialised MambaForCausalLM /
Mamba2ForCausalLM models with A_log, D, dt biases, norm weights and conv biases perturbed
away from their init values, and HF's own float32 logits. For Mamba-2 with ngroups > 1 the
expected logits use the group-wise gated RMSNorm of mamba_ssm (older transformers releases
normalised over all of d_inner; 5.23.0 is group-wise already, which the script checks).
The "_mamba_ssm" fixtures hold the same weights renamed to mamba_ssm's names, saved by
torch.save, with the vocabulary padded to a multiple of 8 by zero rows.

Measured relative errors (float32 forward on CPU): mamba1_tied_residual_fp32 1.4e-7,
mamba1_untied_residual_model_dtype 1.3e-7, mamba2_ngroups1 3.5e-7, mamba2_ngroups2 3.9e-7,
mamba1_tied_residual_fp32_mamba_ssm 1.4e-7, mamba2_ngroups2_mamba_ssm 3.9e-7.
"""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.convert import detect_format, load_pretrained, read_config
from mamba_jax.convert.hf_layout import read_safetensors
from tests.numerics import assert_close, relative_error

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
RTOL = 1e-4

HF_FIXTURES = ("mamba1_tied_residual_fp32", "mamba1_untied_residual_model_dtype",
               "mamba2_ngroups1", "mamba2_ngroups2")
MAMBA_SSM_FIXTURES = ("mamba1_tied_residual_fp32_mamba_ssm", "mamba2_ngroups2_mamba_ssm")


def _expected(name: str) -> dict[str, np.ndarray]:
  return read_safetensors(FIXTURES / name / "expected.safetensors")


@pytest.mark.parametrize("name", HF_FIXTURES + MAMBA_SSM_FIXTURES)
def test_logits_match_hf(name):
  expected = _expected(name)
  model = load_pretrained(FIXTURES / name, dtype=jnp.float32)
  logits = model(jnp.asarray(expected["input_ids"], jnp.int32))
  assert logits.dtype == jnp.float32
  print(f"{name}: relative error {relative_error(logits, expected['logits']):.2e}")
  assert_close(logits, expected["logits"], RTOL, name)


@pytest.mark.parametrize("name,kind", [(n, "hf") for n in HF_FIXTURES] +
                         [(n, "mamba_ssm") for n in MAMBA_SSM_FIXTURES])
def test_detect_format(name, kind):
  assert detect_format(FIXTURES / name) == kind


def test_config_mapping_of_the_fixtures():
  m1 = read_config(FIXTURES / "mamba1_untied_residual_model_dtype")
  assert (m1.ssm_layer, m1.d_model, m1.n_layer, m1.vocab_size_padded) == ("Mamba1", 16, 2, 40)
  assert (m1.tie_embeddings, m1.residual_in_fp32) == (False, False)
  assert m1.ssm_kwargs["dt_rank"] == 1 and m1.ssm_kwargs["d_conv"] == 3
  assert m1.ssm_kwargs["bias"] is True
  m2 = read_config(FIXTURES / "mamba2_ngroups1")  # time_step_limit's bound is {"__float__": ...}
  assert m2.ssm_layer == "Mamba2" and m2.ssm_kwargs["dt_limit"] == (0.0, float("inf"))
  assert (m2.ssm_kwargs["headdim"], m2.ssm_kwargs["ngroups"], m2.ssm_kwargs["chunk_size"]) == (
      16, 1, 8)
  g2 = read_config(FIXTURES / "mamba2_ngroups2")
  assert g2.ssm_kwargs["ngroups"] == 2 and g2.ssm_kwargs["dt_limit"] == (0.01, 0.08)
  assert g2.tie_embeddings
  ssm = read_config(FIXTURES / "mamba2_ngroups2_mamba_ssm")
  assert (ssm.vocab_size, ssm.vocab_size_padded) == (48, 48)
  ssm1 = read_config(FIXTURES / "mamba1_tied_residual_fp32_mamba_ssm")
  assert (ssm1.vocab_size, ssm1.vocab_size_padded) == (37, 40)


def test_hf_and_mamba_ssm_fixtures_hold_the_same_model():
  hf = load_pretrained(FIXTURES / "mamba2_ngroups2")
  ssm = load_pretrained(FIXTURES / "mamba2_ngroups2_mamba_ssm")
  ids = jnp.asarray(_expected("mamba2_ngroups2")["input_ids"], jnp.int32)
  np.testing.assert_array_equal(np.asarray(hf(ids)), np.asarray(ssm(ids)))


def test_the_ngroups2_fixture_tells_the_norm_groups_and_the_dt_limit_apart():
  """A whole-row gated norm, or no time_step_limit clamp, would miss the expected logits."""
  expected = _expected("mamba2_ngroups2")
  ids = jnp.asarray(expected["input_ids"], jnp.int32)
  whole_row = load_pretrained(FIXTURES / "mamba2_ngroups2")
  for layer in whole_row.backbone.layers:
    layer.mixer.norm.group_size = layer.mixer.norm.weight.shape[0]
  assert relative_error(whole_row(ids), expected["logits"]) > 10 * RTOL
  unclamped = load_pretrained(FIXTURES / "mamba2_ngroups2")
  for layer in unclamped.backbone.layers:
    layer.mixer.dt_limit = (0.0, float("inf"))
  assert relative_error(unclamped(ids), expected["logits"]) > 10 * RTOL
