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

from pallas_kernels.custom_vjp import kernel_vjp
from pallas_kernels.ssd.common import BlockSizes

_F32 = jnp.float32


def _dot(a, b, contract):
  """a . b over `contract`, accumulated in fp32. fp32 operands multiply at HIGHEST precision
  (true fp32 passes); bf16 operands feed the MXU in bf16 (the model's compute dtype)."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == _F32 else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                             preferred_element_type=_F32)


def _ssd_chunk_kernel(a_ref, x_ref, dt_ref, b_ref, c_ref, seg_ref, init_ref, *refs,
                      emit_states):
  if emit_states:                  # the backward's pass: the state entering every chunk
    states_ref, state_ref, prev_seg_ref = refs
  else:
    y_ref, final_ref, state_ref, prev_seg_ref = refs
  head, chunk, num_chunks = pl.program_id(1), pl.program_id(2), pl.num_programs(2)
  q = x_ref.shape[2]

  @pl.when(chunk == 0)
  def _():
    state_ref[...] = init_ref[0, 0].astype(jnp.float32)
    prev_seg_ref[...] = seg_ref[0][:, 0:1]           # the initial state's segment

  # Matmul operands stay in the inputs' dtype (cdt); decays, the cumulative sum and the
  # state stay fp32 and are rounded to cdt only where they enter a product.
  cdt = x_ref.dtype
  x = x_ref[0, 0].astype(jnp.float32)                # [q, p]
  dt = dt_ref[0, 0]                                  # [1, q] fp32
  seg = seg_ref[0]                                   # [1, q] int32
  bm = b_ref[0, 0]                                   # [q, n] cdt
  cm = c_ref[0, 0]
  rows = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)

  da = dt * a_ref[head]                              # [1, q], <= 0
  cum = _dot(da, (rows <= cols).astype(jnp.float32), ((1,), (0,)))   # [1, q] inclusive
  cum_col = jnp.transpose(cum)                       # [q, 1]
  seg_col = jnp.transpose(seg)
  inside = (rows >= cols) & (seg_col == seg)
  decay = jnp.where(inside, jnp.exp(jnp.where(inside, cum_col - cum, 0.0)), 0.0)

  prev_seg = prev_seg_ref[...]                       # [1, 1]
  state = state_ref[...]                             # [p, n]
  if emit_states:
    states_ref[0, 0, 0] = state
  else:
    scores = _dot(cm, bm, ((1,), (1,))) * decay      # [q, q]
    y = _dot(scores.astype(cdt), (x * jnp.transpose(dt)).astype(cdt), ((1,), (0,)))  # [q, p]
    from_state = jnp.where(seg_col == prev_seg, jnp.exp(cum_col), 0.0)  # [q, 1]
    y = y + _dot(cm, state.astype(cdt), ((1,), (1,))) * from_state
    y_ref[0, 0] = y.astype(y_ref.dtype)

  last_seg = seg[:, q - 1:q]                         # [1, 1]
  cum_last = cum[:, q - 1:q]
  weight = jnp.where(seg == last_seg, dt * jnp.exp(cum_last - cum), 0.0)   # [1, q]
  contrib = _dot((x * jnp.transpose(weight)).astype(cdt), bm, ((0,), (0,)))   # [p, n]
  carry = jnp.where(prev_seg == last_seg, jnp.exp(cum_last), 0.0)     # [1, 1]
  state = carry * state + contrib
  state_ref[...] = state
  prev_seg_ref[...] = last_seg

  if not emit_states:
    @pl.when(chunk == num_chunks - 1)
    def _():
      final_ref[0, 0] = state


def _interpret(interpret):
  return pltpu.InterpretParams() if interpret is True else interpret


# Mosaic tiles the last dim of a block in lanes of 128: a chunk's dt and segment ids are
# (1, chunk) rows, so a compiled kernel needs whole lane tiles (interpret mode does not).
LANES = 128


def check_chunk(chunk: int, interpret) -> None:
  if not interpret and chunk % LANES:
    raise ValueError(f"SSD chunk={chunk}: on a TPU the Mosaic kernel needs a multiple of "
                     f"{LANES} (a chunk's dt is one row of lanes); fix: chunk 128 or 256 "
                     "(mamba.chunk_size), or interpret mode")


def _layout(x, dt, B, C, segment_ids, q):
  """Heads-outer, chunk-padded views: x [b, h, L, p], dt [b, h, 1, L] fp32, B, C
  [b, g, L, n], segment ids [b, 1, L] (edge-padded), and the id of the state entering each
  chunk [b, chunks, 1, 128] (lane-broadcast, so a block of it is one (1, 128) tile)."""
  b, l = x.shape[:2]
  pad = (-l) % q
  padl = lambda t: jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
  xt = jnp.transpose(padl(x), (0, 2, 1, 3))
  dtt = jnp.transpose(padl(dt.astype(jnp.float32)), (0, 2, 1))[:, :, None, :]
  bt = jnp.transpose(padl(B), (0, 2, 1, 3))
  ct = jnp.transpose(padl(C), (0, 2, 1, 3))
  if segment_ids is None:
    seg = jnp.zeros((b, l + pad), jnp.int32)
  else:
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), mode="edge")
  prev = jnp.concatenate([seg[:, :1], seg[:, q - 1:-1:q]], axis=1)    # [b, chunks]
  prev = jnp.broadcast_to(prev[:, :, None, None], (*prev.shape, 1, 128))
  return xt, dtt, bt, ct, seg[:, None], prev


def _specs(q, p, n, rep, chunk_of=lambda c: c):
  """BlockSpecs over grid (batch, head, chunk) of x-like, dt-like, B/C-like and seg blocks."""
  x_spec = pl.BlockSpec((1, 1, q, p), lambda i, j, c: (i, j, chunk_of(c), 0))
  dt_spec = pl.BlockSpec((1, 1, 1, q), lambda i, j, c: (i, j, 0, chunk_of(c)))
  bc_spec = pl.BlockSpec((1, 1, q, n), lambda i, j, c: (i, j // rep, chunk_of(c), 0))
  seg_spec = pl.BlockSpec((1, 1, q), lambda i, j, c: (i, 0, chunk_of(c)))
  return x_spec, dt_spec, bc_spec, seg_spec


def _forward_call(A, xt, dtt, bt, ct, seg, init, *, q, emit_states, interpret):
  b, h, lp, p = xt.shape
  g, n = bt.shape[1], bt.shape[3]
  nc = lp // q
  x_spec, dt_spec, bc_spec, seg_spec = _specs(q, p, n, h // g)
  state_spec = pl.BlockSpec((1, 1, p, n), lambda i, j, c: (i, j, 0, 0))
  if emit_states:
    out_shape = [jax.ShapeDtypeStruct((b, h, nc, p, n), jnp.float32)]
    out_specs = [pl.BlockSpec((1, 1, 1, p, n), lambda i, j, c: (i, j, c, 0, 0))]
  else:
    out_shape = [jax.ShapeDtypeStruct((b, h, lp, p), xt.dtype),
                 jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)]
    out_specs = [x_spec, state_spec]
  return pl.pallas_call(
      functools.partial(_ssd_chunk_kernel, emit_states=emit_states),
      out_shape=out_shape, grid=(b, h, nc),
      in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), x_spec, dt_spec, bc_spec, bc_spec,
                seg_spec, state_spec],
      out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((p, n), jnp.float32), pltpu.VMEM((1, 1), jnp.int32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=_interpret(interpret),
  )(A.astype(jnp.float32), xt, dtt, bt, ct, seg, init)


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
  check_chunk(q, interpret)
  xt, dtt, bt, ct, seg, _ = _layout(x, dt, B, C, segment_ids, q)
  init = (jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
  y, final = _forward_call(A, xt, dtt, bt, ct, seg, init, q=q, emit_states=False,
                           interpret=interpret)
  return jnp.transpose(y, (0, 2, 1, 3))[:, :l], final


def _chunk_decays(a, dt, seg, prev_seg, q):
  """cum [1, q], its column, the segment column, e^{cum} where the incoming state reaches
  (column), e^{cum_last - cum} where a position reaches the chunk's end (column), and the
  chunk's carry e^{cum_last} (1, 1); masked by segment as in the forward kernel."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
  cum = _dot(dt * a, (rows <= cols).astype(jnp.float32), ((1,), (0,)))    # [1, q]
  cum_col, seg_col = jnp.transpose(cum), jnp.transpose(seg)
  last_seg, cum_last = seg[:, q - 1:q], cum[:, q - 1:q]
  from_state = jnp.where(seg_col == prev_seg, jnp.exp(cum_col), 0.0)
  to_end = jnp.where(seg_col == last_seg, jnp.exp(cum_last - cum_col), 0.0)
  carry = jnp.where(prev_seg == last_seg, jnp.exp(cum_last), 0.0)
  return rows, cols, cum, cum_col, seg_col, from_state, to_end, carry


