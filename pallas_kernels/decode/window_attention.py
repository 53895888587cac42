"""One new query per row against a cache of keys and values: two Pallas Triton kernels.

A SAL decodes each token against its ring buffer of the last `window` keys and values, a
Transformer++ against its whole cache. One (row, head) is far too little work for a GPU, so
the cache is split (flash-decoding):

  _partial_kernel  grid (batch, heads, splits): an online softmax (base 2, fp32 statistics)
                   over one chunk of slots in blocks of block_s, masked by `valid`; writes
                   the chunk's unnormalised output and its running max and sum.
  _combine_kernel  grid (batch, heads): rescales the chunks to their common max and sums.

Rows whose output is not needed (`active` false: a token the SAL's gate did not select) read
no cache: the first kernel skips them and the second writes zeros. The XLA path computes every
row and multiplies by the mask after.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_F32 = jnp.float32
_LOG2E = math.log2(math.e)
_NO_SCORE = -1e30    # the running max's start: below any score, finite (no -inf tests)


def _partial_kernel(q_ref, k_ref, v_ref, valid_ref, active_ref, acc_ref, m_ref, l_ref, *,
                    slots, chunk, block_s, scale):
  bi, hi, ci = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  d = q_ref.shape[-1]

  @pl.when(active_ref[bi] != 0)
  def _():
    q = q_ref[bi, hi, :].astype(_F32) * (scale * _LOG2E)

    def body(i, carry):
      acc, m, l = carry
      start = ci * chunk + i * block_s
      inside = start + jnp.arange(block_s) < slots
      ok = plgpu.load(valid_ref.at[bi, pl.ds(start, block_s)], mask=inside, other=0) != 0
      k = plgpu.load(k_ref.at[bi, pl.ds(start, block_s), hi, :], mask=inside[:, None],
                     other=0.0)
      s = jnp.where(ok, jnp.sum(k.astype(_F32) * q[None, :], axis=1), -jnp.inf)   # [block_s]
      m_new = jnp.maximum(m, jnp.max(s))
      p = jnp.exp2(s - m_new)
      alpha = jnp.exp2(m - m_new)
      v = plgpu.load(v_ref.at[bi, pl.ds(start, block_s), hi, :], mask=inside[:, None],
                     other=0.0)
      acc = acc * alpha + jnp.sum(p[:, None] * v.astype(_F32), axis=0)
      return acc, m_new, l * alpha + jnp.sum(p)

    init = (jnp.zeros((d,), _F32), jnp.full((), _NO_SCORE, _F32), jnp.zeros((), _F32))
    acc, m, l = jax.lax.fori_loop(0, chunk // block_s, body, init)
    acc_ref[bi, hi, ci, :] = acc
    m_ref[bi, hi, ci] = m
    l_ref[bi, hi, ci] = l


def _combine_kernel(active_ref, acc_ref, m_ref, l_ref, o_ref):
  bi, hi = pl.program_id(0), pl.program_id(1)
  d = o_ref.shape[-1]

  @pl.when(active_ref[bi] == 0)
  def _():
    o_ref[bi, hi, :] = jnp.zeros((d,), o_ref.dtype)

  @pl.when(active_ref[bi] != 0)
  def _():
    m = m_ref[bi, hi, :]                           # [splits]
    weight = jnp.exp2(m - jnp.max(m))              # chunks with no valid slot: l = 0
    total = jnp.sum(weight * l_ref[bi, hi, :])
    out = jnp.sum(weight[:, None] * acc_ref[bi, hi, :, :], axis=0)
    seen = total > 0
    o_ref[bi, hi, :] = jnp.where(seen, out / jnp.where(seen, total, 1.0), 0.0).astype(o_ref.dtype)


def _splits(slots, block_s, max_splits):
  """(splits, chunk): a power-of-two number of chunks of whole blocks covering the slots."""
  blocks = pl.cdiv(slots, block_s)
  splits = min(1 << (blocks - 1).bit_length(), max_splits)
  return splits, pl.cdiv(blocks, splits) * block_s


@functools.partial(jax.jit, static_argnames=("block_s", "max_splits", "num_warps", "interpret"))
def window_attention_gpu(q, k_cache, v_cache, valid, active=None, *, block_s: int = 128,
                         max_splits: int = 16, num_warps: int = 4, interpret: bool = False):
  """softmax(q k^T / sqrt(d)) v over the valid slots, per row and head; zeros for rows with
  no valid slot and for inactive rows.

  q: [batch, heads, head_dim]; k_cache, v_cache: [batch, slots, heads, head_dim] (any slot
  count; head_dim a power of two); valid: [batch, slots] bool; active: optional [batch] bool
  (default all). The slots are split into up to max_splits chunks (a power of two) of whole
  blocks of block_s. Returns [batch, heads, head_dim] in q.dtype.
  """
  b, h, d = q.shape
  if k_cache.shape != v_cache.shape or k_cache.shape[0] != b or k_cache.shape[2:] != (h, d):
    raise ValueError(f"q {q.shape}, k_cache {k_cache.shape} and v_cache {v_cache.shape} must "
                     "be [batch, heads, head_dim] and [batch, slots, heads, head_dim]")
  if d & (d - 1):
    raise ValueError(f"window_attention_gpu needs head_dim a power of two, got {d}")
  slots = k_cache.shape[1]
  if valid.shape != (b, slots):
    raise ValueError(f"valid {valid.shape} must be [batch, slots] = {(b, slots)}")
  active = jnp.ones((b,), jnp.int32) if active is None else active.astype(jnp.int32)
  splits, chunk = _splits(slots, block_s, max_splits)
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=2)
  acc, m, l = pl.pallas_call(
      functools.partial(_partial_kernel, slots=slots, chunk=chunk, block_s=block_s,
                        scale=1.0 / math.sqrt(d)),
      out_shape=[jax.ShapeDtypeStruct((b, h, splits, d), _F32),
                 jax.ShapeDtypeStruct((b, h, splits), _F32),
                 jax.ShapeDtypeStruct((b, h, splits), _F32)],
      grid=(b, h, splits), compiler_params=params, interpret=interpret,
      name="window_decode_attention_partial",
  )(q, k_cache, v_cache, valid.astype(jnp.int32), active)
  return pl.pallas_call(
      _combine_kernel, out_shape=jax.ShapeDtypeStruct((b, h, d), q.dtype), grid=(b, h),
      compiler_params=params, interpret=interpret, name="window_decode_attention_combine",
  )(active, acc, m, l)
