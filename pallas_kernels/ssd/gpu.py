"""Chunked SSD, forward and backward, as fused Pallas Triton kernels (GPU).

Per head the recurrence is S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t, with
S: [head_dim, d_state]. Rows of S never mix, so head_dim splits across programs freely.

  _forward_kernel     grid (batch, heads, head_dim blocks). Chunks run in order inside one
                      program with the fp32 state in registers, so x, B, C are read once and
                      y written once; nothing of size [chunks, head_dim, d_state] touches
                      memory. For the backward it writes the state entering each chunk instead.
  _state_grad_kernel  the same grid, chunks in reverse: G_c = dLoss/dS_c (S_c the state after
                      chunk c) for every chunk; G before chunk 0 is the initial state's gradient.
  _chunk_grad_kernel  grid (batch, chunks, groups). With S_{c-1} and G_c known, every gradient
                      of a chunk is local. The heads of a group run in a loop inside the program
                      so dB and dC sum over heads in registers, not through memory or atomics.

Inside a chunk of Q positions (cum = inclusive cumsum of dt A, e = exp):
  y      = ((C B^T) * L) (x dt) + e^{cum} * (C S_{c-1}^T)       L_ij = e^{cum_i - cum_j}, j <= i
  S_c    = e^{cum_last} S_{c-1} + (x dt * e^{cum_last - cum})^T B
Positions of another segment (packed documents) than the state's are masked out of each
term. Matmul inputs are in the input dtype (bf16 runs the tensor cores) with fp32 accumulation;
decays, cumsums and the carried state are fp32.

Flat offsets: Pallas Triton switches to 64-bit offsets only for arrays of more than 2**32
elements, and 32-bit ones wrap past 2**31; arrays of 2**31..2**32 elements are padded with
unused batch rows into the 64-bit range (see _wide_batch).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.custom_vjp import kernel_vjp
from pallas_kernels.ssd.common import BlockSizes

_F32 = jnp.float32


def _dot(a, b, trans_a=False, trans_b=False):
  """a @ b in fp32; fp32 inputs multiply in IEEE fp32, bf16 inputs on the tensor cores."""
  contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
  # DEFAULT precision is TF32 for fp32 on the GPU; HIGHEST lowers to Triton's IEEE dot.
  precision = jax.lax.Precision.HIGHEST if a.dtype == _F32 else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                             preferred_element_type=_F32)


def _last(v, r):
  """v[-1] of a [Q] vector (Triton tensors have no element indexing)."""
  return jnp.sum(jnp.where(r == r.shape[0] - 1, v, jnp.zeros_like(v)))


def _chunk_rows(seg_ref, bi, start, r, seq_len):
  """Validity and segment ids of a chunk's rows; rows past the end take the last id."""
  rows = start + r
  valid = rows < seq_len
  seg_end = seg_ref[bi, seq_len - 1]
  seg = plgpu.load(seg_ref.at[bi, pl.ds(start, r.shape[0])], mask=valid, other=0)
  seg = jnp.where(valid, seg, seg_end)
  prev_seg = seg_ref[bi, jnp.maximum(start - 1, 0)]        # the incoming state's segment
  return valid, seg, prev_seg


def _decays(dt, a, seg, prev_seg, r):
  """Per-chunk decay factors (fp32); see the module docstring."""
  cum = jax.lax.cumsum(dt * a, axis=0)
  cum_last = _last(cum, r)
  last_seg = _last(seg, r)
  zero = jnp.zeros_like(cum)
  from_state = jnp.where(seg == prev_seg, jnp.exp(cum), zero)             # e^{cum_i}
  to_end = jnp.where(seg == last_seg, jnp.exp(cum_last - cum), zero)      # e^{cum_last-cum_j}
  carry = jnp.where(prev_seg == last_seg, jnp.exp(cum_last), 0.0)
  return cum, from_state, to_end, carry


def _intra_mask(cum, seg, r):
  inside = (r[:, None] >= r[None, :]) & (seg[:, None] == seg[None, :])
  diff = jnp.where(inside, cum[:, None] - cum[None, :], 0.0)
  return jnp.where(inside, jnp.exp(diff), 0.0)                            # [Q, Q]


def _sequential_program(a_ref, block_p, rep, chunk):
  """Grid (batch, head, head_dim block): batch and head ids, the head's group, its head_dim
  rows, its decay rate A (fp32) and the row offsets of a chunk."""
  bi, hi, pi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  return (bi, hi, hi // rep, pl.ds(pi * block_p, block_p), a_ref[hi].astype(_F32),
          jnp.arange(chunk, dtype=jnp.int32))


