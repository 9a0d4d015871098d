"""Sharded == one device, on 8 host CPU devices in subprocesses (tests/sharding/checks.py).

float64 throughout except the float32 case; the errors are norm-relative. Strategies: data
(dp), fsdp, tensor (tp = 2, 4), sequence (sp = 2, 4, 8) and mixtures, on tiny Mamba-2 /
Mamba-1 / hybrid language models: loss, logits and every parameter gradient.
"""

import pytest

from tests.sharding.checks import run_checks

F64 = 1e-11  # gradients of near-zero parameters have the largest relative errors
F32 = 1e-5


def _assert_all(result, tol):
  for spec, errors in result.items():
    for what, err in errors.items():
      assert err <= tol, f"{spec} {what}: relative error {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("spec", ["data=2,sequence=4", "tensor=2,sequence=4"])
def test_ops_sequence_parallel(spec):
  errors = run_checks("ops", spec)
  assert set(errors) >= {"ssd_init_seq_grad", "scan_grad", "conv_grad"}
  for what, err in errors.items():
    assert err <= F64, f"{what}: {err:.3e}"


def test_mamba2_mixed_dp_tp_sp():
  _assert_all(run_checks("model", "Mamba2", "mixers", "data=2,tensor=2,sequence=2"), F64)


def test_float32_mixed():
  result = run_checks("float32", "data=2,tensor=2,sequence=2")
  assert result.pop("dtype") == "float32"
  for what, err in result.items():
    assert err <= F32, f"{what}: {err:.3e}"


def test_collectives_per_mixer():
  """Mamba-2 §8: one all-reduce per mixer (out_proj) and nothing else in the forward;
  Mamba-1: two (x_proj's Δ, B, C and out_proj)."""
  counts = run_checks("allreduce", "Mamba2")
  assert counts == {"all-reduce": 1, "all-gather": 0, "reduce-scatter": 0, "all-to-all": 0,
                    "collective-permute": 0}, counts
  assert run_checks("allreduce", "Mamba1")["all-reduce"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("layer,parallel,specs", [
    ("Mamba2", "mixers", ["data=2", "fsdp=4", "tensor=2", "tensor=4", "sequence=2",
                          "sequence=4", "sequence=8", "fsdp=2,tensor=2,sequence=2"]),
    ("Mamba1", "mixers", ["tensor=2", "sequence=4", "data=2,tensor=2,sequence=2"]),
    ("Mamba2", "gspmd", ["data=8", "fsdp=8", "tensor=4", "data=2,fsdp=2,tensor=2"]),
    ("hybrid", "gspmd", ["data=2,fsdp=2,tensor=2"]),
])
def test_strategy_matrix(layer, parallel, specs):
  _assert_all(run_checks("model", layer, parallel, *specs), F64)
