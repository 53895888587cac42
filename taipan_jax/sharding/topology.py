"""TPU slices described without a TPU: devices to build meshes from and compile for.

With libtpu installed, jax.experimental.topologies describes a slice on any machine; a mesh
of its devices lets `jit(...).lower(...).compile()` run the real XLA:TPU compiler and Mosaic
(MaxText's train_compile.py does the same). Nothing executes: the devices have no memory.

Names are `<generation>:<chips per axis>`, as gcloud's topologies: `v5e:4x4` (16 chips),
`v5p:4x4x4` (64 chips), `v6e:2x2`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

import jax

_GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip. hbm_bytes: the HBM XLA:TPU lets a program use, as its out-of-memory
  message states it (libtpu 0.0.42.1: "exceeds available HBM (15.75G)" on v5e, 95.74G on
  v5p, 31.25G on v6e; the data sheets say 16, 95 and 32 GB). hbm_bytes_per_s: "HBM2
  bandwidth" per chip, cloud.google.com/tpu/docs/{v5e,v5p,v6e}. Peak FLOP/s live in
  training.flops."""
  name: str
  device_kind: str          # what jax calls its devices
  hbm_bytes: int
  hbm_bytes_per_s: float
  dims: int                 # axes of its topology names (2: v5e/v6e, 3: v5p)


CHIPS = {
    "v5e": Chip("v5e", "TPU v5 lite", int(15.75 * _GIB), 819e9, 2),
    "v5p": Chip("v5p", "TPU v5", int(95.74 * _GIB), 2765e9, 3),
    "v6e": Chip("v6e", "TPU v6 lite", int(31.25 * _GIB), 1640e9, 2),
}


class TopologyError(ValueError):
  """A topology name or option that libtpu cannot describe (the message names the fix)."""


def _quiet_libtpu() -> None:
  # No TPU metadata server here; several processes (test workers) may load libtpu at once.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
  """'v5e:4x4' -> (CHIPS['v5e'], (4, 4))."""
  gen, _, dims = name.partition(":")
  if gen not in CHIPS or not dims:
    raise TopologyError(f"--topology={name!r}: expected <generation>:<chips per axis> with a "
                        f"generation of {sorted(CHIPS)}, e.g. v5e:4x4 or v5p:2x2x2")
  try:
    shape = tuple(int(d) for d in dims.split("x"))
  except ValueError:
    shape = ()
  chip = CHIPS[gen]
  if len(shape) != chip.dims or min(shape) < 1:
    raise TopologyError(f"--topology={name!r}: {gen} topologies have {chip.dims} axes of "
                        f"positive chip counts, e.g. {gen}:{'x'.join(['2'] * chip.dims)}")
  return chip, shape


def topology_devices(name: str, *, chip_config: str = "default", num_slices: int = 1) -> list:
  """The devices of `num_slices` slices of topology `name` (no TPU needed; libtpu must be
  installed: `pip install -e ".[tpu]"`)."""
  chip, shape = parse_topology(name)
  if num_slices < 1:
    raise TopologyError(f"--num_slices={num_slices}: must be >= 1")
  _quiet_libtpu()
  if importlib.util.find_spec("libtpu") is None:
    raise TopologyError(f"cannot describe TPU topology {name!r}: libtpu is not installed; fix:"
                        " `pip install -e \".[tpu]\"` (it installs on CPU-only machines too)")
  try:
    from jax.experimental import topologies
  except ImportError as e:          # pragma: no cover - jax always ships it
    raise TopologyError(f"this jax has no jax.experimental.topologies ({e})") from None
  # A host holds a 2x2 block of chips; smaller slices are one host.
  host = tuple(min(2, d) for d in shape) + (1,) * (3 - len(shape))
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{chip.name}:{'x'.join(map(str, shape))}",
        chip_config_name=chip_config, chips_per_host_bounds=host, num_slices=num_slices,
        wrap=(False, False, False))
  except Exception as e:            # libtpu missing, or a shape it does not know
    raise TopologyError(f"cannot describe TPU topology {name!r} (chip_config={chip_config!r},"
                        f" num_slices={num_slices}): {str(e).splitlines()[0] if str(e) else e}"
                        "; fix: a slice shape the generation offers (each axis 1, 2 or "
                        "a multiple of 2)") from None
  return list(desc.devices)


def libtpu_available() -> bool:
  """Whether this machine can describe TPU topologies (libtpu importable)."""
  try:
    topology_devices("v5e:2x2")
    return True
  except TopologyError:
    return False


def chips(name: str, num_slices: int = 1) -> int:
  return math.prod(parse_topology(name)[1]) * num_slices