def _forward_kernel(a_ref, x_ref, dt_ref, b_ref, c_ref, seg_ref, init_ref, *out_refs,
                    seq_len, chunk, block_p, rep, emit_states):
  bi, hi, gi, ps, a, r = _sequential_program(a_ref, block_p, rep, chunk)
  dtype = x_ref.dtype
  state = plgpu.load(init_ref.at[bi, hi, ps, :]).astype(_F32)             # [Pb, n]

  def body(c, state):
    start = c * chunk
    valid, seg, prev_seg = _chunk_rows(seg_ref, bi, start, r, seq_len)
    rows = pl.ds(start, chunk)
    dt = plgpu.load(dt_ref.at[bi, rows, hi], mask=valid, other=0.0).astype(_F32)
    x = plgpu.load(x_ref.at[bi, rows, hi, ps], mask=valid[:, None], other=0.0)
    bm = plgpu.load(b_ref.at[bi, rows, gi, :], mask=valid[:, None], other=0.0)
    cm = plgpu.load(c_ref.at[bi, rows, gi, :], mask=valid[:, None], other=0.0)
    cum, from_state, to_end, carry = _decays(dt, a, seg, prev_seg, r)
    xdt = x.astype(_F32) * dt[:, None]
    if emit_states:
      (states_ref,) = out_refs
      plgpu.store(states_ref.at[bi, hi, c, ps, :], state.astype(states_ref.dtype))
    else:
      y_ref = out_refs[0]
      scores = (_dot(cm, bm, trans_b=True) * _intra_mask(cum, seg, r)).astype(dtype)
      y = _dot(scores, xdt.astype(dtype))
      y += _dot(cm, state.astype(dtype), trans_b=True) * from_state[:, None]
      plgpu.store(y_ref.at[bi, rows, hi, ps], y.astype(y_ref.dtype), mask=valid[:, None])
    contrib = _dot((xdt * to_end[:, None]).astype(dtype), bm, trans_a=True)   # [Pb, n]
    return carry * state + contrib

  state = jax.lax.fori_loop(0, pl.cdiv(seq_len, chunk), body, state)
  if not emit_states:
    plgpu.store(out_refs[1].at[bi, hi, ps, :], state)


def _state_grad_kernel(a_ref, dt_ref, c_ref, seg_ref, dy_ref, dfinal_ref, dstates_ref,
                       dinit_ref, *, seq_len, chunk, block_p, rep):
  bi, hi, gi, ps, a, r = _sequential_program(a_ref, block_p, rep, chunk)
  dtype = dy_ref.dtype
  num_chunks = pl.cdiv(seq_len, chunk)
  grad = plgpu.load(dfinal_ref.at[bi, hi, ps, :]).astype(_F32)            # [Pb, n]

  def body(k, grad):
    c = num_chunks - 1 - k
    start = c * chunk
    plgpu.store(dstates_ref.at[bi, hi, c, ps, :], grad.astype(dstates_ref.dtype))
    valid, seg, prev_seg = _chunk_rows(seg_ref, bi, start, r, seq_len)
    rows = pl.ds(start, chunk)
    dt = plgpu.load(dt_ref.at[bi, rows, hi], mask=valid, other=0.0).astype(_F32)
    cm = plgpu.load(c_ref.at[bi, rows, gi, :], mask=valid[:, None], other=0.0)
    dy = plgpu.load(dy_ref.at[bi, rows, hi, ps], mask=valid[:, None], other=0.0)
    _, from_state, _, carry = _decays(dt, a, seg, prev_seg, r)
    weighted = (dy.astype(_F32) * from_state[:, None]).astype(dtype)
    return carry * grad + _dot(weighted, cm, trans_a=True)

  grad = jax.lax.fori_loop(0, num_chunks, body, grad)
  plgpu.store(dinit_ref.at[bi, hi, ps, :], grad)


