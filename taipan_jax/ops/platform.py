"""The platform a program is being compiled for, which is not always the one running it.

`taipan compile` builds TPU programs on a CPU host: the mesh in context holds the devices of
a TPU topology (jax.experimental.topologies) while jax.default_backend() says 'cpu'. Kernel
dispatch asks this module, so that such a program gets the Mosaic kernels a TPU would run.
"""
from __future__ import annotations

import jax

_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def _normalise(platform: str) -> str:
  platform = platform.lower()
  return "gpu" if platform in _GPU_PLATFORMS else platform


def target_platform() -> str:
  """'tpu', 'gpu' or 'cpu': the platform of the devices of the mesh in context (the abstract
  mesh that jax.set_mesh / shard_map set, else the concrete one), else
  jax.default_backend()."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    device = getattr(mesh, "abstract_device", None)
    if device is not None and getattr(device, "platform", None):
      return _normalise(device.platform)
  try:                       # a concrete mesh without an abstract one (older context forms)
    from jax._src.mesh import get_concrete_mesh
    concrete = get_concrete_mesh()
  except ImportError:
    concrete = None
  if concrete is not None and not concrete.empty:
    return _normalise(concrete.devices.flat[0].platform)
  return _normalise(jax.default_backend())
