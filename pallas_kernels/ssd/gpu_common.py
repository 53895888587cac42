"""Pieces shared by the GPU (Pallas Triton) SSD kernels: the per-chunk decay arithmetic that
runs inside a kernel, and the launch helpers around the pallas_calls.

Inside a chunk of Q positions (cum = inclusive cumsum of dt A, e = exp):
  y      = ((C B^T) * L) (x dt) + e^{cum} * (C S_{c-1}^T)       L_ij = e^{cum_i - cum_j}, j <= i
  S_c    = e^{cum_last} S_{c-1} + (x dt * e^{cum_last - cum})^T B
Positions of another segment (packed documents) than the state's are masked out of each term.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32

# Sequential kernels run one program per (batch, head, head_dim block); below about 1.5
# programs per H100 SM they leave SMs idle, so block_p=None halves head_dim blocks until
# there are this many (measured: 2 x 16384 x 24 heads runs 0.94 ms at block_p 16 against
# 1.33 ms at 64; 8 x 4096 x 24 heads is fastest at 64; benchmarks/results/ssd_tune_*).
MIN_PROGRAMS = 192


def dot(a, b, trans_a=False, trans_b=False):
  """a @ b in fp32; fp32 inputs multiply in IEEE fp32, bf16 inputs on the tensor cores."""
  contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
  # DEFAULT precision is TF32 for fp32 on the GPU; HIGHEST lowers to Triton's IEEE dot.
  precision = jax.lax.Precision.HIGHEST if a.dtype == F32 else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                             preferred_element_type=F32)


def last(v, r):
  """v[-1] of a [Q] vector (Triton tensors have no element indexing)."""
  return jnp.sum(jnp.where(r == r.shape[0] - 1, v, jnp.zeros_like(v)))


def chunk_rows(seg_ref, bi, start, r, seq_len):
  """Validity and segment ids of a chunk's rows; rows past the end take the last id."""
  rows = start + r
  valid = rows < seq_len
  seg_end = seg_ref[bi, seq_len - 1]
  seg = plgpu.load(seg_ref.at[bi, pl.ds(start, r.shape[0])], mask=valid, other=0)
  seg = jnp.where(valid, seg, seg_end)
  prev_seg = seg_ref[bi, jnp.maximum(start - 1, 0)]        # the incoming state's segment
  return valid, seg, prev_seg


def decays(dt, a, seg, prev_seg, r):
  """Per-chunk decay factors (fp32): cum, e^{cum_i} from the incoming state, e^{cum_last -
  cum_j} to the chunk's end, and the whole chunk's decay of the incoming state."""
  cum = jax.lax.cumsum(dt * a, axis=0)
  cum_last = last(cum, r)
  last_seg = last(seg, r)
  zero = jnp.zeros_like(cum)
  from_state = jnp.where(seg == prev_seg, jnp.exp(cum), zero)             # e^{cum_i}
  to_end = jnp.where(seg == last_seg, jnp.exp(cum_last - cum), zero)      # e^{cum_last-cum_j}
  carry = jnp.where(prev_seg == last_seg, jnp.exp(cum_last), 0.0)
  return cum, from_state, to_end, carry


def intra_mask(cum, seg, r):
  """L [Q, Q]: e^{cum_i - cum_j} for j <= i in the same segment, else 0."""
  inside = (r[:, None] >= r[None, :]) & (seg[:, None] == seg[None, :])
  diff = jnp.where(inside, cum[:, None] - cum[None, :], 0.0)
  return jnp.where(inside, jnp.exp(diff), 0.0)


def state_after(state, start, x_ref, dt_ref, b_ref, seg_ref, bi, hi, gi, ps, a, r, seq_len):
  """The state [rows ps, n] (fp32) after the chunk of rows start.., from the state before it."""
  valid, seg, prev_seg = chunk_rows(seg_ref, bi, start, r, seq_len)
  rows = pl.ds(start, r.shape[0])
  dt = plgpu.load(dt_ref.at[bi, rows, hi], mask=valid, other=0.0).astype(F32)
  x = plgpu.load(x_ref.at[bi, rows, hi, ps], mask=valid[:, None], other=0.0)
  bm = plgpu.load(b_ref.at[bi, rows, gi, :], mask=valid[:, None], other=0.0)
  _, _, to_end, carry = decays(dt, a, seg, prev_seg, r)
  weighted = (x.astype(F32) * (dt * to_end)[:, None]).astype(x.dtype)
  return carry * state + dot(weighted, bm, trans_a=True)


def grad_before(grad, start, dy_ref, dt_ref, c_ref, seg_ref, bi, hi, gi, ps, a, r, seq_len):
  """dLoss/d(state before the chunk of rows start..) [rows ps, n] (fp32), from the gradient
  of the state after it."""
  valid, seg, prev_seg = chunk_rows(seg_ref, bi, start, r, seq_len)
  rows = pl.ds(start, r.shape[0])
  dt = plgpu.load(dt_ref.at[bi, rows, hi], mask=valid, other=0.0).astype(F32)
  cm = plgpu.load(c_ref.at[bi, rows, gi, :], mask=valid[:, None], other=0.0)
  dy = plgpu.load(dy_ref.at[bi, rows, hi, ps], mask=valid[:, None], other=0.0)
  _, from_state, _, carry = decays(dt, a, seg, prev_seg, r)
  weighted = (dy.astype(F32) * from_state[:, None]).astype(dy.dtype)
  return carry * grad + dot(weighted, cm, trans_a=True)


def wide_batch(shape):
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


def widen(t):
  rows = wide_batch(t.shape)
  if rows == t.shape[0]:
    return t
  return jnp.pad(t, [(0, rows - t.shape[0])] + [(0, 0)] * (t.ndim - 1))


def out_struct(shape, dtype):
  return jax.ShapeDtypeStruct((wide_batch(shape), *shape[1:]), dtype)


def compiler_params(block_sizes, backward=False):
  if backward:
    return plgpu.CompilerParams(num_warps=block_sizes.num_warps_bwd or block_sizes.num_warps,
                                num_stages=block_sizes.num_stages_bwd)
  return plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                              num_stages=block_sizes.num_stages)


def block_p(p, block_sizes, programs):
  """head_dim rows per program; `programs` = batch * heads."""
  if block_sizes.block_p:
    return min(block_sizes.block_p, p)
  bp = p
  while programs * (p // bp) < MIN_PROGRAMS and bp > 16:
    bp //= 2
  return bp
