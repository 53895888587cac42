"""Query-compacted causal sliding-window attention as Pallas Triton kernels (GPU).

Only selected query rows are computed. The caller compacts them: `positions` [b, slots] holds
each selected row's sequence position in ascending order, then a sentinel >= seq + window for
unused slots (which can see no key). q is gathered into that order, [b, slots, h, d].

  _forward_kernel  grid (batch, head, slot block): online softmax over the key blocks that
                   the block's rows can see, [first - window + 1, last]; blocks with no
                   selected row run no iteration. Writes o and the row log-sum-exp (fp32).
  _dq_kernel       the same grid and key range: dq from the saved statistics.
  _dkv_kernel      grid (batch, head, key block): the slot blocks whose rows can see the key
                   block, a range the caller finds with a search over the sorted positions.
Cost follows the key span each compacted block reads: (last - first) + window keys for
block_q selected rows, so about C * seq / block_q blocks of block_q / C + window keys.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.selective_attention.common import (BlockSizes, make_compacted_attention,
                                                       slots_seeing_key_blocks)

_F32 = jnp.float32
_BIG = 2**30


def _dot(a, b, trans_a=False, trans_b=False):
  contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
  precision = jax.lax.Precision.HIGHEST if a.dtype == _F32 else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                             preferred_element_type=_F32)


def _visible(pos, seg_q, keys, key_ok, seg_k, window):
  """[bq, bk] mask: key j is in row i's causal window, selected for keys, same segment."""
  return ((keys[None, :] <= pos[:, None]) & (keys[None, :] > pos[:, None] - window)
          & key_ok[None, :] & (seg_k[None, :] == seg_q[:, None]))


def _key_block(k_ref, v_ref, ok_ref, seg_ref, bi, hi, start, block_k, seq_len):
  keys = start + jnp.arange(block_k, dtype=jnp.int32)
  inside = keys < seq_len
  rows = pl.ds(start, block_k)
  k = plgpu.load(k_ref.at[bi, rows, hi, :], mask=inside[:, None], other=0.0)
  v = plgpu.load(v_ref.at[bi, rows, hi, :], mask=inside[:, None], other=0.0)
  ok = plgpu.load(ok_ref.at[bi, rows], mask=inside, other=0) > 0
  seg = plgpu.load(seg_ref.at[bi, rows], mask=inside, other=-1)
  return keys, k, v, ok, seg


def _slot_block(pos_ref, segq_ref, q_ref, seq_len, window, block_q, block_k):
  """This program's slot block: its positions, segments and q rows, and the key blocks
  [lo, hi) its rows can see."""
  bi, hi, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  slots = pl.ds(si * block_q, block_q)
  pos = pos_ref[bi, slots]
  valid = pos < seq_len
  first = jnp.min(jnp.where(valid, pos, _BIG))
  last = jnp.max(jnp.where(valid, pos, -1))
  lo = jnp.maximum(first - window + 1, 0) // block_k
  hi_block = jnp.where(last >= 0, last // block_k + 1, lo)
  return bi, hi, slots, pos, segq_ref[bi, slots], q_ref[bi, slots, hi, :], lo, hi_block


def _forward_kernel(pos_ref, segq_ref, q_ref, k_ref, v_ref, ok_ref, seg_ref, o_ref, lse_ref,
                    *, seq_len, window, block_q, block_k, scale):
  bi, hi, slots, pos, seg_q, q, lo, hi_block = _slot_block(
      pos_ref, segq_ref, q_ref, seq_len, window, block_q, block_k)
  d = q.shape[-1]

  def body(kb, carry):
    acc, m, l = carry
    keys, k, v, ok, seg_k = _key_block(k_ref, v_ref, ok_ref, seg_ref, bi, hi, kb * block_k,
                                       block_k, seq_len)
    mask = _visible(pos, seg_q, keys, ok, seg_k, window)
    s = jnp.where(mask, _dot(q, k, trans_b=True) * scale, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.where(mask, jnp.exp(s - m_safe[:, None]), 0.0)
    alpha = jnp.exp(jnp.where(m == -jnp.inf, 0.0, m) - m_safe)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)

  init = (jnp.zeros((block_q, d), _F32), jnp.full((block_q,), -jnp.inf, _F32),
          jnp.zeros((block_q,), _F32))
  acc, m, l = jax.lax.fori_loop(lo, hi_block, body, init)
  seen = l > 0
  o_ref[bi, slots, hi, :] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None],
                                      0.0).astype(o_ref.dtype)
  lse_ref[bi, hi, slots] = jnp.where(seen, jnp.where(m == -jnp.inf, 0.0, m)
                                     + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)


