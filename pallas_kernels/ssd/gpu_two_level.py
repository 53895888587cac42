"""Chunk-parallel SSD forward and state passes (Pallas Triton, GPU), for few (batch, head) pairs.

The sequential kernels of gpu.py run one program per (batch, head, head_dim block) through all
chunks; at 2 x 16384 tokens and 24 heads that is 48 pairs, which cannot fill 132 SMs even with
head_dim split. Here the work with a [Q, Q] tile or a [Q, p] x [Q, n] product runs with one
program per chunk, and only a light pass stays sequential:

  _chunk_state_kernel  grid (batch, heads, chunks): each chunk's own contribution to the state
                       after it, U_c = (x dt e^{cum_last - cum})^T B (from a zero state), or for
                       the backward V_c = (dy e^{cum})^T C, the contribution to the gradient of
                       the state before it. fp32 [b, h, chunks, p, n].
  _passing_kernel      grid (batch, heads, head_dim blocks): S_c = e^{cum_last} S_{c-1} + U_c in
                       chunk order (G_{c-1} = e^{cum_last} G_c + V_c in reverse), writing the
                       state entering (the gradient leaving) every chunk: elementwise work on
                       [p, n] per chunk, no matmul.
  _chunk_output_kernel grid (batch, heads, chunks): y of a chunk from the state entering it,
                       y = ((C B^T) * L) (x dt) + e^{cum} (C S_{c-1}^T).

The sums are those of the sequential kernels, grouped differently; the states are stored in
the input dtype, as the backward stores them, and U, V in fp32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ssd.gpu_common import (F32, block_p, chunk_rows, compiler_params, decays,
                                           dot, grad_before, intra_mask, out_struct,
                                           state_after, widen)

# batch * heads below which `BlockSizes.two_level=None` takes these kernels: one sequential
# program per pair (head_dim split up to 4 ways) leaves SMs of a 132-SM H100 idle below about
# this. Set from that count, not yet from a timing.
TWO_LEVEL_BELOW = 96


def _chunk_program(a_ref, rep, chunk):
  bi, hi, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  return bi, hi, hi // rep, c, a_ref[hi].astype(F32), jnp.arange(chunk, dtype=jnp.int32)


def _chunk_state_kernel(a_ref, v_ref, dt_ref, k_ref, seg_ref, u_ref, *, seq_len, chunk, rep,
                        grad):
  bi, hi, gi, c, a, r = _chunk_program(a_ref, rep, chunk)
  p, n = u_ref.shape[3], u_ref.shape[4]
  zero = jnp.zeros((p, n), F32)
  step = grad_before if grad else state_after
  u = step(zero, c * chunk, v_ref, dt_ref, k_ref, seg_ref, bi, hi, gi, pl.ds(0, p), a, r,
           seq_len)
  plgpu.store(u_ref.at[bi, hi, c, :, :], u)


def _passing_kernel(a_ref, dt_ref, seg_ref, u_ref, init_ref, states_ref, final_ref, *, seq_len,
                    chunk, block_p, reverse):
  bi, hi, pi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  ps = pl.ds(pi * block_p, block_p)
  a = a_ref[hi].astype(F32)
  r = jnp.arange(chunk, dtype=jnp.int32)
  num_chunks = pl.cdiv(seq_len, chunk)

  def body(k, state):
    c = num_chunks - 1 - k if reverse else k
    plgpu.store(states_ref.at[bi, hi, c, ps, :], state.astype(states_ref.dtype))
    valid, seg, prev_seg = chunk_rows(seg_ref, bi, c * chunk, r, seq_len)
    dt = plgpu.load(dt_ref.at[bi, pl.ds(c * chunk, chunk), hi], mask=valid,
                    other=0.0).astype(F32)
    carry = decays(dt, a, seg, prev_seg, r)[3]
    return carry * state + plgpu.load(u_ref.at[bi, hi, c, ps, :])

  state = plgpu.load(init_ref.at[bi, hi, ps, :]).astype(F32)
  state = jax.lax.fori_loop(0, num_chunks, body, state)
  plgpu.store(final_ref.at[bi, hi, ps, :], state)


def _chunk_output_kernel(a_ref, x_ref, dt_ref, b_ref, c_ref, seg_ref, states_ref, y_ref, *,
                         seq_len, chunk, rep):
  bi, hi, gi, c, a, r = _chunk_program(a_ref, rep, chunk)
  dtype = x_ref.dtype
  start = c * chunk
  valid, seg, prev_seg = chunk_rows(seg_ref, bi, start, r, seq_len)
  rows = pl.ds(start, chunk)
  dt = plgpu.load(dt_ref.at[bi, rows, hi], mask=valid, other=0.0).astype(F32)
  x = plgpu.load(x_ref.at[bi, rows, hi, :], mask=valid[:, None], other=0.0)
  bm = plgpu.load(b_ref.at[bi, rows, gi, :], mask=valid[:, None], other=0.0)
  cm = plgpu.load(c_ref.at[bi, rows, gi, :], mask=valid[:, None], other=0.0)
  state = plgpu.load(states_ref.at[bi, hi, c, :, :])
  cum, from_state, _, _ = decays(dt, a, seg, prev_seg, r)
  xdt = (x.astype(F32) * dt[:, None]).astype(dtype)
  scores = (dot(cm, bm, trans_b=True) * intra_mask(cum, seg, r)).astype(dtype)
  y = dot(scores, xdt) + dot(cm, state.astype(dtype), trans_b=True) * from_state[:, None]
  plgpu.store(y_ref.at[bi, rows, hi, :], y.astype(y_ref.dtype), mask=valid[:, None])


def _chunk_states(v, dt, A, k, segment_ids, *, chunk, block_sizes, interpret, grad, backward):
  """U_c (or V_c with grad) for every chunk: fp32 [b (widened), h, chunks, p, n]."""
  b, l, h, p = v.shape
  g, n = k.shape[2:]
  nc = pl.cdiv(l, chunk)
  kernel = functools.partial(_chunk_state_kernel, seq_len=l, chunk=chunk, rep=h // g,
                             grad=grad)
  return pl.pallas_call(
      kernel, grid=(b, h, nc), out_shape=out_struct((b, h, nc, p, n), F32),
      compiler_params=compiler_params(block_sizes, backward), interpret=interpret,
      name="ssd_chunk_state_grad" if grad else "ssd_chunk_state",
  )(A, *map(widen, (v, dt, k, segment_ids)))


def _pass(dt, A, segment_ids, u, init, *, chunk, dtype, block_sizes, interpret, reverse,
          backward):
  """(the state entering / gradient leaving every chunk [b, h, chunks, p, n] in dtype, the
  final state / initial state's gradient [b, h, p, n] fp32), batch widened."""
  b, l, h = dt.shape
  p, n = init.shape[2:]
  bp = block_p(p, block_sizes, b * h)
  kernel = functools.partial(_passing_kernel, seq_len=l, chunk=chunk, block_p=bp,
                             reverse=reverse)
  return pl.pallas_call(
      kernel, grid=(b, h, p // bp), compiler_params=compiler_params(block_sizes, backward),
      interpret=interpret,
      out_shape=[out_struct((b, h, pl.cdiv(l, chunk), p, n), dtype),
                 out_struct((b, h, p, n), F32)],
      name="ssd_state_passing",
  )(A, *map(widen, (dt, segment_ids, u, init.astype(F32))))


def forward(x, dt, A, B, C, initial_state, segment_ids, *, chunk, block_sizes, interpret,
            emit_states):
  """As gpu.ssd_forward_gpu: [y, final state], or [states] with emit_states."""
  b, l, h, p = x.shape
  g = B.shape[2]
  common = dict(chunk=chunk, block_sizes=block_sizes, interpret=interpret, backward=emit_states)
  u = _chunk_states(x, dt, A, B, segment_ids, grad=False, **common)
  states, final = _pass(dt, A, segment_ids, u, initial_state, dtype=x.dtype, reverse=False,
                        **common)
  if emit_states:
    return [states[:b]]
  kernel = functools.partial(_chunk_output_kernel, seq_len=l, chunk=chunk, rep=h // g)
  y = pl.pallas_call(
      kernel, grid=(b, h, pl.cdiv(l, chunk)), out_shape=out_struct(x.shape, x.dtype),
      compiler_params=compiler_params(block_sizes), interpret=interpret,
      name="ssd_chunk_output",
  )(A, *map(widen, (x, dt, B, C, segment_ids, states)))
  return [y[:b], final[:b]]


def state_grads(dt, A, C, segment_ids, dy, dfinal, *, chunk, block_sizes, interpret):
  """As gpu.ssd_state_grads_gpu: (G_c for every chunk, d initial_state)."""
  b = dt.shape[0]
  common = dict(chunk=chunk, block_sizes=block_sizes, interpret=interpret, backward=True)
  v = _chunk_states(dy, dt, A, C, segment_ids, grad=True, **common)
  dstates, dinit = _pass(dt, A, segment_ids, v, dfinal, dtype=dy.dtype, reverse=True, **common)
  return dstates[:b], dinit[:b]
