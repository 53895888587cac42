"""Running Pallas kernels on sharded arrays.

XLA cannot partition a Pallas call: under jit with sharded inputs it would gather them and
run the whole problem on every device. With a mesh set (jax.set_mesh, as the trainer does),
`per_shard` runs the kernel under shard_map on each device's rows instead.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

# Mesh axes that split the batch (the trainer's data-parallel axis, and FSDP's).
BATCH_MESH_AXES = ("data", "fsdp")


def batch_axes() -> tuple[str, ...]:
  """The current mesh's batch axes of size > 1 (none without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  manual = {a for a, t in zip(mesh.axis_names, mesh.axis_types)
            if t == jax.sharding.AxisType.Manual}     # inside a shard_map already
  return tuple(a for a in mesh.axis_names
               if a in BATCH_MESH_AXES and mesh.shape[a] > 1 and a not in manual)


def per_shard(kernel, replicated, batched, num_outputs):
  """kernel(*replicated, *batched) per batch shard; every output is batch-leading.

  replicated: arguments every shard sees whole; batched: batch-leading arguments.
  """
  axes = batch_axes()
  if not axes:
    return kernel(*replicated, *batched)
  mesh = jax.sharding.get_abstract_mesh()
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  if batched[0].shape[0] % shards:
    raise ValueError(f"batch {batched[0].shape[0]} does not split over mesh axes {axes} "
                     f"({shards} shards); fix: a batch divisible by {shards}")
  rows = P(axes)
  out_specs = rows if num_outputs == 1 else (rows,) * num_outputs
  if num_outputs > 1:             # a pallas_call returns a list; the specs are a tuple
    kernel = (lambda k: lambda *args: tuple(k(*args)))(kernel)
  return jax.shard_map(kernel, in_specs=(P(),) * len(replicated) + (rows,) * len(batched),
                       out_specs=out_specs, check_vma=False)(*replicated, *batched)
