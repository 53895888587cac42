"""Kernel dispatch follows the platform of the mesh in context, not the host's backend."""
import jax
import jax.numpy as jnp
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


@needs_libtpu
def test_auto_takes_the_mosaic_kernels_on_a_tpu_where_they_compile():
  mesh = jax.sharding.Mesh(np.array(topology_devices("v5p:2x2x1")), ("data",))
  with jax.set_mesh(mesh):
    assert resolve_implementation("auto", head_dim=64, d_state=128, chunk_size=256) == "pallas_tpu"
    # A chunk Mosaic cannot tile, a sequence whose blocks overflow VMEM: XLA, without an error.
    assert resolve_implementation("auto", head_dim=64, d_state=128, chunk_size=16) == "reference"
    assert resolve_attention_implementation("auto", head_dim=64, seq_len=4096,
                                            dtype=jnp.bfloat16) == "pallas_tpu"
    assert resolve_attention_implementation("auto", head_dim=64, seq_len=1 << 18,
                                            dtype=jnp.bfloat16) == "reference"