def _dq_kernel(pos_ref, segq_ref, q_ref, k_ref, v_ref, ok_ref, seg_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, seq_len, window, block_q, block_k, scale):
  bi, hi, slots, pos, seg_q, q, lo, hi_block = _slot_block(
      pos_ref, segq_ref, q_ref, seq_len, window, block_q, block_k)
  do = do_ref[bi, slots, hi, :]
  lse = lse_ref[bi, hi, slots]
  delta = delta_ref[bi, hi, slots]

  def body(kb, dq):
    keys, k, v, ok, seg_k = _key_block(k_ref, v_ref, ok_ref, seg_ref, bi, hi, kb * block_k,
                                       block_k, seq_len)
    mask = _visible(pos, seg_q, keys, ok, seg_k, window)
    p = jnp.where(mask, jnp.exp(_dot(q, k, trans_b=True) * scale - lse[:, None]), 0.0)
    ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(lo, hi_block, body, jnp.zeros(q.shape, _F32))
  dq_ref[bi, slots, hi, :] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(range_ref, pos_ref, segq_ref, q_ref, k_ref, v_ref, ok_ref, seg_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, seq_len, window, block_q, block_k,
                scale):
  bi, hi, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  keys, k, v, ok, seg_k = _key_block(k_ref, v_ref, ok_ref, seg_ref, bi, hi, kb * block_k,
                                     block_k, seq_len)
  first_slot, end_slot = range_ref[bi, kb, 0], range_ref[bi, kb, 1]

  def body(sb, carry):
    dk, dv = carry
    slots = pl.ds(sb * block_q, block_q)
    pos = pos_ref[bi, slots]
    seg_q = segq_ref[bi, slots]
    q = q_ref[bi, slots, hi, :]
    do = do_ref[bi, slots, hi, :]
    lse = lse_ref[bi, hi, slots]
    delta = delta_ref[bi, hi, slots]
    mask = _visible(pos, seg_q, keys, ok, seg_k, window)
    p = jnp.where(mask, jnp.exp(_dot(q, k, trans_b=True) * scale - lse[:, None]), 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
    ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  zeros = jnp.zeros(k.shape, _F32)
  lo = first_slot // block_q
  hi_block = jnp.where(end_slot > first_slot, (end_slot - 1) // block_q + 1, lo)
  dk, dv = jax.lax.fori_loop(lo, hi_block, body, (zeros, zeros))
  inside = keys < seq_len
  plgpu.store(dk_ref.at[bi, pl.ds(kb * block_k, block_k), hi, :],
              (dk * scale).astype(dk_ref.dtype), mask=inside[:, None])
  plgpu.store(dv_ref.at[bi, pl.ds(kb * block_k, block_k), hi, :], dv.astype(dv_ref.dtype),
              mask=inside[:, None])


def _params(bs):
  return plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _statics(q, window, bs):
  return dict(seq_len=q.shape[1], window=window, block_q=bs.block_q, block_k=bs.block_k,
              scale=1.0 / math.sqrt(q.shape[-1]))


def _forward(q_c, k, v, pos, seg_q, ok, seg, window, bs, interpret):
  b, slots, h, d = q_c.shape
  kernel = functools.partial(_forward_kernel, **_statics(k, window, bs))
  return pl.pallas_call(
      kernel, grid=(b, h, slots // bs.block_q), compiler_params=_params(bs),
      interpret=interpret, name="selective_attention_forward",
      out_shape=[jax.ShapeDtypeStruct(q_c.shape, q_c.dtype),
                 jax.ShapeDtypeStruct((b, h, slots), _F32)],
  )(pos, seg_q, q_c, k, v, ok, seg)


def _backward(q_c, k, v, pos, seg_q, ok, seg, lse, delta, do_c, window, bs, interpret):
  b, slots, h, d = q_c.shape
  statics = _statics(k, window, bs)
  dq_c = pl.pallas_call(
      functools.partial(_dq_kernel, **statics), grid=(b, h, slots // bs.block_q),
      compiler_params=_params(bs), interpret=interpret, name="selective_attention_dq",
      out_shape=jax.ShapeDtypeStruct(q_c.shape, q_c.dtype),
  )(pos, seg_q, q_c, k, v, ok, seg, do_c, lse, delta)
  nkb = pl.cdiv(k.shape[1], bs.block_k)
  ranges = slots_seeing_key_blocks(pos, nkb, window, bs.block_k)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **statics), grid=(b, h, nkb),
      compiler_params=_params(bs), interpret=interpret, name="selective_attention_dkv",
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
  )(ranges, pos, seg_q, q_c, k, v, ok, seg, do_c, lse, delta)
  return dq_c, dk, dv


_compacted_attention = make_compacted_attention(_forward, _backward)


def selective_attention_gpu(q, k, v, select, *, window: int, kv_select=None, segment_ids=None,
                            block_sizes: BlockSizes = BlockSizes(), interpret: bool = False):
  """Causal sliding-window attention for the selected query rows (zeros elsewhere).

  Args as taipan_jax.ops.selective_window_attention: q, k, v [batch, seq, heads, head_dim];
  select [batch, seq] bool; window >= 1; kv_select optional [batch, seq] bool restricting
  keys; segment_ids optional [batch, seq] int. Returns [batch, seq, heads, head_dim], q.dtype.
  """
  return _compacted_attention(q, k, v, select, window=window, kv_select=kv_select,
                              segment_ids=segment_ids, block_sizes=block_sizes,
                              interpret=interpret)
