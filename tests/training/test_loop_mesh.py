"""The experiment loop on a device mesh from config: sharded training equals one device,
checkpoints move between meshes, bad meshes fail at start.

The multi-device cases run ``tests/training/mesh_checks.py`` in a subprocess with 8 host CPU
devices (``--xla_force_host_platform_device_count``), float32 as the loop trains.

Tolerance. The sharded runs compute the same float32 sums in other orders (gradients
all-reduced over data / fsdp, out_proj row-parallel over tensor, SSM states combined across
sequence shards), so they are two roundings of the same training. Measured (6 AdamW steps at
learning rate 1e-2 of the one-layer test model on 2 CPU cores; the largest relative error of
any parameter / optimizer-moment array vs the one-device run): Mamba-1 resumed on data=2 ×
tensor=2 5.4e-8 / 4.6e-7; Mamba-1 data=2 × tensor=2 from scratch 1.3e-7 / 7.8e-7, then
resumed on fsdp=2 × tensor=2 1.3e-7 / 7.0e-7; Mamba-2 fsdp=2 × tensor=2 × sequence=2
1.6e-7 / 1.7e-6. A float32 ulp is 1.2e-7: the parameters differ by about one ulp, the
second moments (squared gradients) by a few more. TOL = 2e-5 leaves a factor 12 above the
largest.
"""

import json
import os
import subprocess
import sys

import pytest

from experiments.configs import selective_copying
from mamba_jax.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 2e-5


def _run(case, tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "tests.training.mesh_checks", case,
                         str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_close(errors, what):
  for part, err in errors.items():
    assert err <= TOL, f"{what} {part}: relative error {err:.3e} > {TOL:.0e}"


def test_one_device_checkpoint_resumes_on_data_tensor_mesh(tmp_path):
  result = _run("mamba1", tmp_path)
  # The one-device run's step-3 checkpoint, restored onto data=2 × tensor=2, continues from
  # step 4 (not retrained) to the one-device parameters and optimizer state.
  assert result["resumed_train_steps"] == [4, 5, 6], result
  _assert_close(result["resumed_dp2_tp2"], "resumed on data=2,tensor=2 vs one device")
  assert result["accuracy"][0] == pytest.approx(result["accuracy"][1], abs=1e-6), result
  # Logged per-device parameter bytes: one device holds all; under tensor=2 the split
  # parameters are halved (Mamba-1's in_proj too, through its interleaved layout).
  (one, total), (dp_tp, _) = result["per_device_bytes"]
  assert one == total and 0.5 * total < dp_tp < 0.8 * total, result


def test_mamba2_fsdp_tensor_sequence_and_bad_meshes(tmp_path):
  result = _run("mamba2", tmp_path)
  _assert_close(result["fsdp2_tp2_sp2"], "fsdp=2,tensor=2,sequence=2 vs one device")
  (one, total), (sharded, _) = result["per_device_bytes"]
  assert one == total and sharded < 0.5 * total, result
  errors = result["errors"]
  assert "4 devices are not divisible by the product 3" in errors["tensor=3"], errors
  assert "Mamba-2 ngroups = 2 is not divisible by mesh axis 'tensor' = 4" in errors["tensor=4"]
  assert "batch = 6 is not divisible by data·fsdp = 4" in errors["batch"], errors
  assert ("evaluation 'long'" in errors["eval_length"]
          and "length = 13 is not divisible by mesh axis 'sequence' = 4"
          in errors["eval_length"]), errors


@pytest.mark.slow  # three compilations of the train step: ~40 s of CPU
def test_sharded_checkpoint_resumes_on_another_mesh(tmp_path):
  result = _run("mamba1_sharded_resume", tmp_path)
  _assert_close(result["dp2_tp2"], "data=2,tensor=2 vs one device")
  assert result["resumed_train_steps"] == [4, 5, 6], result
  _assert_close(result["resumed_fsdp2_tp2"], "resumed on fsdp=2,tensor=2 vs one device")
  _assert_close(result["resumed_vs_dp2_tp2"], "resumed vs uninterrupted data=2,tensor=2")
  (one, total), (dp_tp, _), (fsdp_tp, _) = result["per_device_bytes"]
  assert one == total and dp_tp < 0.8 * total and fsdp_tp < 0.65 * dp_tp, result


def test_bad_mesh_config_fails_before_anything_runs(tmp_path):
  """In this process (one CPU device): sizes that cannot make a mesh, an unknown axis."""
  config = selective_copying.get_config("test")
  config.mesh.tensor = 3
  with pytest.raises(ValueError, match=r"config.mesh: .*1 devices are not divisible by the "
                                       r"product 3"):
    loop.train_and_evaluate(config, str(tmp_path / "a"))
  config.mesh.tensor = 0
  with pytest.raises(ValueError, match=r"MeshConfig.tensor must be a positive int or -1"):
    loop.train_and_evaluate(config, str(tmp_path / "b"))
  config.mesh.tensor = 1
  config.mesh.model = 2
  with pytest.raises(ValueError, match=r"config.mesh has unknown keys \['model'\]"):
    loop.train_and_evaluate(config, str(tmp_path / "c"))
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", ["selective_copying", "induction_heads", "mqar", "lm",
                                  "sc09", "dna_pretrain"])
def test_every_config_has_the_default_mesh(name):
  import importlib
  config = importlib.import_module(f"experiments.configs.{name}").get_config(None)
  assert config.mesh.to_dict() == {"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1}