def _state_grad_kernel(a_ref, dt_ref, c_ref, seg_ref, prev_ref, dy_ref, dfinal_ref,
                       dstates_ref, dinit_ref, grad_ref):
  """Chunks in reverse (the index maps flip the chunk axis): G_{c-1} = carry G_c +
  (dy * e^{cum})^T C, with G = dLoss/dS_c written for every chunk."""
  head, step, num_chunks = pl.program_id(1), pl.program_id(2), pl.num_programs(2)
  q = dt_ref.shape[3]

  @pl.when(step == 0)
  def _():
    grad_ref[...] = dfinal_ref[0, 0]

  grad = grad_ref[...]
  dstates_ref[0, 0, 0] = grad
  dt, seg, prev_seg = dt_ref[0, 0], seg_ref[0], prev_ref[0, 0][:, 0:1]
  _, _, _, _, _, from_state, _, carry = _chunk_decays(a_ref[head], dt, seg, prev_seg, q)
  cm = c_ref[0, 0]
  dy = dy_ref[0, 0].astype(jnp.float32)
  grad = carry * grad + _dot((dy * from_state).astype(cm.dtype), cm, ((0,), (0,)))
  grad_ref[...] = grad

  @pl.when(step == num_chunks - 1)
  def _():
    dinit_ref[0, 0] = grad


