"""What the GPU and TPU selective attention kernels share: block sizes, the compaction of
selected rows into slots, the searches that bound each block's loop, and the differentiable
compact -> attend -> scatter wrapper around a backend's forward and backward."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_q compacted query rows and block_k keys per step; Triton launch parameters."""
  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2


def compact_selection(select, window: int, block_q: int):
  """Positions of the selected rows, ascending, then the sentinel seq + window (a row that
  sees no key), padded to a multiple of block_q: [batch, slots] int32."""
  b, l = select.shape
  order = jnp.argsort(~select.astype(bool), axis=1, stable=True).astype(jnp.int32)
  count = jnp.sum(select.astype(jnp.int32), axis=1, keepdims=True)
  pos = jnp.where(jnp.arange(l)[None, :] < count, order, l + window)
  return jnp.pad(pos, ((0, 0), (0, (-l) % block_q)), constant_values=l + window)


def slots_seeing_key_blocks(pos, num_key_blocks, window, block_k):
  """[batch, key blocks, 2] int32: the slots [first, end) whose rows can see each key block,
  i.e. whose positions lie in [kb * block_k, kb * block_k + block_k - 1 + window)."""
  starts = jnp.arange(num_key_blocks, dtype=jnp.int32) * block_k
  search = jax.vmap(lambda row, x: jnp.searchsorted(row, x, side="left"), in_axes=(0, None))
  return jnp.stack([search(pos, starts), search(pos, starts + block_k - 1 + window)],
                   axis=-1).astype(jnp.int32)


def make_compacted_attention(forward, backward):
  """The public op from a backend's kernels.

  forward(q_c, k, v, pos, seg_q, ok, seg, window, bs, interpret) -> (o_c, lse);
  backward(q_c, k, v, pos, seg_q, ok, seg, lse, delta, do_c, window, bs, interpret)
    -> (dq_c, dk, dv), with delta = rowsum(do_c * o_c) as [b, h, slots] fp32.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
  def attend(q_c, k, v, pos, seg_q, ok, seg, window, bs, interpret):
    return forward(q_c, k, v, pos, seg_q, ok, seg, window, bs, interpret)[0]

  def attend_fwd(q_c, k, v, pos, seg_q, ok, seg, window, bs, interpret):
    o_c, lse = forward(q_c, k, v, pos, seg_q, ok, seg, window, bs, interpret)
    return o_c, (q_c, k, v, pos, seg_q, ok, seg, o_c, lse)

  def attend_bwd(window, bs, interpret, residuals, do_c):
    q_c, k, v, pos, seg_q, ok, seg, o_c, lse = residuals
    delta = jnp.einsum("bshd,bshd->bhs", do_c.astype(_F32), o_c.astype(_F32))
    dq_c, dk, dv = backward(q_c, k, v, pos, seg_q, ok, seg, lse, delta, do_c.astype(q_c.dtype),
                            window, bs, interpret)
    zero = lambda t: np.zeros(t.shape, jax.dtypes.float0)
    return dq_c, dk, dv, zero(pos), zero(seg_q), zero(ok), zero(seg)

  attend.defvjp(attend_fwd, attend_bwd)

  def run(q, k, v, select, *, window, kv_select, segment_ids, block_sizes, interpret):
    b, l = q.shape[:2]
    if window < 1:
      raise ValueError(f"window must be >= 1, got {window}")
    pos = compact_selection(select, window, block_sizes.block_q)
    seg = (jnp.zeros((b, l), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    ok = jnp.ones((b, l), jnp.int32) if kv_select is None else kv_select.astype(jnp.int32)
    gather_at = jnp.clip(pos, 0, l - 1)
    q_c = jnp.take_along_axis(q, gather_at[:, :, None, None], axis=1)
    seg_q = jnp.take_along_axis(seg, gather_at, axis=1)
    o_c = attend(q_c, k, v, pos, seg_q, ok, seg, window, block_sizes, interpret)
    return jnp.zeros_like(q).at[jnp.arange(b)[:, None], pos].set(o_c, mode="drop")

  return run
