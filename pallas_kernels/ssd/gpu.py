"""Chunked SSD, forward and backward, as fused Pallas Triton kernels (GPU).

Per head the recurrence is S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t, with
S: [head_dim, d_state]. Rows of S never mix, so head_dim splits across programs freely.

  _forward_kernel     grid (batch, heads, head_dim blocks). Chunks run in order inside one
                      program with the fp32 state in registers, so x, B, C are read once and
                      y written once; nothing of size [chunks, head_dim, d_state] touches
                      memory. For the backward it writes the state entering each chunk instead.
  _state_grad_kernel  the same grid, chunks in reverse: G_c = dLoss/dS_c (S_c the state after
                      chunk c) for every chunk; G before chunk 0 is the initial state's gradient.
  _chunk_grad_kernel  grid (batch, sub-chunks, groups). The states and their gradients are
                      stored per chunk of chunk_bwd positions; a program takes chunk_grad of
                      them (a sub-chunk), carries the stored state forward over the sub-chunks
                      before its own and the stored gradient back over those after it, and
                      then every gradient of its rows is local. The heads of a group run in a
                      loop inside the program so dB and dC sum over heads in registers, not
                      through memory or atomics; the [Q, Q] gradient of C B^T is summed over
                      the heads first and meets B and C once.
With few (batch, head) pairs the sequential kernels leave SMs idle; gpu_two_level.py holds
the chunk-parallel forward and state passes used then (BlockSizes.two_level).

The per-chunk arithmetic is in gpu_common.py. Matmul inputs are in the input dtype (bf16 runs
the tensor cores) with fp32 accumulation; decays, cumsums and the carried state are fp32.

Flat offsets: Pallas Triton switches to 64-bit offsets only for arrays of more than 2**32
elements, and 32-bit ones wrap past 2**31; arrays of 2**31..2**32 elements are padded with
unused batch rows into the 64-bit range (gpu_common.wide_batch).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.custom_vjp import kernel_vjp
from pallas_kernels.ssd import gpu_two_level
from pallas_kernels.ssd.common import BlockSizes
from pallas_kernels.ssd.gpu_common import F32 as _F32
from pallas_kernels.ssd.gpu_common import (block_p, chunk_rows, compiler_params, decays, dot,
                                           grad_before, intra_mask, out_struct, state_after,
                                           widen)


def _sequential_program(a_ref, bp, rep, chunk):
  """Grid (batch, head, head_dim block): batch and head ids, the head's group, its head_dim
  rows, its decay rate A (fp32) and the row offsets of a chunk."""
  bi, hi, pi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  return (bi, hi, hi // rep, pl.ds(pi * bp, bp), a_ref[hi].astype(_F32),
          jnp.arange(chunk, dtype=jnp.int32))


def _forward_kernel(a_ref, x_ref, dt_ref, b_ref, c_ref, seg_ref, init_ref, *out_refs,
                    seq_len, chunk, block_p, rep, emit_states):
  bi, hi, gi, ps, a, r = _sequential_program(a_ref, block_p, rep, chunk)
  dtype = x_ref.dtype
  state = plgpu.load(init_ref.at[bi, hi, ps, :]).astype(_F32)             # [Pb, n]

  def body(c, state):
    start = c * chunk
    if emit_states:
      (states_ref,) = out_refs
      plgpu.store(states_ref.at[bi, hi, c, ps, :], state.astype(states_ref.dtype))
      return state_after(state, start, x_ref, dt_ref, b_ref, seg_ref, bi, hi, gi, ps, a, r,
                          seq_len)
    valid, seg, prev_seg = chunk_rows(seg_ref, bi, start, r, seq_len)
    rows = pl.ds(start, chunk)
    dt = plgpu.load(dt_ref.at[bi, rows, hi], mask=valid, other=0.0).astype(_F32)
    x = plgpu.load(x_ref.at[bi, rows, hi, ps], mask=valid[:, None], other=0.0)
    bm = plgpu.load(b_ref.at[bi, rows, gi, :], mask=valid[:, None], other=0.0)
    cm = plgpu.load(c_ref.at[bi, rows, gi, :], mask=valid[:, None], other=0.0)
    cum, from_state, to_end, carry = decays(dt, a, seg, prev_seg, r)
    xdt = x.astype(_F32) * dt[:, None]
    y_ref = out_refs[0]
    scores = (dot(cm, bm, trans_b=True) * intra_mask(cum, seg, r)).astype(dtype)
    y = dot(scores, xdt.astype(dtype))
    y += dot(cm, state.astype(dtype), trans_b=True) * from_state[:, None]
    plgpu.store(y_ref.at[bi, rows, hi, ps], y.astype(y_ref.dtype), mask=valid[:, None])
    contrib = dot((xdt * to_end[:, None]).astype(dtype), bm, trans_a=True)    # [Pb, n]
    return carry * state + contrib

  state = jax.lax.fori_loop(0, pl.cdiv(seq_len, chunk), body, state)
  if not emit_states:
    plgpu.store(out_refs[1].at[bi, hi, ps, :], state)


def _state_grad_kernel(a_ref, dt_ref, c_ref, seg_ref, dy_ref, dfinal_ref, dstates_ref,
                       dinit_ref, *, seq_len, chunk, block_p, rep):
  bi, hi, gi, ps, a, r = _sequential_program(a_ref, block_p, rep, chunk)
  num_chunks = pl.cdiv(seq_len, chunk)
  grad = plgpu.load(dfinal_ref.at[bi, hi, ps, :]).astype(_F32)            # [Pb, n]

  def body(k, grad):
    c = num_chunks - 1 - k
    plgpu.store(dstates_ref.at[bi, hi, c, ps, :], grad.astype(dstates_ref.dtype))
    return grad_before(grad, c * chunk, dy_ref, dt_ref, c_ref, seg_ref, bi, hi, gi, ps, a, r,
                        seq_len)

  grad = jax.lax.fori_loop(0, num_chunks, body, grad)
  plgpu.store(dinit_ref.at[bi, hi, ps, :], grad)


def _chunk_grad_kernel(a_ref, x_ref, dt_ref, b_ref, c_ref, seg_ref, states_ref, dstates_ref,
                       dy_ref, dx_ref, ddt_ref, da_ref, db_ref, dc_ref, *, seq_len, chunk, ratio,
                       rep, heads):
  """One sub-chunk of `chunk` rows; the states are stored per `ratio` sub-chunks."""
  bi, ci = pl.program_id(0), pl.program_id(1)
  splits = rep // heads                      # programs sharing a group; dB, dC summed after
  gi, si = pl.program_id(2) // splits, pl.program_id(2) % splits
  dtype = x_ref.dtype
  r = jnp.arange(chunk, dtype=jnp.int32)
  start = ci * chunk
  rows = pl.ds(start, chunk)
  valid, seg, prev_seg = chunk_rows(seg_ref, bi, start, r, seq_len)
  bm = plgpu.load(b_ref.at[bi, rows, gi, :], mask=valid[:, None], other=0.0)
  cm = plgpu.load(c_ref.at[bi, rows, gi, :], mask=valid[:, None], other=0.0)
  cb = dot(cm, bm, trans_b=True)                                          # [Q, Q], per group
  cs = ci // ratio                                                        # the stored chunk
  all_p = pl.ds(0, x_ref.shape[3])

  def head(k, acc):
    db, dc, d_cb_sum = acc
    hi = gi * rep + si * heads + k
    a = a_ref[hi].astype(_F32)
    s_in = plgpu.load(states_ref.at[bi, hi, cs, :, :])                    # S before [p, n]
    g_out = plgpu.load(dstates_ref.at[bi, hi, cs, :, :])                  # G after  [p, n]
    if ratio > 1:
      # Carry the stored state over the sub-chunks before this one, and the stored gradient
      # back over those after it (at most ratio - 1 steps in all).
      s_in = jax.lax.fori_loop(
          cs * ratio, ci, lambda j, s: state_after(
              s, j * chunk, x_ref, dt_ref, b_ref, seg_ref, bi, hi, gi, all_p, a, r, seq_len),
          s_in.astype(_F32)).astype(s_in.dtype)
      end = jnp.minimum((cs + 1) * ratio, pl.cdiv(seq_len, chunk)) - 1    # last sub-chunk
      g_out = jax.lax.fori_loop(
          0, end - ci, lambda j, gr: grad_before(
              gr, (end - j) * chunk, dy_ref, dt_ref, c_ref, seg_ref, bi, hi, gi, all_p, a, r,
              seq_len),
          g_out.astype(_F32)).astype(g_out.dtype)
      # Back in the stored dtype, as the states read at ratio 1: two fp32 [p, n] tiles left
      # live through the products below spill registers (ptxas, sm_90, bf16: 1352 bytes of
      # stack at 4 warps before this cast).
    dt = plgpu.load(dt_ref.at[bi, rows, hi], mask=valid, other=0.0).astype(_F32)
    x = plgpu.load(x_ref.at[bi, rows, hi, :], mask=valid[:, None], other=0.0)
    dy = plgpu.load(dy_ref.at[bi, rows, hi, :], mask=valid[:, None], other=0.0)
    cum, from_state, to_end, carry = decays(dt, a, seg, prev_seg, r)
    lmat = intra_mask(cum, seg, r)
    xdt32 = x.astype(_F32) * dt[:, None]
    xdt = xdt32.astype(dtype)
    scores = (cb * lmat).astype(dtype)
    d_scores = dot(dy, xdt, trans_b=True)                                 # dy_i . xdt_j
    d_cb = d_scores * lmat
    bg = dot(bm, g_out.astype(dtype), trans_b=True)                       # [Q, p]
    d_xdt = dot(scores, dy, trans_a=True) + to_end[:, None] * bg
    dy_s = dot(dy, s_in.astype(dtype))                                    # [Q, n]
    dc += from_state[:, None] * dy_s
    db += to_end[:, None] * dot(xdt, g_out.astype(dtype))
    # d/d cum: the intra-chunk decays, the incoming state's decay, the decays to the end.
    m = cb * d_cb
    v = to_end * jnp.sum(xdt32 * bg, axis=1)
    d_cum = (jnp.sum(m, axis=1) - jnp.sum(m, axis=0)
             + from_state * jnp.sum(cm.astype(_F32) * dy_s, axis=1) - v)
    d_last = jnp.sum(v) + carry * jnp.sum(g_out.astype(_F32) * s_in.astype(_F32))
    d_cum += jnp.where(r == chunk - 1, d_last, 0.0)
    d_logdecay = jnp.sum(d_cum) - jax.lax.cumsum(d_cum, axis=0) + d_cum   # reverse cumsum
    d_dt = d_logdecay * a + jnp.sum(d_xdt * x.astype(_F32), axis=1)
    plgpu.store(dx_ref.at[bi, rows, hi, :], (d_xdt * dt[:, None]).astype(dx_ref.dtype),
                mask=valid[:, None])
    plgpu.store(ddt_ref.at[bi, rows, hi], d_dt, mask=valid)
    plgpu.store(da_ref.at[bi, ci, hi], jnp.sum(d_logdecay * dt))
    return db, dc, d_cb_sum + d_cb

  n = bm.shape[1]
  zeros = jnp.zeros((chunk, n), _F32)
  db, dc, d_cb_sum = jax.lax.fori_loop(0, heads, head,
                                       (zeros, zeros, jnp.zeros((chunk, chunk), _F32)))
  # The heads of a group share B and C, so their [Q, Q] gradients of C B^T add up before
  # the two products with B and C: two dots per program instead of two per head.
  d_cb_sum = d_cb_sum.astype(dtype)
  dc += dot(d_cb_sum, bm)
  db += dot(d_cb_sum, cm, trans_a=True)
  plgpu.store(db_ref.at[si, bi, rows, gi, :], db, mask=valid[:, None])
  plgpu.store(dc_ref.at[si, bi, rows, gi, :], dc, mask=valid[:, None])


def _check(x, B, block_sizes):
  p, n = x.shape[-1], B.shape[-1]
  for name, v in (("head_dim", p), ("d_state", n), ("block_p", block_sizes.block_p or p)):
    if v < 16 or v & (v - 1):
      raise ValueError(f"the GPU SSD kernel needs {name} a power of two >= 16, got {v}; "
                       "use the reference implementation for this shape")
  if p % (block_sizes.block_p or p):
    raise ValueError(f"block_p={block_sizes.block_p} does not divide head_dim={p}")


def _two_level(block_sizes, programs):
  if block_sizes.two_level is None:
    return programs < gpu_two_level.TWO_LEVEL_BELOW
  return block_sizes.two_level


def ssd_forward_gpu(x, dt, A, B, C, initial_state, segment_ids, *,
                    block_sizes: BlockSizes, interpret: bool = False, emit_states=False):
  """y [b, l, h, p] (x.dtype) and final state [b, h, p, n] fp32; or, with emit_states, the
  state entering each chunk of chunk_bwd positions [b, h, chunks, p, n] (x.dtype)."""
  b, l, h, p = x.shape
  g, n = B.shape[2:]
  q = block_sizes.chunk_bwd if emit_states else block_sizes.chunk
  if _two_level(block_sizes, b * h):
    return gpu_two_level.forward(x, dt, A, B, C, initial_state, segment_ids, chunk=q,
                                 block_sizes=block_sizes, interpret=interpret,
                                 emit_states=emit_states)
  bp = block_p(p, block_sizes, b * h)
  nc = pl.cdiv(l, q)
  if emit_states:
    out_shape = [out_struct((b, h, nc, p, n), x.dtype)]
  else:
    out_shape = [out_struct(x.shape, x.dtype), out_struct((b, h, p, n), _F32)]
  kernel = functools.partial(_forward_kernel, seq_len=l, chunk=q, block_p=bp, rep=h // g,
                             emit_states=emit_states)
  outs = pl.pallas_call(kernel, out_shape=out_shape, grid=(b, h, p // bp),
                        compiler_params=compiler_params(block_sizes, emit_states),
                        interpret=interpret, name="ssd_states" if emit_states else "ssd_forward",
                        )(A, *map(widen, (x, dt, B, C, segment_ids, initial_state)))
  return [o[:b] for o in outs]


def ssd_state_grads_gpu(dt, A, C, segment_ids, dy, dfinal, *, head_dim, block_sizes,
                        interpret=False):
  """G_c = dLoss/dS_c for every chunk of chunk_bwd positions [b, h, chunks, p, n] (dy.dtype)
  and d initial_state."""
  b, l, h = dt.shape
  g, n = C.shape[2:]
  q, p = block_sizes.chunk_bwd, head_dim
  if _two_level(block_sizes, b * h):
    return gpu_two_level.state_grads(dt, A, C, segment_ids, dy, dfinal, chunk=q,
                                     block_sizes=block_sizes, interpret=interpret)
  bp = block_p(p, block_sizes, b * h)
  kernel = functools.partial(_state_grad_kernel, seq_len=l, chunk=q, block_p=bp, rep=h // g)
  dstates, dinit = pl.pallas_call(
      kernel, grid=(b, h, p // bp), compiler_params=compiler_params(block_sizes, True),
      interpret=interpret,
      out_shape=[out_struct((b, h, pl.cdiv(l, q), p, n), dy.dtype),
                 out_struct((b, h, p, n), _F32)],
      name="ssd_state_grad",
  )(A, *map(widen, (dt, C, segment_ids, dy, dfinal.astype(_F32))))
  return dstates[:b], dinit[:b]


def ssd_chunk_grads_gpu(x, dt, A, B, C, segment_ids, states, dstates, dy, *, block_sizes,
                        interpret=False):
  """(dx, ddt, dA, dB, dC) from the states entering and the state gradients leaving the
  chunks of chunk_bwd positions, in programs of chunk_grad positions."""
  b, l, h, p = x.shape
  g, n = B.shape[2:]
  q, rep = block_sizes.chunk_grad or block_sizes.chunk_bwd, h // g
  heads = min(block_sizes.heads_per_program or rep, rep)
  if rep % heads:
    raise ValueError(f"heads_per_program={heads} does not divide the {rep} heads of a group")
  nc, splits = pl.cdiv(l, q), rep // heads
  kernel = functools.partial(_chunk_grad_kernel, seq_len=l, chunk=q,
                             ratio=block_sizes.chunk_bwd // q, rep=rep, heads=heads)
  part = lambda shape: jax.ShapeDtypeStruct((splits, *shape), _F32)
  dx, ddt, da, db, dc = pl.pallas_call(
      kernel, grid=(b, nc, g * splits), compiler_params=compiler_params(block_sizes, True),
      interpret=interpret,
      out_shape=[out_struct(x.shape, x.dtype), out_struct((b, l, h), _F32),
                 out_struct((b, nc, h), _F32), part(B.shape), part(C.shape)],
      name="ssd_chunk_grad",
  )(A, *map(widen, (x, dt, B, C, segment_ids, states, dstates, dy)))
  return dx[:b], ddt[:b], da[:b].sum((0, 1)), db.sum(0), dc.sum(0)


def ssd_backward_gpu(x, dt, A, B, C, initial_state, segment_ids, dy, dfinal, *,
                     block_sizes: BlockSizes, interpret: bool = False):
  """Gradients (dx, ddt, dA, dB, dC, d initial_state) of the chunked SSD."""
  dy = dy.astype(x.dtype)
  (states,) = ssd_forward_gpu(x, dt, A, B, C, initial_state, segment_ids,
                              block_sizes=block_sizes, interpret=interpret, emit_states=True)
  dstates, dinit = ssd_state_grads_gpu(dt, A, C, segment_ids, dy, dfinal, head_dim=x.shape[3],
                                       block_sizes=block_sizes, interpret=interpret)
  dx, ddt, da, db, dc = ssd_chunk_grads_gpu(x, dt, A, B, C, segment_ids, states, dstates, dy,
                                            block_sizes=block_sizes, interpret=interpret)
  return dx, ddt, da, db, dc, dinit


# statics: (block_sizes, interpret); arrays: x, dt, A, B, C, initial_state | segment_ids.
_ssd = kernel_vjp(
    lambda st, *arrays: (ssd_forward_gpu(*arrays, block_sizes=st[0], interpret=st[1]), ()),
    lambda st, arrays, _, cot: ssd_backward_gpu(*arrays, *cot, block_sizes=st[0],
                                                interpret=st[1]),
    differentiable=6)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def ssd_gpu(x, dt, A, B, C, initial_state=None, segment_ids=None, *,
            block_sizes: BlockSizes = BlockSizes.for_backend("gpu"), interpret: bool = False):
  """Chunked SSD with its Pallas Triton forward and backward (differentiable).

  Args:
    x: [batch, seq, heads, head_dim] (fp32 or bf16); dt: [batch, seq, heads] (softplus'd);
    A: [heads] (< 0); B, C: [batch, seq, groups, d_state] with heads % groups == 0.
    initial_state: optional [batch, heads, head_dim, d_state].
    segment_ids: optional [batch, seq] int, each id one contiguous run; the state resets
      where it changes and the initial state belongs to the first id.
    block_sizes: chunk lengths, head_dim split and Triton launch parameters.
    interpret: run in Pallas interpret mode (any backend, for tests).

  head_dim and d_state must be powers of two >= 16; seq may be anything.

  Returns:
    y [batch, seq, heads, head_dim] in x.dtype, final state [batch, heads, head_dim, d_state]
    fp32.
  """
  b, l, h, p = x.shape
  g, n = B.shape[2:]
  if h % g:
    raise ValueError(f"heads={h} is not a multiple of groups={g}")
  _check(x, B, block_sizes)
  init = (jnp.zeros((b, h, p, n), _F32) if initial_state is None
          else initial_state.astype(_F32))
  seg = (jnp.zeros((b, l), jnp.int32) if segment_ids is None
         else segment_ids.astype(jnp.int32))
  return _ssd((block_sizes, interpret), x, dt, A, B, C, init, seg)