def _chunk_grad_kernel(a_ref, x_ref, dt_ref, b_ref, c_ref, seg_ref, prev_ref, states_ref,
                       dstates_ref, dy_ref, dx_ref, ddt_ref, dlog_ref, db_ref, dc_ref, *, rep):
  """Grid (batch, chunk, head): every gradient of one head's chunk from S_{c-1} and G_c. The
  heads of a group are consecutive steps writing the same dB / dC block, which sums them."""
  head = pl.program_id(2)
  q = x_ref.shape[2]
  cdt = x_ref.dtype                 # products in the inputs' dtype, as the forward kernel
  x = x_ref[0, 0].astype(jnp.float32)                              # [q, p]
  dy_c = dy_ref[0, 0].astype(cdt)
  dy = dy_c.astype(jnp.float32)
  bm = b_ref[0, 0]                                                 # [q, n] cdt
  cm = c_ref[0, 0]
  dt, seg, prev_seg = dt_ref[0, 0], seg_ref[0], prev_ref[0, 0][:, 0:1]
  s_in, g_out = states_ref[0, 0, 0], dstates_ref[0, 0, 0]          # [p, n]
  a = a_ref[head]
  rows, cols, _, cum_col, seg_col, from_state, to_end, carry = _chunk_decays(
      a, dt, seg, prev_seg, q)
  inside = (rows >= cols) & (seg_col == seg)
  lmat = jnp.where(inside, jnp.exp(jnp.where(inside, cum_col - jnp.transpose(cum_col), 0.0)),
                   0.0)
  dt_col = jnp.transpose(dt)
  xdt = x * dt_col
  xdt_c = xdt.astype(cdt)
  cb = _dot(cm, bm, ((1,), (1,)))
  d_cb = _dot(dy_c, xdt_c, ((1,), (1,))) * lmat                    # dLoss/d(C B^T)
  d_cb_c = d_cb.astype(cdt)
  bg = _dot(bm, g_out.astype(cdt), ((1,), (1,)))                   # [q, p]
  d_xdt = _dot((cb * lmat).astype(cdt), dy_c, ((0,), (0,))) + to_end * bg
  dy_s = _dot(dy_c, s_in.astype(cdt), ((1,), (0,)))                # [q, n]
  dc = _dot(d_cb_c, bm, ((1,), (0,))) + from_state * dy_s
  db = (_dot(d_cb_c, cm, ((0,), (0,)))
        + to_end * _dot(xdt_c, g_out.astype(cdt), ((1,), (0,))))
  m = cb * d_cb
  v = to_end * jnp.sum(xdt * bg, axis=1, keepdims=True)            # [q, 1]
  d_cum = (jnp.sum(m, axis=1, keepdims=True) - jnp.transpose(jnp.sum(m, axis=0, keepdims=True))
           + from_state * jnp.sum(cm.astype(jnp.float32) * dy_s, axis=1, keepdims=True) - v)
  d_last = jnp.sum(v, keepdims=True) + carry * jnp.sum(g_out * s_in, keepdims=True)   # (1, 1)
  last_row = jax.lax.broadcasted_iota(jnp.int32, (q, 1), 0) == q - 1
  d_cum = jnp.transpose(d_cum + jnp.where(last_row, d_last, 0.0))  # [1, q]
  d_log = _dot(d_cum, (rows >= cols).astype(jnp.float32), ((1,), (0,)))  # reverse cumsum
  dx_ref[0, 0] = (d_xdt * dt_col).astype(dx_ref.dtype)
  ddt_ref[0, 0] = d_log * a + jnp.transpose(jnp.sum(d_xdt * x, axis=1, keepdims=True))
  dlog_ref[0, 0] = d_log * dt                                      # summed into dA outside

  @pl.when(head % rep == 0)
  def _():
    db_ref[0, 0] = db
    dc_ref[0, 0] = dc

  @pl.when(head % rep != 0)
  def _():
    db_ref[0, 0] += db
    dc_ref[0, 0] += dc


