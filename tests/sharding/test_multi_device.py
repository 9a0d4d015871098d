"""Sharded == one device, on 8 host CPU devices in subprocesses (tests/sharding/checks.py).

float64 throughout except the float32 case; the errors are norm-relative. Strategies: data
(dp), fsdp, tensor (tp = 2, 4), sequence (sp = 2, 4, 8) and mixtures, on tiny Mamba-2 /
Mamba-1 / hybrid language models: loss, logits and every parameter gradient.
"""

import pytest

from tests.sharding.checks import run_checks

F64 = 1e-11  # gradients of near-zero parameters have the largest relative errors
F32 = 1e-5
# Models with attention layers: nn/attention.py takes the softmax in float32 even for
# float64 inputs, so partitioned sums inside it round at float32 (observed on the hybrid
# under data=2, fsdp=2, tensor=2: loss and logits 1e-11, gradients 1.8e-8). 1e-6 is about
# 17 float32 ulps.
F64_WITH_ATTENTION = 1e-6


def _assert_all(result, tol):
  for spec, errors in result.items():
    for what, err in errors.items():
      assert err <= tol, f"{spec} {what}: relative error {err:.3e} > {tol:.0e}"


# data=2,sequence=4 (47 s on CI's 2 cores) runs with --run-slow: CI covers the sequence-parallel
# ops under tensor=2,sequence=4, and data, tensor and sequence axes together in
# test_mamba2_mixed_dp_tp_sp.
@pytest.mark.parametrize("spec", [pytest.param("data=2,sequence=4", marks=pytest.mark.slow),
                                  "tensor=2,sequence=4"])
def test_ops_sequence_parallel(spec):
  errors = run_checks("ops", spec)
  assert set(errors) >= {"ssd_init_seq_grad", "scan_grad", "conv_grad"}
  for what, err in errors.items():
    assert err <= F64, f"{what}: {err:.3e}"


def test_ssd_sequence_parallel_with_the_pallas_kernels():
  """The fused kernels as the per-device SSD (ParallelMixer(ssd_impl="pallas")), in the
  Pallas interpreter: float32 against the float64 oracle."""
  errors = run_checks("ops_pallas", "tensor=2,sequence=2", devices=4)
  for what, err in errors.items():
    assert err <= F32, f"{what}: {err:.3e}"


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
  counts = run_checks("allreduce", "Mamba1")  # in_proj column-parallel: no weight gather
  assert counts == {"all-reduce": 2, "all-gather": 0, "reduce-scatter": 0, "all-to-all": 0,
                    "collective-permute": 0}, counts


def test_tensor_parallel_stores_each_devices_share_of_in_proj_and_conv():
  """Mamba-2 §8 column-parallel in_proj: under tensor = 2 each device stores the in_proj
  columns and conv channels of its own groups only (tiny Mamba-2, 4 groups of one head)."""
  result = run_checks("tp_shards")
  assert result["wrong"] == [], result["wrong"]
  assert result["in_proj_spec"] == "P(None, 'tensor')"
  assert result["conv_spec"] == "P('tensor', None)"
  assert result["shards_per_array"] == 2
  # in_proj 32·196 + conv 128·5 of the mixer's 9036 float64 values (72288 bytes) halve.
  assert result["bytes_total"] == 72288
  assert result["bytes_before"] - result["bytes_after"] == (32 * 196 + 128 * 5) * 8 // 2


def test_tensor_parallel_stores_each_devices_share_of_mamba1_in_proj():
  """The gated Mamba-1 in_proj column-parallel through its interleaved layout: under
  tensor = 2 each device stores the x and z columns of its own channels only, and the
  ParallelMixer forward from those shards equals the mixer on one device."""
  result = run_checks("tp_shards_mamba1")
  assert result["wrong"] == [], result["wrong"]
  assert result["in_proj_spec"] == "P(None, 'tensor')"
  assert result["shards_per_array"] == 2
  # in_proj 32·128 of the mixer's 7616 float64 values (60928 bytes) halves.
  assert result["bytes_total"] == 60928
  assert result["bytes_before"] - result["bytes_after"] == 32 * 128 * 8 // 2
  assert result["forward"] <= F64, result["forward"]


@pytest.mark.slow
@pytest.mark.parametrize("layer,parallel,specs", [
    ("Mamba2", "mixers", ["data=2", "fsdp=4", "tensor=2", "tensor=4", "sequence=2",
                          "sequence=4", "sequence=8", "fsdp=2,tensor=2,sequence=2"]),
    ("Mamba1", "mixers", ["tensor=2", "sequence=4", "data=2,tensor=2,sequence=2"]),
    ("Mamba2", "gspmd", ["data=8", "fsdp=8", "tensor=4", "data=2,fsdp=2,tensor=2"]),
    ("hybrid", "gspmd", ["data=2,fsdp=2,tensor=2"]),
])
def test_strategy_matrix(layer, parallel, specs):
  _assert_all(run_checks("model", layer, parallel, *specs),
              F64_WITH_ATTENTION if layer == "hybrid" else F64)


@pytest.mark.slow
def test_training_steps_and_checkpoint_across_meshes(tmp_path):
  """mamba_jax.training's train step on a state sharded data=2 × fsdp=2 × tensor=2 gives
  the one-device parameters and optimizer state after 3 steps; the sharded state saved with
  orbax restores onto fsdp=4 × tensor=2 with the same values and the new layout."""
  result = run_checks("training", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2", str(tmp_path))
  assert result["step"] == 3
  for what in ("params", "opt_state", "restored"):
    assert result[what] <= F64, (what, result[what])
  assert result["restored_spec"] == "P('tensor', 'fsdp')"


@pytest.mark.slow
def test_two_processes(tmp_path):
  """Two processes on localhost (4 CPU devices each, jax.distributed with a free port): a
  data × tensor × sequence loss and gradient across both equals one process alone."""
  import os
  import portpicker
  import subprocess
  import sys
  from tests.sharding.checks import REPO
  port = str(portpicker.pick_unused_port())
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-m", "tests.sharding.checks", "multiprocess",
                             str(i), port], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  import json
  for out, _ in outs:
    result = json.loads(out.strip().splitlines()[-1])
    assert result["devices"] == 8
    # Both runs start from the same parameter values (checks.check_multiprocess explains
    # why a jitted initialisation would not give them), so float64 agreement is expected.
    assert result["params"] == 0.0, result
    assert result["loss"] <= F64 and result["grads"] <= F64, result
