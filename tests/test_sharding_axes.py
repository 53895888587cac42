"""Parameters carry their logical axes from where the model creates them; the rules only map
logical axes to mesh axes."""
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from taipan_jax import sharding
from taipan_jax.models.mlp import dense
from taipan_jax.sharding.rules import RulesError


def _mesh():
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2,
                                                           sequence=1)))


def test_the_axes_live_on_the_parameter_not_its_name():
  """Any attribute name, any module: the parameter's own axes decide its sharding."""
  class Anything(nnx.Module):
    def __init__(self):
      self.out = dense(8, 16, axes=("embed", "mlp"), dtype=jnp.float32,
                       param_dtype=jnp.float32, rngs=nnx.Rngs(0))
      self.scale = nnx.Param(jnp.ones((16,)), **sharding.with_axes("mlp"))

  rules = sharding.parse_rules("embed=fsdp, mlp=tensor")
  got = sharding.tree_shardings(nnx.state(Anything(), nnx.Param), _mesh(), rules)
  assert got["out"]["kernel"].get_value().spec == P("fsdp", "tensor")
  assert got["scale"].get_value().spec == P("tensor")


@pytest.mark.parametrize("metadata", [{}, sharding.with_axes("embed")])
def test_a_parameter_without_matching_axes_is_refused(metadata):
  class Bare(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((4, 4)), **metadata)

  with pytest.raises(RulesError, match=r"parameter .*w.* \(rank 2\) has logical axes .*fix"):
    sharding.tree_shardings(nnx.state(Bare(), nnx.Param), _mesh(), sharding.parse_rules(""))
