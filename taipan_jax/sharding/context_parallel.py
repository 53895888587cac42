"""Context parallelism: each row's length split over several devices, for evaluation and for
training.

Each device holds a contiguous stretch of every row. The layers that mix tokens exchange only
what crosses a boundary (taipan_jax.ops.context_parallel): d_conv - 1 convolution inputs and
window - 1 keys and values from the previous device, and one SSD state per layer through a
scan over the devices. Memory per device follows the stretch it holds, so a sequence too long
for one device's activations is evaluated on several.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from taipan_jax.ops.context_parallel import sequence_parallel


def split_refusal(model) -> str | None:
  """Why `model`'s length cannot be split over devices as it stands (None: it can): the
  first layer that refuses (models/layer.py)."""
  return next(filter(None, (layer.split_refusal() for layer in model.layers)), None)


def _check_model(model):
  reason = split_refusal(model)
  if reason:
    raise ValueError(reason)


def context_parallel_forward(model, tokens, *, mesh: Mesh | None = None,
                             axis: str = "sequence"):
  """Logits of `model(tokens)` with the length split over mesh axis `axis`.

  Args:
    model: a LanguageModel in eval mode (Mamba-2 and SAL layers).
    tokens: [batch, seq] int32; any seq (the end is padded to a multiple of the device count
      and cut off again; padding at the end changes no earlier output).
    mesh: a mesh with axis `axis` (default: every device on one axis named `axis`).

  Returns:
    [batch, seq, vocab_size] fp32 logits, split along seq over the devices.
  """
  _check_model(model)
  if mesh is None:
    mesh = Mesh(np.asarray(jax.devices()), (axis,))
  n = mesh.shape[axis]
  b, l = tokens.shape
  padded = jnp.pad(tokens, ((0, 0), (0, (-l) % n)))
  graphdef, state = nnx.split(model)
  logits = _compiled(graphdef, mesh, axis)(state, padded)
  return logits[:, :l]


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, mesh, axis):
  def shard(state, tokens):
    with sequence_parallel(axis):
      return nnx.merge(graphdef, state)(tokens)[0]

  split = jax.shard_map(shard, mesh=mesh, in_specs=(P(), P(None, axis)),
                        out_specs=P(None, axis), check_vma=False)
  return jax.jit(split)


def over_sequence(fn, *, axis: str = "sequence"):
  """fn(params, tokens, segment_ids, extras) -> (logits, aux), run with the rows' length
  split over mesh axis `axis` of the mesh in context (`jax.set_mesh`).

  Only `axis` is manual: the other mesh axes stay automatic, so batch, FSDP and tensor
  sharding compose with it. tokens and segment_ids: [batch, seq], split along seq; params and
  extras (keys, temperatures) whole on every device of `axis`. Returns logits [batch, seq,
  vocab] split along seq, and aux, which the ops make whole-row quantities (the selected
  fraction sums over the devices; the Gumbel noise is cut from the whole row's), so the
  result and its gradients equal the unsplit call's.
  """
  def body(params, tokens, segment_ids, extras):
    with sequence_parallel(axis):
      return fn(params, tokens, segment_ids, extras)

  return jax.shard_map(body, in_specs=(P(), P(None, axis), P(None, axis), P()),
                       out_specs=(P(None, axis), P()), axis_names=frozenset({axis}),
                       check_vma=False)
