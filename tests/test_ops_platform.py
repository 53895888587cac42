"""Kernel dispatch follows the platform of the mesh in context, not the host's backend."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taipan_jax.ops import Route
from taipan_jax.ops.attention import attention_route
from taipan_jax.ops.ssd import ssd_route
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
    tpu = Route("pallas", "tpu")
    assert ssd_route("pallas", head_dim=64, d_state=128, chunk_size=256) == tpu
    assert attention_route("pallas", head_dim=64, seq_len=4096, dtype=jnp.bfloat16) == tpu
    assert ssd_route("xla") == Route("xla")
  assert target_platform() == jax.default_backend()


@needs_libtpu
def test_auto_takes_the_mosaic_kernels_on_a_tpu_where_they_compile():
  mesh = jax.sharding.Mesh(np.array(topology_devices("v5p:2x2x1")), ("data",))
  with jax.set_mesh(mesh):
    tpu = Route("pallas", "tpu")
    assert ssd_route("auto", head_dim=64, d_state=128, chunk_size=256) == tpu
    # A chunk Mosaic cannot tile, a sequence whose blocks overflow VMEM: XLA, without an error.
    assert ssd_route("auto", head_dim=64, d_state=128, chunk_size=16) == Route("xla")
    assert attention_route("auto", head_dim=64, seq_len=4096, dtype=jnp.bfloat16) == tpu
    assert attention_route("auto", head_dim=64, seq_len=1 << 18,
                           dtype=jnp.bfloat16) == Route("xla")
    # Forced onto a chunk Mosaic cannot tile: one line naming the dimension and the fix.
    with pytest.raises(ValueError, match=r"cannot tile chunk_size=16 \(a multiple of 128 "):
      ssd_route("pallas", head_dim=64, d_state=128, chunk_size=16)