def _chunk_grad_kernel(a_ref, x_ref, dt_ref, b_ref, c_ref, seg_ref, states_ref, dstates_ref,
                       dy_ref, dx_ref, ddt_ref, da_ref, db_ref, dc_ref, *, seq_len, chunk, rep,
                       heads):
  bi, ci = pl.program_id(0), pl.program_id(1)
  splits = rep // heads                      # programs sharing a group; dB, dC summed after
  gi, si = pl.program_id(2) // splits, pl.program_id(2) % splits
  dtype = x_ref.dtype
  r = jnp.arange(chunk, dtype=jnp.int32)
  start = ci * chunk
  rows = pl.ds(start, chunk)
  valid, seg, prev_seg = _chunk_rows(seg_ref, bi, start, r, seq_len)
  bm = plgpu.load(b_ref.at[bi, rows, gi, :], mask=valid[:, None], other=0.0)
  cm = plgpu.load(c_ref.at[bi, rows, gi, :], mask=valid[:, None], other=0.0)
  cb = _dot(cm, bm, trans_b=True)                                         # [Q, Q], per group

  def head(k, acc):
    db, dc = acc
    hi = gi * rep + si * heads + k
    a = a_ref[hi].astype(_F32)
    dt = plgpu.load(dt_ref.at[bi, rows, hi], mask=valid, other=0.0).astype(_F32)
    x = plgpu.load(x_ref.at[bi, rows, hi, :], mask=valid[:, None], other=0.0)
    dy = plgpu.load(dy_ref.at[bi, rows, hi, :], mask=valid[:, None], other=0.0)
    s_in = plgpu.load(states_ref.at[bi, hi, ci, :, :])                    # S_{c-1} [p, n]
    g_out = plgpu.load(dstates_ref.at[bi, hi, ci, :, :])                  # G_c     [p, n]
    cum, from_state, to_end, carry = _decays(dt, a, seg, prev_seg, r)
    lmat = _intra_mask(cum, seg, r)
    xdt32 = x.astype(_F32) * dt[:, None]
    xdt = xdt32.astype(dtype)
    scores = (cb * lmat).astype(dtype)
    d_scores = _dot(dy, xdt, trans_b=True)                                # dy_i . xdt_j
    d_cb = d_scores * lmat
    bg = _dot(bm, g_out.astype(dtype), trans_b=True)                      # [Q, p]
    d_xdt = _dot(scores, dy, trans_a=True) + to_end[:, None] * bg
    d_cb_in = d_cb.astype(dtype)
    dy_s = _dot(dy, s_in.astype(dtype))                                   # [Q, n]
    dc += _dot(d_cb_in, bm) + from_state[:, None] * dy_s
    db += _dot(d_cb_in, cm, trans_a=True) + to_end[:, None] * _dot(xdt, g_out.astype(dtype))
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
    return db, dc

  n = bm.shape[1]
  zeros = jnp.zeros((chunk, n), _F32)
  db, dc = jax.lax.fori_loop(0, heads, head, (zeros, zeros))
  plgpu.store(db_ref.at[si, bi, rows, gi, :], db, mask=valid[:, None])
  plgpu.store(dc_ref.at[si, bi, rows, gi, :], dc, mask=valid[:, None])


def _wide_batch(shape):
  """Batch rows to allocate so that Pallas Triton computes this array's offsets in 64 bits.

  It uses 32-bit offsets up to 2**32 elements, which wrap past 2**31 (the mamba_ssm failure
  at long sequences); arrays in between get extra, never-read batch rows, at most doubling.
  """
  size = 1
  for d in shape:
    size *= d
  if size < 2**31 or size > 2**32:
    return shape[0]
  return 2**32 // (size // shape[0]) + 1


def _widen(t):
  rows = _wide_batch(t.shape)
  if rows == t.shape[0]:
    return t
  return jnp.pad(t, [(0, rows - t.shape[0])] + [(0, 0)] * (t.ndim - 1))


def _out(shape, dtype):
  return jax.ShapeDtypeStruct((_wide_batch(shape), *shape[1:]), dtype)


def _params(block_sizes, backward=False):
  stages = block_sizes.num_stages_bwd if backward else block_sizes.num_stages
  return plgpu.CompilerParams(num_warps=block_sizes.num_warps, num_stages=stages)


def _check(x, B, block_sizes):
  p, n = x.shape[-1], B.shape[-1]
  for name, v in (("head_dim", p), ("d_state", n), ("block_p", block_sizes.block_p or p)):
    if v < 16 or v & (v - 1):
      raise ValueError(f"the GPU SSD kernel needs {name} a power of two >= 16, got {v}; "
                       "use the reference implementation for this shape")
  if p % (block_sizes.block_p or p):
    raise ValueError(f"block_p={block_sizes.block_p} does not divide head_dim={p}")


