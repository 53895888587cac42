"""Running Pallas kernels on sharded arrays.

XLA cannot partition a Pallas call: under jit with sharded inputs it would gather them and
run the whole problem on every device. With a mesh set (jax.set_mesh, as the trainer does),
`per_shard` runs the kernel under shard_map on each device's rows instead (and, for kernels
whose heads are independent, on each device's heads).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

# Mesh axes that split the batch (the trainer's data-parallel axis, and FSDP's), and the heads
# (tensor parallelism: the default rules put the 'heads' logical axis there).
BATCH_MESH_AXES = ("data", "fsdp")
HEAD_MESH_AXES = ("tensor",)


def _split_axes(names) -> tuple[str, ...]:
  """The current mesh's axes among `names` of size > 1 (none without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  manual = {a for a, t in zip(mesh.axis_names, mesh.axis_types)
            if t == jax.sharding.AxisType.Manual}     # inside a shard_map already
  return tuple(a for a in mesh.axis_names
               if a in names and mesh.shape[a] > 1 and a not in manual)


def batch_axes() -> tuple[str, ...]:
  """The current mesh's batch axes of size > 1 (none without a mesh)."""
  return _split_axes(BATCH_MESH_AXES)


def head_axes(num_heads: int) -> tuple[str, ...]:
  """The current mesh's head axes of size > 1, when they divide num_heads (else none: the
  heads stay whole on every device)."""
  axes = _split_axes(HEAD_MESH_AXES)
  mesh = jax.sharding.get_abstract_mesh()
  return axes if axes and num_heads % int(np.prod([mesh.shape[a] for a in axes])) == 0 else ()


def per_shard(kernel, replicated, batched, num_outputs, per_head=()):
  """kernel(*replicated, *batched) per batch shard (and head shard); every output is
  batch-leading.

  replicated: arguments every shard sees whole; batched: batch-leading arguments.
  per_head: indices into `batched` of [batch, seq, heads, ...] arguments whose heads the
  kernel treats independently; when given, they and every output are also split by heads
  over the mesh's head axes (HEAD_MESH_AXES), where those divide the heads.
  """
  axes = batch_axes()
  heads = head_axes(batched[per_head[0]].shape[2]) if per_head else ()
  if not axes and not heads:
    return kernel(*replicated, *batched)
  mesh = jax.sharding.get_abstract_mesh()
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  if batched[0].shape[0] % shards:
    raise ValueError(f"batch {batched[0].shape[0]} does not split over mesh axes {axes} "
                     f"({shards} shards); fix: a batch divisible by {shards}")
  rows = P(axes or None)
  head_rows = P(axes or None, None, heads) if heads else rows
  out = head_rows if per_head else rows
  out_specs = out if num_outputs == 1 else (out,) * num_outputs
  if num_outputs > 1:             # a pallas_call returns a list; the specs are a tuple
    kernel = (lambda k: lambda *args: tuple(k(*args)))(kernel)
  in_specs = (P(),) * len(replicated) + tuple(head_rows if i in per_head else rows
                                              for i in range(len(batched)))
  return jax.shard_map(kernel, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*replicated, *batched)
