"""The device mesh a config asks for."""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from taipan_jax.config.axes import MESH_AXES


class MeshError(ValueError):
  """A mesh that the devices cannot form (the message names the key and the fix)."""


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Sizes of MESH_AXES from `mesh.<axis>` (one of them may be -1: the devices left)."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  free = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  for a, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise MeshError(f"config key mesh.{a}={s}: must be >= 1, or -1 for the devices left; "
                      "fix: set a positive size")
  if len(free) > 1:
    raise MeshError(f"mesh axes {free} are all -1; fix: give all but one of them a size")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise MeshError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} leave {num_devices} / "
                      f"{fixed} devices for mesh.{free[0]}; fix: sizes whose product divides "
                      f"{num_devices}")
    sizes[MESH_AXES.index(free[0])] = num_devices // fixed
  elif fixed != num_devices:
    raise MeshError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} make {fixed} devices but "
                    f"there are {num_devices}; fix: sizes whose product is {num_devices}, "
                    "or -1 on one axis")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The mesh over `devices` (default: all). With mesh.dcn_data > 1 (multi-slice TPU, or
  several hosts joined by a slower network), the data axis is split into that many groups of
  devices, each group one slice, so only data-parallel gradients cross the slow link."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  slices = int(mesh_cfg.get("dcn_data", 1))
  auto = (AxisType.Auto,) * len(MESH_AXES)
  if slices > 1:
    if shape[0] % slices:
      raise MeshError(f"config key mesh.dcn_data={slices}: does not divide the data axis "
                      f"({shape[0]}); fix: a divisor of {shape[0]}")
    ici = (shape[0] // slices,) + shape[1:]
    dcn = (slices,) + (1,) * (len(MESH_AXES) - 1)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices,
                                                allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=auto)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)
