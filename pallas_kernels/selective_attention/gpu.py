"""Query-compacted causal sliding-window attention as Pallas Triton kernels (GPU).

Only selected query rows are computed. `pos` [b, slots] (common.compact_selection) holds each
selected row's sequence position in ascending order, then a sentinel >= seq + window for unused
slots (which can see no key). Forward and dq read q, do and o rows at those positions and
write o and dq rows there (Triton gathers and scatters rows by pointer); unselected rows of o
and dq stay as the zeroed buffer each kernel aliases.

  _forward_kernel  grid (batch, head, slot block): online softmax (base 2) over the key blocks
                   that the block's rows can see, [first - window + 1, last]; blocks with no
                   selected row run no iteration. Writes o and the row log-sum-exp (fp32).
  _dq_kernel       the same grid and key range: dq from the saved statistics. Also writes
                   delta = rowsum(do * o) per slot, and the q and do rows compacted, for:
  _dkv_kernel      grid (batch, head, key block): the slot blocks whose rows can see the key
                   block (a range read off the running count of selected rows), each product
                   formed key-major so that p and ds need no transpose.
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

from pallas_kernels.selective_attention.common import (BlockSizes, make_selective_attention,
                                                       slot_blocks_seeing_key_blocks)

_F32 = jnp.float32
_BIG = 2**30


def _dot(a, b, trans_a=False, trans_b=False):
  contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
  precision = jax.lax.Precision.HIGHEST if a.dtype == _F32 else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                             preferred_element_type=_F32)


def _visible(pos, seg_q, keys, key_ok, seg_k, window, window_only, key_major=False):
  """The mask, [bq, bk] (key_major: [bk, bq], for the dk/dv kernel's products): key j is in
  row i's causal window (and, unless window_only, selected for keys and in the same
  segment)."""
  row = (lambda t: t[None, :]) if key_major else (lambda t: t[:, None])   # per query row
  col = (lambda t: t[:, None]) if key_major else (lambda t: t[None, :])   # per key
  behind = row(pos) - col(keys)
  mask = (behind >= 0) & (behind < window)
  if window_only:
    return mask
  return mask & col(key_ok) & (col(seg_k) == row(seg_q))


def _key_block(k_ref, v_ref, ok_ref, seg_ref, bi, hi, start, block_k, seq_len, window_only):
  """keys [bk], k and v [bk, d]; ok and seg [bk] unless window_only (then None: no mask
  reads them)."""
  keys = start + jnp.arange(block_k, dtype=jnp.int32)
  inside = keys < seq_len
  rows = pl.ds(start, block_k)
  k = plgpu.load(k_ref.at[bi, rows, hi, :], mask=inside[:, None], other=0.0)
  v = plgpu.load(v_ref.at[bi, rows, hi, :], mask=inside[:, None], other=0.0)
  if window_only:
    return keys, k, v, None, None
  ok = plgpu.load(ok_ref.at[bi, rows], mask=inside, other=0) > 0
  seg = plgpu.load(seg_ref.at[bi, rows], mask=inside, other=-1)
  return keys, k, v, ok, seg


def _slot_rows(pos_ref, bi, slots, seq_len, window, block_k):
  """A slot block's positions, which of them are selected rows, the rows to read (0 for
  sentinels, masked), and the key blocks [lo, hi) its rows can see.

  Every key block is masked. Running the blocks inside every row's window without a mask
  (a loop of its own) was measured slower on the H100 once the mask had become two compares
  (docs/kernels/selective_attention.md)."""
  pos = pos_ref[bi, slots]
  valid = pos < seq_len
  rows = jnp.where(valid, pos, 0)
  first = jnp.min(jnp.where(valid, pos, _BIG))
  last = jnp.max(jnp.where(valid, pos, -1))
  lo = jnp.maximum(first - window + 1, 0) // block_k
  hi = jnp.where(last >= 0, last // block_k + 1, lo)
  return pos, valid, rows, lo, hi


def _row_index(ref, bi, rows, hi):
  """Index of the [block_q, d] rows of ref [b, seq, h, d] at `rows` (a gather), in integer
  arrays only: interpret mode discharges no mix of arrays and slices."""
  return ref.at[bi, rows[:, None], hi, jnp.arange(ref.shape[-1])[None, :]]


def _load_rows(ref, bi, rows, hi, valid):
  return plgpu.load(_row_index(ref, bi, rows, hi), mask=valid[:, None], other=0.0)


def _store_rows(ref, bi, rows, hi, valid, x):
  plgpu.store(_row_index(ref, bi, rows, hi), x.astype(ref.dtype), mask=valid[:, None])


# The kernels work in base 2: scores are scaled by scale * log2(e) and exponentiated with
# exp2, so the log-sum-exp they pass from forward to backward is in log2 units.
_LOG2E = math.log2(math.e)
# The running max a row starts from: far below any score, yet finite, so exp2 of it minus a
# real score underflows to 0 and no test for -inf is needed.
_NO_SCORE = -1e30


def _forward_kernel(pos_ref, q_ref, k_ref, v_ref, ok_ref, seg_ref, _, o_ref, lse_ref,
                    *, seq_len, window, window_only, block_q, block_k, scale):
  bi, hi, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  slots = pl.ds(si * block_q, block_q)
  pos, valid, rows, kb_lo, kb_hi = _slot_rows(pos_ref, bi, slots, seq_len, window, block_k)
  q = _load_rows(q_ref, bi, rows, hi, valid)
  seg_q = None if window_only else seg_ref[bi, rows]
  d = q.shape[-1]
  qk_scale = scale * _LOG2E

  def body(kb, carry):
    acc, m, l = carry
    keys, k, v, ok, seg_k = _key_block(k_ref, v_ref, ok_ref, seg_ref, bi, hi, kb * block_k,
                                       block_k, seq_len, window_only)
    s = _dot(q, k, trans_b=True) * qk_scale
    s = jnp.where(_visible(pos, seg_q, keys, ok, seg_k, window, window_only), s, -jnp.inf)
    # A row with every key masked so far keeps m = _NO_SCORE: p = 0 and alpha = 1.
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp2(s - m_new[:, None])
    alpha = jnp.exp2(m - m_new)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)

  init = (jnp.zeros((block_q, d), _F32), jnp.full((block_q,), _NO_SCORE, _F32),
          jnp.zeros((block_q,), _F32))
  acc, m, l = jax.lax.fori_loop(kb_lo, kb_hi, body, init)
  seen = (l > 0) & valid
  l_safe = jnp.where(seen, l, 1.0)
  _store_rows(o_ref, bi, rows, hi, valid, jnp.where(seen[:, None], acc / l_safe[:, None], 0.0))
  lse_ref[bi, hi, slots] = jnp.where(seen, m + jnp.log2(l_safe), jnp.inf)


def _dq_kernel(pos_ref, q_ref, k_ref, v_ref, ok_ref, seg_ref, do_ref, o_ref, lse_ref, _,
               dq_ref, delta_ref, q_c_ref, do_c_ref, *, seq_len, window, window_only, block_q,
               block_k, scale):
  bi, hi, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  slots = pl.ds(si * block_q, block_q)
  pos, valid, rows, kb_lo, kb_hi = _slot_rows(pos_ref, bi, slots, seq_len, window, block_k)
  q = _load_rows(q_ref, bi, rows, hi, valid)
  do = _load_rows(do_ref, bi, rows, hi, valid)

  # The compacted q and do rows for the dk/dv kernel, written for the slot blocks holding a
  # selected row: the only blocks it reads (sentinel rows are zeros).
  @pl.when(pos_ref[bi, si * block_q] < seq_len)
  def _():
    q_c_ref[bi, slots, hi, :] = q
    do_c_ref[bi, slots, hi, :] = do

  seg_q = None if window_only else seg_ref[bi, rows]
  lse = lse_ref[bi, hi, slots]
  qk_scale = scale * _LOG2E
  # delta = rowsum(do * o) here, once per row, for this kernel and the dk/dv kernel after it.
  delta = jnp.sum(do.astype(_F32) * _load_rows(o_ref, bi, rows, hi, valid).astype(_F32), axis=1)
  delta_ref[bi, hi, slots] = delta

  def body(kb, dq):
    keys, k, v, ok, seg_k = _key_block(k_ref, v_ref, ok_ref, seg_ref, bi, hi, kb * block_k,
                                       block_k, seq_len, window_only)
    p = jnp.exp2(_dot(q, k, trans_b=True) * qk_scale - lse[:, None])
    p = jnp.where(_visible(pos, seg_q, keys, ok, seg_k, window, window_only), p, 0.0)
    ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(kb_lo, kb_hi, body, jnp.zeros(q.shape, _F32))
  _store_rows(dq_ref, bi, rows, hi, valid, dq * scale)


def _dkv_kernel(range_ref, pos_ref, q_ref, k_ref, v_ref, ok_ref, seg_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, seq_len, window, window_only, block_q, block_k,
                scale):
  """Key-major: every product is formed transposed ([block_k, block_q]), so p and ds enter
  the dk and dv products as they come out of registers, with no transpose between.

  q_ref and do_ref are compacted, [b, slots, h, d] (the dq kernel writes them): slot
  blocks load as plain blocks."""
  bi, hi, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  keys, k, v, ok, seg_k = _key_block(k_ref, v_ref, ok_ref, seg_ref, bi, hi, kb * block_k,
                                     block_k, seq_len, window_only)
  qk_scale = scale * _LOG2E

  def body(sb, carry):
    dk, dv = carry
    slots = pl.ds(sb * block_q, block_q)
    pos = pos_ref[bi, slots]
    q = q_ref[bi, slots, hi, :]
    do = do_ref[bi, slots, hi, :]
    seg_q = None if window_only else seg_ref[bi, jnp.where(pos < seq_len, pos, 0)]
    p_t = jnp.exp2(_dot(k, q, trans_b=True) * qk_scale - lse_ref[bi, hi, slots][None, :])
    p_t = jnp.where(_visible(pos, seg_q, keys, ok, seg_k, window, window_only,
                                  key_major=True), p_t, 0.0)
    dv = dv + _dot(p_t.astype(do.dtype), do)
    ds_t = p_t * (_dot(v, do, trans_b=True) - delta_ref[bi, hi, slots][None, :])
    dk = dk + _dot(ds_t.astype(q.dtype), q)
    return dk, dv

  zeros = jnp.zeros(k.shape, _F32)
  dk, dv = jax.lax.fori_loop(range_ref[bi, kb, 0], range_ref[bi, kb, 1], body, (zeros, zeros))
  inside = keys < seq_len
  plgpu.store(dk_ref.at[bi, pl.ds(kb * block_k, block_k), hi, :],
              (dk * scale).astype(dk_ref.dtype), mask=inside[:, None])
  plgpu.store(dv_ref.at[bi, pl.ds(kb * block_k, block_k), hi, :], dv.astype(dv_ref.dtype),
              mask=inside[:, None])


def _params(tile):
  return plgpu.CompilerParams(num_warps=tile.num_warps, num_stages=tile.num_stages)


def _statics(q, st, tile):
  return dict(seq_len=q.shape[1], window=st.window, window_only=st.window_only,
              block_q=tile.block_q, block_k=tile.block_k, scale=1.0 / math.sqrt(q.shape[-1]))


def _slot_block_call(kernel, name, tile, q, pos, st, inputs, compacted=()):
  """A (batch, head, slot block) kernel writing rows of a [b, seq, h, d] output into a zeroed
  buffer it aliases (only selected rows are written), a [b, h, slots] fp32 statistic, and
  the compacted [b, slots, h, d] rows named in `compacted` (unwritten where a slot block
  holds no selected row)."""
  b, l, h, d = q.shape
  slots = pos.shape[1]
  return pl.pallas_call(
      functools.partial(kernel, **_statics(q, st, tile)),
      grid=(b, h, slots // tile.block_q), compiler_params=_params(tile), interpret=st.interpret,
      name=name, input_output_aliases={len(inputs): 0},
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, slots), _F32)]
                + [jax.ShapeDtypeStruct((b, slots, h, d), t.dtype) for t in compacted],
  )(*inputs, jnp.zeros_like(q))


def _forward(q, k, v, pos, count, ok, seg, st):
  """(o, lse [b, h, slots] fp32)."""
  del count
  return _slot_block_call(_forward_kernel, "selective_attention_forward",
                          st.block_sizes.forward, q, pos, st, (pos, q, k, v, ok, seg))


def _dq(q, k, v, pos, ok, seg, o, lse, do, st):
  """(dq, delta [b, h, slots] fp32, compacted q, compacted do)."""
  return _slot_block_call(_dq_kernel, "selective_attention_dq", st.block_sizes.dq, q, pos,
                          st, (pos, q, k, v, ok, seg, do, o, lse), compacted=(q, do))


def _dkv(q_c, k, v, pos, count, ok, seg, lse, delta, do_c, st):
  """(dk, dv) from the compacted q and do rows."""
  b, l, h, d = k.shape
  tile = st.block_sizes.dkv
  nkb = pl.cdiv(l, tile.block_k)
  ranges = slot_blocks_seeing_key_blocks(count, nkb, st.window, tile.block_q, tile.block_k)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, **_statics(k, st, tile)), grid=(b, h, nkb),
      compiler_params=_params(tile), interpret=st.interpret, name="selective_attention_dkv",
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
  )(ranges, pos, q_c, k, v, ok, seg, do_c, lse, delta)


def _backward(q, k, v, pos, count, ok, seg, o, lse, do, st):
  dq, delta, q_c, do_c = _dq(q, k, v, pos, ok, seg, o, lse, do, st)
  dk, dv = _dkv(q_c, k, v, pos, count, ok, seg, lse, delta, do_c, st)
  return dq, dk, dv


_selective_attention = make_selective_attention(_forward, _backward)


def selective_attention_gpu(q, k, v, select, *, window: int, kv_select=None, segment_ids=None,
                            block_sizes: BlockSizes = BlockSizes.for_backend("gpu"),
                            interpret: bool = False):
  """Causal sliding-window attention for the selected query rows (zeros elsewhere).

  Args as taipan_jax.ops.selective_window_attention: q, k, v [batch, seq, heads, head_dim];
  select [batch, seq] bool; window >= 1; kv_select optional [batch, seq] bool restricting
  keys; segment_ids optional [batch, seq] int. Returns [batch, seq, heads, head_dim], q.dtype.
  """
  return _selective_attention(q, k, v, select, window=window, kv_select=kv_select,
                              segment_ids=segment_ids, block_sizes=block_sizes,
                              interpret=interpret)