def ssd_backward_tpu(x, dt, A, B, C, initial_state, segment_ids, dy, dfinal, *,
                     block_sizes: BlockSizes = BlockSizes(),
                     interpret: bool | pltpu.InterpretParams = False):
  """Gradients (dx, ddt, dA, dB, dC, d initial_state) of the chunked SSD, in three Mosaic
  kernels: the states entering each chunk (forward kernel), their gradients (reverse), and
  every input's gradient per chunk. Shapes as ssd_forward_tpu; dy like y, dfinal like the
  final state."""
  b, l, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  rep, q = h // g, block_sizes.chunk
  check_chunk(q, interpret)
  xt, dtt, bt, ct, seg, prev = _layout(x, dt, B, C, segment_ids, q)
  dyt = jnp.transpose(jnp.pad(dy, ((0, 0), (0, (-l) % q), (0, 0), (0, 0))), (0, 2, 1, 3))
  lp = xt.shape[2]
  nc = lp // q
  a32 = A.astype(jnp.float32)
  init = (jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
  (states,) = _forward_call(A, xt, dtt, bt, ct, seg, init, q=q, emit_states=True,
                            interpret=interpret)
  smem = pl.BlockSpec(memory_space=pltpu.SMEM)
  state_spec = pl.BlockSpec((1, 1, p, n), lambda i, j, c: (i, j, 0, 0))

  flip = lambda c: nc - 1 - c
  x_spec, dt_spec, bc_spec, seg_spec = _specs(q, p, n, rep, flip)
  prev_spec = pl.BlockSpec((1, 1, 1, 128), lambda i, j, c: (i, flip(c), 0, 0))
  chunk_state_spec = pl.BlockSpec((1, 1, 1, p, n), lambda i, j, c: (i, j, flip(c), 0, 0))
  dstates, dinit = pl.pallas_call(
      _state_grad_kernel, grid=(b, h, nc),
      out_shape=[jax.ShapeDtypeStruct((b, h, nc, p, n), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)],
      in_specs=[smem, dt_spec, bc_spec, seg_spec, prev_spec, x_spec, state_spec],
      out_specs=[chunk_state_spec, state_spec],
      scratch_shapes=[pltpu.VMEM((p, n), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=_interpret(interpret),
  )(a32, dtt, ct, seg, prev, dyt, dfinal.astype(jnp.float32))

  # Grid (batch, chunk, head): the head axis is innermost so a group's dB / dC accumulate.
  x_spec = pl.BlockSpec((1, 1, q, p), lambda i, c, j: (i, j, c, 0))
  dt_spec = pl.BlockSpec((1, 1, 1, q), lambda i, c, j: (i, j, 0, c))
  bc_spec = pl.BlockSpec((1, 1, q, n), lambda i, c, j: (i, j // rep, c, 0))
  seg_spec = pl.BlockSpec((1, 1, q), lambda i, c, j: (i, 0, c))
  prev_spec = pl.BlockSpec((1, 1, 1, 128), lambda i, c, j: (i, c, 0, 0))
  chunk_state_spec = pl.BlockSpec((1, 1, 1, p, n), lambda i, c, j: (i, j, c, 0, 0))
  dx, ddt, dlog, db, dc = pl.pallas_call(
      functools.partial(_chunk_grad_kernel, rep=rep), grid=(b, nc, h),
      out_shape=[jax.ShapeDtypeStruct(xt.shape, x.dtype),
                 jax.ShapeDtypeStruct(dtt.shape, jnp.float32),
                 jax.ShapeDtypeStruct(dtt.shape, jnp.float32),
                 jax.ShapeDtypeStruct(bt.shape, jnp.float32),
                 jax.ShapeDtypeStruct(ct.shape, jnp.float32)],
      in_specs=[smem, x_spec, dt_spec, bc_spec, bc_spec, seg_spec, prev_spec,
                chunk_state_spec, chunk_state_spec, x_spec],
      out_specs=[x_spec, dt_spec, dt_spec, bc_spec, bc_spec],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=_interpret(interpret),
  )(a32, xt, dtt, bt, ct, seg, prev, states, dstates, dyt)
  unlayout = lambda t: jnp.transpose(t, (0, 2, 1, 3))[:, :l]
  return (unlayout(dx), jnp.transpose(ddt[:, :, 0], (0, 2, 1))[:, :l],
          dlog.sum((0, 2, 3)), unlayout(db), unlayout(dc), dinit)


# statics: (block_sizes, interpret); arrays: x, dt, A, B, C, initial_state | segment_ids.
_ssd = kernel_vjp(
    lambda st, *arrays: (ssd_forward_tpu(*arrays, block_sizes=st[0], interpret=st[1]), ()),
    lambda st, arrays, _, cot: ssd_backward_tpu(*arrays, *cot, block_sizes=st[0],
                                                interpret=st[1]),
    differentiable=6)


def ssd_tpu(x, dt, A, B, C, initial_state=None, segment_ids=None, *,
            block_sizes: BlockSizes = BlockSizes.for_backend("tpu"),
            interpret: bool | pltpu.InterpretParams = False):
  """Differentiable chunked SSD on the Mosaic kernels (forward and backward); arguments and
  results as ssd_forward_tpu."""
  b, l, h, p = x.shape
  n = B.shape[3]
  init = (jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
  seg = (jnp.zeros((b, l), jnp.int32) if segment_ids is None
         else segment_ids.astype(jnp.int32))
  return _ssd((block_sizes, interpret), x, dt, A, B, C, init, seg)
