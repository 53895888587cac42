"""Chunked SSD forward as one fused Pallas TPU (Mosaic) kernel.

Grid (batch, head, chunk); the chunk axis runs in order ("arbitrary") and carries the
[head_dim, d_state] state in VMEM, so each chunk is read once and written once:
  1. cumulative log-decay of the chunk, as a matmul with a triangular ones matrix (MXU);
  2. intra-chunk output: ((C B^T) * L) (dt x), L[i, j] = exp(cum_i - cum_j) for j <= i in
     the same segment;
  3. the incoming state's output: (C S^T) * exp(cum), for positions still in the segment
     the previous chunk ended in;
  4. the state update S <- exp(cum_last) S + (x * dt * exp(cum_last - cum))^T B, restricted
     to the segment the chunk ends in.
Scalars are kept as (1, 1) vectors (Mosaic reads scalars only from SMEM); A, one scalar per
head, sits in SMEM. Layout: heads outermost, so every block's last two dims are
(chunk, head_dim) / (chunk, d_state) / (1, chunk), which Mosaic tiles directly.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ssd.common import BlockSizes

_HI = jax.lax.Precision.HIGHEST


def _dot(a, b, contract):
  return jax.lax.dot_general(a, b, (contract, ((), ())), precision=_HI,
                             preferred_element_type=jnp.float32)


def _ssd_chunk_kernel(a_ref, x_ref, dt_ref, b_ref, c_ref, seg_ref, init_ref,
                      y_ref, final_ref, state_ref, prev_seg_ref):
  head, chunk, num_chunks = pl.program_id(1), pl.program_id(2), pl.num_programs(2)
  q = x_ref.shape[2]

  @pl.when(chunk == 0)
  def _():
    state_ref[...] = init_ref[0, 0].astype(jnp.float32)
    prev_seg_ref[...] = seg_ref[0][:, 0:1]           # the initial state's segment

  x = x_ref[0, 0].astype(jnp.float32)                # [q, p]
  dt = dt_ref[0, 0]                                  # [1, q] fp32
  seg = seg_ref[0]                                   # [1, q] int32
  bm = b_ref[0, 0].astype(jnp.float32)               # [q, n]
  cm = c_ref[0, 0].astype(jnp.float32)
  rows = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)

  da = dt * a_ref[head]                              # [1, q], <= 0
  cum = _dot(da, (rows <= cols).astype(jnp.float32), ((1,), (0,)))   # [1, q] inclusive
  cum_col = jnp.transpose(cum)                       # [q, 1]
  seg_col = jnp.transpose(seg)
  inside = (rows >= cols) & (seg_col == seg)
  decay = jnp.where(inside, jnp.exp(jnp.where(inside, cum_col - cum, 0.0)), 0.0)

  scores = _dot(cm, bm, ((1,), (1,))) * decay        # [q, q]
  y = _dot(scores, x * jnp.transpose(dt), ((1,), (0,)))               # [q, p]
  prev_seg = prev_seg_ref[...]                       # [1, 1]
  state = state_ref[...]                             # [p, n]
  from_state = jnp.where(seg_col == prev_seg, jnp.exp(cum_col), 0.0)  # [q, 1]
  y = y + _dot(cm, state, ((1,), (1,))) * from_state
  y_ref[0, 0] = y.astype(y_ref.dtype)

  last_seg = seg[:, q - 1:q]                         # [1, 1]
  cum_last = cum[:, q - 1:q]
  weight = jnp.where(seg == last_seg, dt * jnp.exp(cum_last - cum), 0.0)   # [1, q]
  contrib = _dot(x * jnp.transpose(weight), bm, ((0,), (0,)))         # [p, n]
  carry = jnp.where(prev_seg == last_seg, jnp.exp(cum_last), 0.0)     # [1, 1]
  state = carry * state + contrib
  state_ref[...] = state
  prev_seg_ref[...] = last_seg

  @pl.when(chunk == num_chunks - 1)
  def _():
    final_ref[0, 0] = state


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def ssd_forward_tpu(x, dt, A, B, C, initial_state=None, segment_ids=None, *,
                    block_sizes: BlockSizes = BlockSizes(),
                    interpret: bool | pltpu.InterpretParams = False):
  """Chunked SSD forward.

  Args:
    x: [batch, seq, heads, head_dim]; dt: [batch, seq, heads] (softplus'd, >= 0);
    A: [heads] (< 0); B, C: [batch, seq, groups, d_state], heads divisible by groups.
    initial_state: optional [batch, heads, head_dim, d_state].
    segment_ids: optional [batch, seq] int; each id one contiguous run (packed documents);
      the state resets where the id changes; the initial state belongs to the first id.
    block_sizes: the chunk length; any seq works (padded with dt = 0, which is exact).
    interpret: run in Pallas TPU interpret mode on any backend: True, or InterpretParams
      (whose default fills never-written memory with NaN, so an unwritten block shows).

  Returns:
    y [batch, seq, heads, head_dim] in x.dtype, final state [batch, heads, head_dim,
    d_state] fp32.
  """
  b, l, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  if h % g:
    raise ValueError(f"heads={h} is not a multiple of groups={g}")
  q = block_sizes.chunk
  pad = (-l) % q
  lp = l + pad
  padl = lambda t, v=0: jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2),
                                constant_values=v)
  xt = jnp.transpose(padl(x), (0, 2, 1, 3))                            # [b, h, L, p]
  dtt = jnp.transpose(padl(dt.astype(jnp.float32)), (0, 2, 1))[:, :, None, :]   # [b,h,1,L]
  bt = jnp.transpose(padl(B), (0, 2, 1, 3))                            # [b, g, L, n]
  ct = jnp.transpose(padl(C), (0, 2, 1, 3))
  if segment_ids is None:
    seg = jnp.zeros((b, 1, lp), jnp.int32)
  else:
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), mode="edge")[:, None]
  init = (jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
  rep = h // g
  grid = (b, h, lp // q)
  in_specs = [
      pl.BlockSpec(memory_space=pltpu.SMEM),                                  # A [h]
      pl.BlockSpec((1, 1, q, p), lambda i, j, c: (i, j, c, 0)),               # x
      pl.BlockSpec((1, 1, 1, q), lambda i, j, c: (i, j, 0, c)),               # dt
      pl.BlockSpec((1, 1, q, n), lambda i, j, c: (i, j // rep, c, 0)),        # B
      pl.BlockSpec((1, 1, q, n), lambda i, j, c: (i, j // rep, c, 0)),        # C
      pl.BlockSpec((1, 1, q), lambda i, j, c: (i, 0, c)),                     # segment ids
      pl.BlockSpec((1, 1, p, n), lambda i, j, c: (i, j, 0, 0)),               # initial state
  ]
  out_specs = [pl.BlockSpec((1, 1, q, p), lambda i, j, c: (i, j, c, 0)),
               pl.BlockSpec((1, 1, p, n), lambda i, j, c: (i, j, 0, 0))]
  y, final = pl.pallas_call(
      _ssd_chunk_kernel,
      out_shape=[jax.ShapeDtypeStruct((b, h, lp, p), x.dtype),
                 jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)],
      grid=grid, in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((p, n), jnp.float32), pltpu.VMEM((1, 1), jnp.int32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret is True else interpret,
  )(A.astype(jnp.float32), xt, dtt, bt, ct, seg, init)
  return jnp.transpose(y, (0, 2, 1, 3))[:, :l], final
