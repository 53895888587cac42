"""Context parallelism inside the ops: the sequence split over a mesh axis.

While `sequence_parallel(axis)` is active (taipan_jax.sharding.context_parallel sets it inside
a shard_map whose inputs are split along the length on `axis`), the ops that mix tokens
exchange what crosses a device boundary:
  * the causal convolution takes a halo of the previous device's last d_conv - 1 inputs;
  * the SSD scans the devices' final states (a tiny all-gather), then corrects its local
    output with the state that enters it;
  * the selective attention takes a halo of the previous device's last window - 1 keys and
    values.
Everything else in the model is per token and needs nothing.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar("taipan_sequence_axis",
                                                                   default=None)


@contextlib.contextmanager
def sequence_parallel(axis: str):
  """Inside: the ops treat their inputs as this device's shard of a longer sequence."""
  token = _AXIS.set(axis)
  try:
    yield
  finally:
    _AXIS.reset(token)


def sequence_axis() -> str | None:
  return _AXIS.get()


def left_halo(x, size: int, before=None):
  """x: [batch, local_seq, ...] -> [batch, size, ...]: the last `size` rows of the previous
  device's shard. On the first device (and outside sequence_parallel): `before`, what
  precedes position 0 ([batch, size, ...], e.g. a decode cache), or zeros."""
  start = (jnp.zeros((x.shape[0], size) + x.shape[2:], x.dtype) if before is None
           else before.astype(x.dtype))
  axis = _AXIS.get()
  if axis is None or size == 0:
    return start
  n = jax.lax.axis_size(axis)
  if x.shape[1] < size:
    raise ValueError(f"context parallelism: each device holds {x.shape[1]} tokens but a halo "
                     f"of {size} is needed; fix: fewer devices on the '{axis}' axis or a "
                     "longer sequence")
  received = jax.lax.ppermute(x[:, x.shape[1] - size:], axis,
                              perm=[(i, i + 1) for i in range(n - 1)])
  return received if before is None else jnp.where(first_in_sequence(), start, received)


def from_last_device(x):
  """The last device's x on every device (x itself outside sequence_parallel): what a
  sequence leaves behind (its final state, its last inputs) comes from the last shard."""
  axis = _AXIS.get()
  if axis is None:
    return x
  last = jax.lax.axis_index(axis) == jax.lax.axis_size(axis) - 1
  if x.dtype == jnp.bool_:
    return jax.lax.psum(jnp.where(last, x, False).astype(jnp.int32), axis) > 0
  return jax.lax.psum(jnp.where(last, x, jnp.zeros_like(x)), axis)


def tokens_before(local_len: int):
  """Tokens of each row held by the devices before this one (0 outside sequence_parallel)."""
  axis = _AXIS.get()
  return 0 if axis is None else jax.lax.axis_index(axis) * local_len


def rows_length(local_len: int):
  """The whole row's length in this call (local_len outside sequence_parallel)."""
  axis = _AXIS.get()
  return local_len if axis is None else local_len * jax.lax.axis_size(axis)


def document_positions(segment_ids):
  """Each token's position within its document: [batch, seq] int32, counting from the first
  token of its segment (segment_ids: [batch, seq] int, documents as contiguous runs). Under
  sequence_parallel a document that began on an earlier device keeps counting from there."""
  b, l = segment_ids.shape
  index = tokens_before(l) + jnp.arange(l)[None, :]
  before = left_halo(segment_ids, 1)[:, 0]                              # [b]
  starts_here = segment_ids != jnp.concatenate([before[:, None], segment_ids[:, :-1]], 1)
  if _AXIS.get() is None:
    starts_here = starts_here.at[:, 0].set(True)
  else:
    starts_here = starts_here.at[:, 0].set(starts_here[:, 0] | first_in_sequence())
  start = jax.lax.cummax(jnp.where(starts_here, index, -1), axis=1)    # -1: began earlier
  axis = _AXIS.get()
  if axis is not None:           # the last start on the devices before this one
    last = jax.lax.all_gather(start[:, -1], axis)                        # [devices, b]
    mine = jax.lax.axis_index(axis)
    earlier = jnp.where(jnp.arange(last.shape[0])[:, None] < mine, last, -1).max(0)
    start = jnp.where(start < 0, earlier[:, None], start)
  return (index - start).astype(jnp.int32)


def first_in_sequence():
  """True on the device holding the start of the sequence (always, outside
  sequence_parallel)."""
  axis = _AXIS.get()
  return True if axis is None else jax.lax.axis_index(axis) == 0


def ssd_incoming_state(local_final, decay, initial_state=None, continues=None):
  """The state entering this device's shard.

  local_final: [b, h, p, n] this shard's final state from a zero start; decay: [b, h], the
  factor the shard applies to a state entering it on the way to its end (exp of the sum of
  dt * A; zero where a document starts inside the shard); initial_state: the state before
  the whole sequence (the first device's incoming state); continues: optional [b] bool, the
  shard's first token is in the previous shard's last document (else it starts from zero).
  Devices are few, so the scan over their final states is a short loop on every device.
  """
  axis = _AXIS.get()
  finals = jax.lax.all_gather(local_final, axis)        # [devices, b, h, p, n]
  decays = jax.lax.all_gather(decay, axis)
  links = None if continues is None else jax.lax.all_gather(continues, axis)
  state = (jnp.zeros_like(local_final) if initial_state is None
           else initial_state.astype(local_final.dtype))
  incoming = []
  for j in range(finals.shape[0]):
    if links is not None and j > 0:
      state = jnp.where(links[j][:, None, None, None], state, 0.0)
    incoming.append(state)
    state = decays[j][..., None, None] * state + finals[j]
  return jnp.stack(incoming)[jax.lax.axis_index(axis)]
