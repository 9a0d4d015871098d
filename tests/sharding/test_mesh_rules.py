"""Mesh configs, validation errors, the logical-axis table and the rules (one device)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from mamba_jax.config import MambaConfig
from mamba_jax.nn.lm import MambaLM
from mamba_jax.sharding import logical as lg
from mamba_jax.sharding.mesh import AXES, MeshConfig, make_mesh, validate_mesh
from mamba_jax.sharding.rules import STRATEGIES, combine, rules_for, rules_for_mesh
from mamba_jax.sharding.shard import batch_spec, partition_specs


def _mesh(data=1, fsdp=1, tensor=1, sequence=1):
  return AbstractMesh((data, fsdp, tensor, sequence), AXES)


def test_mesh_config_resolves_the_rest():
  assert MeshConfig(data=-1, tensor=2).resolve(8) == (4, 1, 2, 1)
  assert MeshConfig(data=2, fsdp=1, tensor=2, sequence=-1).resolve(8) == (2, 1, 2, 2)
  assert MeshConfig.from_string("tensor=2,sequence=-1").resolve(8) == (1, 1, 2, 4)


@pytest.mark.parametrize("make,message", [
    (lambda: MeshConfig(data=-1, tensor=-1), "at most one axis"),
    (lambda: MeshConfig(data=0), "positive int or -1"),
    (lambda: MeshConfig(data=-1, tensor=3).resolve(8), "not divisible by the product 3"),
    (lambda: MeshConfig(data=2, tensor=2).resolve(8), "has 4 devices but 8"),
    (lambda: MeshConfig.from_string("model=2"), "<axis>=<int>"),
])
def test_mesh_config_errors(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_make_mesh_on_one_device():
  mesh = make_mesh(MeshConfig())
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}


MAMBA2 = MambaConfig.tiny(layer="Mamba2")  # 4 heads, ngroups 1, d_conv 4


@pytest.mark.parametrize("mesh,kwargs,message", [
    (_mesh(data=2, fsdp=2), dict(batch=6), r"batch = 6 is not divisible by data·fsdp = 4"),
    (_mesh(sequence=4), dict(length=30), r"length = 30 is not divisible by mesh axis "
                                          r"'sequence' = 4"),
    (_mesh(sequence=8), dict(length=16), r"2 tokens per device is fewer than d_conv - 1 = 3"),
    (_mesh(tensor=2), {}, r"Mamba-2 ngroups = 1 is not divisible by mesh axis 'tensor' = 2"),
])
def test_validate_mesh_errors(mesh, kwargs, message):
  with pytest.raises(ValueError, match=message):
    validate_mesh(mesh, MAMBA2, **kwargs)


def test_validate_mesh_heads_and_attention():
  four_groups = MAMBA2.replace(ssm_cfg={**MAMBA2.ssm_cfg, "ngroups": 4})
  validate_mesh(_mesh(tensor=4), four_groups, batch=2, length=8)
  with pytest.raises(ValueError, match="nheads = 4 is not divisible by mesh axis 'tensor' = 8"):
    validate_mesh(_mesh(tensor=8), four_groups)
  with pytest.raises(ValueError, match="attention layers"):
    validate_mesh(_mesh(sequence=2), MambaConfig.tiny(layer="hybrid"))
  with pytest.raises(ValueError, match="num_heads = 4 is not divisible"):
    validate_mesh(_mesh(tensor=8), MambaConfig.tiny(layer="attention"))


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2", "H3", "SSMNoGate", "hybrid",
                                   "attention"])
def test_every_parameter_has_logical_axes(layer):
  config = MambaConfig.tiny(layer=layer)
  state = nnx.state(MambaLM(config, rngs=nnx.Rngs(0)), nnx.Param)
  specs = partition_specs(state, config, _mesh(fsdp=2, tensor=2), STRATEGIES["fsdp_tp"])
  flat = {lg.path_string(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, P))[0]}
  assert flat["backbone/embedding/embedding"] == P("tensor", "fsdp")
  for path, spec in flat.items():
    if ":Mamba2/" in lg.annotate(path, config):  # grouped layout: column-parallel
      if path.endswith("in_proj/kernel"):
        assert spec == P("fsdp", "tensor"), (path, spec)
      if path.endswith("conv1d/kernel"):
        assert spec == P("tensor", None), (path, spec)
    elif layer in ("Mamba1", "SSMNoGate") and path.endswith("in_proj/kernel"):
      # Column-parallel: Mamba-1's interleaved [x_c, z_c] pairs, SSMNoGate's x alone.
      assert spec == P("fsdp", "tensor"), (path, spec)
    elif path.endswith("in_proj/kernel") or path.endswith("fc1/kernel"):
      assert spec == P("fsdp", None), (path, spec)  # fused: never split over tensor
    if path.endswith("out_proj/kernel") or path.endswith("fc2/kernel"):
      assert spec == P("tensor", "fsdp"), (path, spec)  # row-parallel


def test_uncovered_parameter_and_rank_mismatch_raise():
  with pytest.raises(ValueError, match="no logical-axis rule covers parameter"):
    lg.param_logical_axes("backbone/layers/0/mixer/new_thing", 2, MAMBA2)
  with pytest.raises(ValueError, match="has rank 1 but its rule"):
    lg.param_logical_axes("backbone/layers/0/mixer/in_proj/kernel", 1, MAMBA2)
  assert lg.param_logical_axes("opt_state/0/mu/backbone/layers/1/mixer/A_log", 1,
                               MAMBA2) == (lg.HEADS,)
  assert lg.param_logical_axes("step", 0, MAMBA2) == ()


def test_to_spec_divisibility_and_duplicates():
  rules = STRATEGIES["all"]
  mesh = _mesh(data=2, fsdp=2, tensor=2, sequence=2)
  assert lg.to_spec((lg.ACT_BATCH, lg.ACT_LENGTH, lg.ACT_HEADS), rules) == P(
      ("data", "fsdp"), "sequence", "tensor")
  with pytest.raises(ValueError, match=r"size 6 is not divisible by data·fsdp = 4"):
    lg.to_spec((lg.ACT_BATCH,), rules, (6,), mesh)
  with pytest.raises(ValueError, match="used twice"):
    lg.to_spec((lg.HEADS, lg.INNER), rules)
  with pytest.raises(ValueError, match="unknown logical axis"):
    lg.to_spec(("model",), rules)


def test_rules_tables():
  assert combine(rules_for("dp"), rules_for("fsdp"))[lg.ACT_BATCH] == ("data", "fsdp")
  assert rules_for_mesh(_mesh(tensor=2, sequence=2)) == STRATEGIES["tp_sp"]
  assert rules_for_mesh(_mesh()) == {}
  assert batch_spec(_mesh(data=2, sequence=2)) == P("data", "sequence")
  with pytest.raises(ValueError, match="unknown sharding strategy"):
    rules_for("zero3")


def test_constrain_is_identity_without_rules():
  x = jnp.ones((2, 3))
  assert lg.constrain(x, (lg.ACT_BATCH, None)) is x
  with pytest.raises(ValueError, match="2 logical axes"):
    lg.constrain(jnp.ones(3), (lg.ACT_BATCH, None))