# Sequential kernels run one program per (batch, head, head_dim block); below about 1.5
# programs per H100 SM they leave SMs idle, so block_p=None halves head_dim blocks until
# there are this many (measured: 2 x 16384 x 24 heads runs 0.94 ms at block_p 16 against
# 1.33 ms at 64; 8 x 4096 x 24 heads is fastest at 64; benchmarks/results/ssd_tune_*).
_MIN_PROGRAMS = 192


def _block_p(p, block_sizes, programs):
  """head_dim rows per program; `programs` = batch * heads."""
  if block_sizes.block_p:
    return min(block_sizes.block_p, p)
  bp = p
  while programs * (p // bp) < _MIN_PROGRAMS and bp > 16:
    bp //= 2
  return bp


def ssd_forward_gpu(x, dt, A, B, C, initial_state, segment_ids, *,
                    block_sizes: BlockSizes, interpret: bool = False, emit_states=False):
  """y [b, l, h, p] (x.dtype) and final state [b, h, p, n] fp32; or, with emit_states, the
  state entering each chunk [b, h, chunks, p, n] (x.dtype)."""
  b, l, h, p = x.shape
  g, n = B.shape[2:]
  q = block_sizes.chunk_bwd if emit_states else block_sizes.chunk
  bp = _block_p(p, block_sizes, b * h)
  nc = pl.cdiv(l, q)
  if emit_states:
    out_shape = [_out((b, h, nc, p, n), x.dtype)]
  else:
    out_shape = [_out(x.shape, x.dtype), _out((b, h, p, n), _F32)]
  kernel = functools.partial(_forward_kernel, seq_len=l, chunk=q, block_p=bp, rep=h // g,
                             emit_states=emit_states)
  outs = pl.pallas_call(kernel, out_shape=out_shape, grid=(b, h, p // bp),
                        compiler_params=_params(block_sizes, emit_states), interpret=interpret,
                        name="ssd_states" if emit_states else "ssd_forward",
                        )(A, *map(_widen, (x, dt, B, C, segment_ids, initial_state)))
  return [o[:b] for o in outs]


def ssd_state_grads_gpu(dt, A, C, segment_ids, dy, dfinal, *, head_dim, block_sizes,
                        interpret=False):
  """G_c = dLoss/dS_c for every chunk [b, h, chunks, p, n] (dy.dtype) and d initial_state."""
  b, l, h = dt.shape
  g, n = C.shape[2:]
  q, p = block_sizes.chunk_bwd, head_dim
  bp = _block_p(p, block_sizes, b * h)
  kernel = functools.partial(_state_grad_kernel, seq_len=l, chunk=q, block_p=bp, rep=h // g)
  dstates, dinit = pl.pallas_call(
      kernel, grid=(b, h, p // bp), compiler_params=_params(block_sizes, True),
      interpret=interpret,
      out_shape=[_out((b, h, pl.cdiv(l, q), p, n), dy.dtype), _out((b, h, p, n), _F32)],
      name="ssd_state_grad",
  )(A, *map(_widen, (dt, C, segment_ids, dy, dfinal.astype(_F32))))
  return dstates[:b], dinit[:b]


def ssd_chunk_grads_gpu(x, dt, A, B, C, segment_ids, states, dstates, dy, *, block_sizes,
                        interpret=False):
  """(dx, ddt, dA, dB, dC) from the states entering and the state gradients leaving chunks."""
  b, l, h, p = x.shape
  g, n = B.shape[2:]
  q, rep = block_sizes.chunk_bwd, h // g
  heads = min(block_sizes.heads_per_program or rep, rep)
  if rep % heads:
    raise ValueError(f"heads_per_program={heads} does not divide the {rep} heads of a group")
  nc, splits = pl.cdiv(l, q), rep // heads
  kernel = functools.partial(_chunk_grad_kernel, seq_len=l, chunk=q, rep=rep, heads=heads)
  part = lambda shape: jax.ShapeDtypeStruct((splits, *shape), _F32)
  dx, ddt, da, db, dc = pl.pallas_call(
      kernel, grid=(b, nc, g * splits), compiler_params=_params(block_sizes, True),
      interpret=interpret,
      out_shape=[_out(x.shape, x.dtype), _out((b, l, h), _F32), _out((b, nc, h), _F32),
                 part(B.shape), part(C.shape)], name="ssd_chunk_grad",
  )(A, *map(_widen, (x, dt, B, C, segment_ids, states, dstates, dy)))
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
