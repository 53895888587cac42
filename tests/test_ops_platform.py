"""Kernel dispatch follows the platform of the mesh in context, not the host's backend."""
import jax
import numpy as np
import pytest

from taipan_jax.ops import resolve_attention_implementation, resolve_implementation
from taipan_jax.ops.platform import target_platform
from taipan_jax.sharding.topology import libtpu_available, topology_devices

needs_libtpu = pytest.mark.skipif(
    not libtpu_available(), reason="libtpu not installed: `pip install -e '.[test]'` on Linux "
    "x86_64 (or '.[tpu]') brings it and these run")


def test_without_a_mesh_the_backend_decides():
  assert target_platform() == jax.default_backend()


def test_a_mesh_of_host_devices_is_the_host_platform():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  with jax.set_mesh(mesh):
    assert target_platform() == jax.default_backend()


@needs_libtpu
def test_a_tpu_topology_mesh_picks_the_mosaic_kernels_from_a_cpu_host():
  mesh = jax.sharding.Mesh(np.array(topology_devices("v5e:2x2")), ("data",))
  with jax.set_mesh(mesh):
    assert target_platform() == "tpu"
    assert resolve_implementation("pallas", head_dim=64, d_state=128) == "pallas_tpu"
    assert resolve_attention_implementation("pallas", head_dim=64) == "pallas_tpu"
    assert resolve_implementation("reference") == "reference"
  assert target_platform() == jax.default_backend()
