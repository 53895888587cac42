"""Query-compacted causal sliding-window attention as Pallas TPU (Mosaic) kernels.

The same algorithm as gpu.py (see there): selected rows sorted into slots, each slot block
reading only its rows' key span. TPU specifics:
  * the key-block range of every slot block (forward, dq) and the slot-block range of every
    key block (dk/dv) are computed outside and prefetched into SMEM as scalars, since loop
    bounds must be scalars and Mosaic reduces vectors to vectors;
  * per (batch, head), the whole padded sequence of k and v (forward, dq) or of the compacted
    q and do (dk/dv) is one VMEM block, re-fetched only when (batch, head) changes; a loop
    inside the kernel slices the blocks it needs. This bounds the sequence by VMEM (at
    head_dim 64, bf16: 2 x seq x 128 B, 4 MiB at seq 16384); longer sequences need manual
    DMA of the key span, not done yet.
  * row statistics are [rows, 1] columns and key facts [1, keys] rows, so masks broadcast.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.selective_attention.common import (BlockSizes, gather_rows,
                                                       make_selective_attention, scatter_rows,
                                                       slot_blocks_seeing_key_blocks)

_F32 = jnp.float32


def _dot(a, b, contract):
  precision = jax.lax.Precision.HIGHEST if a.dtype == _F32 else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                             preferred_element_type=_F32)


def _mask(pos, seg_q, start, block_k, ok, seg_k, window):
  """pos, seg_q: [bq, 1]; ok, seg_k: [1, bk] -> [bq, bk] visibility."""
  keys = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
  return (keys <= pos) & (keys > pos - window) & (ok > 0) & (seg_k == seg_q)


def _forward_kernel(ranges_ref, pos_ref, segq_ref, q_ref, k_ref, v_ref, ok_ref, seg_ref,
                    o_ref, lse_ref, *, window, block_k, scale, slot_blocks):
  bi, si = pl.program_id(0), pl.program_id(2)
  lo = ranges_ref[2 * (bi * slot_blocks + si)]
  hi = ranges_ref[2 * (bi * slot_blocks + si) + 1]
  pos, seg_q = pos_ref[0], segq_ref[0]                         # [bq, 1]
  q = q_ref[0, 0]                                              # [bq, d]

  def body(kb, carry):
    acc, m, l = carry
    start = pl.multiple_of(kb * block_k, block_k)
    k = k_ref[0, 0, pl.ds(start, block_k), :]
    v = v_ref[0, 0, pl.ds(start, block_k), :]
    mask = _mask(pos, seg_q, start, block_k, ok_ref[0, :, pl.ds(start, block_k)],
                 seg_ref[0, :, pl.ds(start, block_k)], window)
    s = jnp.where(mask, _dot(q, k, ((1,), (1,))) * scale, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.where(mask, jnp.exp(s - m_safe), 0.0)
    alpha = jnp.exp(jnp.where(m == -jnp.inf, 0.0, m) - m_safe)
    acc = acc * alpha + _dot(p.astype(v.dtype), v, ((1,), (0,)))
    return acc, m_new, l * alpha + jnp.sum(p, axis=1, keepdims=True)

  bq, d = q.shape
  init = (jnp.zeros((bq, d), _F32), jnp.full((bq, 1), -jnp.inf, _F32), jnp.zeros((bq, 1), _F32))
  acc, m, l = jax.lax.fori_loop(lo, hi, body, init)
  seen = l > 0
  safe_l = jnp.where(seen, l, 1.0)
  o_ref[0, 0] = jnp.where(seen, acc / safe_l, 0.0).astype(o_ref.dtype)
  lse_ref[0, 0] = jnp.where(seen, jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(safe_l), jnp.inf)


def _dq_kernel(ranges_ref, pos_ref, segq_ref, q_ref, k_ref, v_ref, ok_ref, seg_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, window, block_k, scale, slot_blocks):
  bi, si = pl.program_id(0), pl.program_id(2)
  lo = ranges_ref[2 * (bi * slot_blocks + si)]
  hi = ranges_ref[2 * (bi * slot_blocks + si) + 1]
  pos, seg_q = pos_ref[0], segq_ref[0]
  q, do = q_ref[0, 0], do_ref[0, 0]
  lse, delta = lse_ref[0, 0], delta_ref[0, 0]                 # [bq, 1]

  def body(kb, dq):
    start = pl.multiple_of(kb * block_k, block_k)
    k = k_ref[0, 0, pl.ds(start, block_k), :]
    v = v_ref[0, 0, pl.ds(start, block_k), :]
    mask = _mask(pos, seg_q, start, block_k, ok_ref[0, :, pl.ds(start, block_k)],
                 seg_ref[0, :, pl.ds(start, block_k)], window)
    p = jnp.where(mask, jnp.exp(_dot(q, k, ((1,), (1,))) * scale - lse), 0.0)
    ds = p * (_dot(do, v, ((1,), (1,))) - delta)
    return dq + _dot(ds.astype(k.dtype), k, ((1,), (0,)))

  dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, _F32))
  dq_ref[0, 0] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(ranges_ref, pos_ref, segq_ref, q_ref, k_ref, v_ref, ok_ref, seg_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, window, block_q, block_k, scale,
                key_blocks):
  """Transposed scores [bk, bq]: the whole-sequence row facts (positions, segment ids, lse,
  delta) arrive as lane-dense [1, slots] rows. As [slots, 1] columns each would take a
  128-lane tile per slot in VMEM: at 4096 slots that overflowed v5e's 16 MiB of scoped VMEM."""
  bi, kb = pl.program_id(0), pl.program_id(2)
  lo = ranges_ref[2 * (bi * key_blocks + kb)]
  hi = ranges_ref[2 * (bi * key_blocks + kb) + 1]
  k, v = k_ref[0, 0], v_ref[0, 0]                              # [bk, d]
  ok, seg_k = jnp.transpose(ok_ref[0]), jnp.transpose(seg_ref[0])   # [bk, 1]
  keys = kb * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)

  def body(sb, carry):
    dk, dv = carry
    start = pl.multiple_of(sb * block_q, block_q)
    rows, lanes = pl.ds(start, block_q), pl.ds(start, block_q)
    pos, seg_q = pos_ref[0, :, lanes], segq_ref[0, :, lanes]   # [1, bq]
    q, do = q_ref[0, 0, rows, :], do_ref[0, 0, rows, :]        # [bq, d]
    lse, delta = lse_ref[0, 0, :, lanes], delta_ref[0, 0, :, lanes]
    mask = (keys <= pos) & (keys > pos - window) & (ok > 0) & (seg_k == seg_q)   # [bk, bq]
    p = jnp.where(mask, jnp.exp(_dot(k, q, ((1,), (1,))) * scale - lse), 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, ((1,), (0,)))
    ds = p * (_dot(v, do, ((1,), (1,))) - delta)
    dk = dk + _dot(ds.astype(q.dtype), q, ((1,), (0,)))
    return dk, dv

  zeros = jnp.zeros(k.shape, _F32)
  dk, dv = jax.lax.fori_loop(lo, hi, body, (zeros, zeros))
  dk_ref[0, 0] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[0, 0] = dv.astype(dv_ref.dtype)


def _interpret(interpret):
  return pltpu.InterpretParams() if interpret is True else interpret


# Scoped VMEM: the default limit (16 MiB on v5e, 32 MiB on later chips) is raised to what a
# kernel's whole-sequence blocks need, double-buffered, plus room for its tiles; past the
# cap the sequence is too long for one (batch, head) to sit in VMEM.
_MIB = 1 << 20
_VMEM_FLOOR, _VMEM_CAP, _TILE_ROOM = 32 * _MIB, 96 * _MIB, 8 * _MIB


def _vmem_bytes(shape, dtype):
  """VMEM bytes of a block: the last dim padded to 128 lanes, the one before to the sublanes
  (8 rows of 32 bits)."""
  *lead, rows, lanes = shape
  itemsize = jnp.dtype(dtype).itemsize
  packing = max(1, 4 // itemsize)
  rows = -(-rows // (8 * packing)) * 8 * packing
  lanes = -(-lanes // 128) * 128
  return math.prod(lead) * rows * lanes * itemsize


def _vmem_need(whole_blocks) -> int:
  return 2 * sum(_vmem_bytes(s, d) for s, d in whole_blocks) + _TILE_ROOM


def fits_vmem(seq_len: int, head_dim: int, dtype, block: int = 128) -> bool:
  """Whether every kernel's whole-sequence blocks fit the VMEM cap at this length (keys and
  slots padded to `block`); past it the kernels refuse the call."""
  lp = seq_len + (-seq_len) % block
  keys = _key_side_blocks(lp, head_dim, dtype)
  return max(_vmem_need(keys), _vmem_need(_slot_side_blocks(lp, head_dim, dtype))) <= _VMEM_CAP


def vmem_limit(whole_blocks) -> int:
  """The scoped VMEM limit for kernels whose whole-sequence blocks are `whole_blocks`
  ((shape, dtype) pairs); raises past the cap."""
  need = _vmem_need(whole_blocks)
  if need > _VMEM_CAP:
    raise ValueError(f"selective attention: {need / _MIB:.0f} MiB of VMEM for one (batch, head)"
                     f"'s sequence (blocks {[s for s, _ in whole_blocks]}), over {_VMEM_CAP // _MIB}"
                     " MiB; fix: split the length over more devices (mesh.sequence) or use the "
                     "'xla' implementation")
  return max(need, _VMEM_FLOOR)


def _call(kernel, grid, num_scalars, in_specs, out_specs, out_shape, interpret, whole_blocks):
  return pl.pallas_call(
      kernel, out_shape=out_shape, interpret=_interpret(interpret),
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=num_scalars, grid=grid,
                                             in_specs=in_specs, out_specs=out_specs),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel"),
          vmem_limit_bytes=vmem_limit(whole_blocks)))


def _key_side_blocks(lp, d, dtype):
  """The forward and dq kernels' whole-sequence blocks: k and v, the key facts."""
  return [((lp, d), dtype)] * 2 + [((1, lp), jnp.int32)] * 2


def _slot_side_blocks(slots, d, dtype):
  """The dk/dv kernel's whole-sequence blocks: q and do, the rows' four facts."""
  return [((slots, d), dtype)] * 2 + [((1, slots), _F32)] * 4


def _key_ranges(pos, l, window, bs):
  """[b * slot_blocks * 2] int32: the key blocks [lo, hi) each slot block reads."""
  b, slots = pos.shape
  blocks = pos.reshape(b, slots // bs.block_q, bs.block_q)
  valid = blocks < l
  first = jnp.min(jnp.where(valid, blocks, 2**30), axis=-1)
  last = jnp.max(jnp.where(valid, blocks, -1), axis=-1)
  lo = jnp.maximum(first - window + 1, 0) // bs.block_k
  hi = jnp.where(last >= 0, last // bs.block_k + 1, lo)
  return jnp.stack([lo, hi], axis=-1).astype(jnp.int32).reshape(-1)


def _slot_ranges(count, lp, window, bs):
  """[b * key_blocks * 2] int32: the slot blocks [lo, hi) whose rows see each key block."""
  return slot_blocks_seeing_key_blocks(count, lp // bs.block_k, window, bs.block_q,
                                       bs.block_k).reshape(-1)


def _layouts(q_c, k, v, pos, seg_q, ok, seg, bs):
  """Heads-outer views; keys padded to a multiple of block_k (padding is never visible)."""
  pad = (-k.shape[1]) % bs.block_k
  padk = lambda t: jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
  heads_outer = lambda t: jnp.transpose(t, (0, 2, 1, 3))
  return (heads_outer(q_c), heads_outer(padk(k)), heads_outer(padk(v)), pos[:, :, None],
          seg_q[:, :, None], padk(ok)[:, None], padk(seg)[:, None])


def _forward(q_c, k, v, pos, seg_q, ok, seg, window, bs, interpret):
  b, slots, h, d = q_c.shape
  l = k.shape[1]
  qt, kt, vt, pos3, segq3, ok3, seg3 = _layouts(q_c, k, v, pos, seg_q, ok, seg, bs)
  lp = kt.shape[2]
  nsb = slots // bs.block_q
  row = lambda i, j, s, *_: (i, s, 0)
  slot_block = pl.BlockSpec((1, 1, bs.block_q, d), lambda i, j, s, *_: (i, j, s, 0))
  whole_keys = pl.BlockSpec((1, 1, lp, d), lambda i, j, s, *_: (i, j, 0, 0))
  key_facts = pl.BlockSpec((1, 1, lp), lambda i, j, s, *_: (i, 0, 0))
  kernel = functools.partial(_forward_kernel, window=window, block_k=bs.block_k,
                             scale=1.0 / math.sqrt(d), slot_blocks=nsb)
  o, lse = _call(
      kernel, (b, h, nsb), 1,
      [pl.BlockSpec((1, bs.block_q, 1), row), pl.BlockSpec((1, bs.block_q, 1), row),
       slot_block, whole_keys, whole_keys, key_facts, key_facts],
      [slot_block, pl.BlockSpec((1, 1, bs.block_q, 1), lambda i, j, s, *_: (i, j, s, 0))],
      [jax.ShapeDtypeStruct(qt.shape, q_c.dtype), jax.ShapeDtypeStruct((b, h, slots, 1), _F32)],
      interpret, _key_side_blocks(lp, d, k.dtype))(_key_ranges(pos, l, window, bs), pos3, segq3, qt, kt, vt, ok3, seg3)
  return jnp.transpose(o, (0, 2, 1, 3)), lse


def _backward(q_c, k, v, pos, count, seg_q, ok, seg, lse, delta, do_c, window, bs, interpret):
  b, slots, h, d = q_c.shape
  l = k.shape[1]
  qt, kt, vt, pos3, segq3, ok3, seg3 = _layouts(q_c, k, v, pos, seg_q, ok, seg, bs)
  lp = kt.shape[2]
  dot_ = jnp.transpose(do_c, (0, 2, 1, 3))
  delta = delta[..., None]
  nsb, nkb = slots // bs.block_q, lp // bs.block_k
  scale = 1.0 / math.sqrt(d)
  row = lambda i, j, s, *_: (i, s, 0)
  slot_block = pl.BlockSpec((1, 1, bs.block_q, d), lambda i, j, s, *_: (i, j, s, 0))
  slot_stat = pl.BlockSpec((1, 1, bs.block_q, 1), lambda i, j, s, *_: (i, j, s, 0))
  whole_keys = pl.BlockSpec((1, 1, lp, d), lambda i, j, s, *_: (i, j, 0, 0))
  key_facts = pl.BlockSpec((1, 1, lp), lambda i, j, s, *_: (i, 0, 0))
  dq = _call(
      functools.partial(_dq_kernel, window=window, block_k=bs.block_k, scale=scale,
                        slot_blocks=nsb), (b, h, nsb), 1,
      [pl.BlockSpec((1, bs.block_q, 1), row), pl.BlockSpec((1, bs.block_q, 1), row),
       slot_block, whole_keys, whole_keys, key_facts, key_facts, slot_block, slot_stat,
       slot_stat],
      slot_block, jax.ShapeDtypeStruct(qt.shape, q_c.dtype), interpret,
      _key_side_blocks(lp, d, k.dtype),
  )(_key_ranges(pos, l, window, bs), pos3, segq3, qt, kt, vt, ok3, seg3, dot_, lse, delta)

  whole_slots = pl.BlockSpec((1, 1, slots, d), lambda i, j, kb, *_: (i, j, 0, 0))
  whole_stat = pl.BlockSpec((1, 1, 1, slots), lambda i, j, kb, *_: (i, j, 0, 0))
  slot_facts = pl.BlockSpec((1, 1, slots), lambda i, j, kb, *_: (i, 0, 0))
  key_block = pl.BlockSpec((1, 1, bs.block_k, d), lambda i, j, kb, *_: (i, j, kb, 0))
  key_block_facts = pl.BlockSpec((1, 1, bs.block_k), lambda i, j, kb, *_: (i, 0, kb))
  dk, dv = _call(
      functools.partial(_dkv_kernel, window=window, block_q=bs.block_q, block_k=bs.block_k,
                        scale=scale, key_blocks=nkb), (b, h, nkb), 1,
      [slot_facts, slot_facts, whole_slots, key_block, key_block, key_block_facts,
       key_block_facts, whole_slots, whole_stat, whole_stat],
      [key_block, key_block],
      [jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
      interpret, _slot_side_blocks(slots, d, q_c.dtype),
  )(_slot_ranges(count, lp, window, bs), pos[:, None], seg_q[:, None], qt, kt, vt, ok3, seg3,
    dot_, lse.reshape(b, h, 1, slots), delta.reshape(b, h, 1, slots))
  back = lambda t: jnp.transpose(t, (0, 2, 1, 3))[:, :l]
  return jnp.transpose(dq, (0, 2, 1, 3)), back(dk), back(dv)


def _forward_rows(q, k, v, pos, count, ok, seg, st):
  """Mosaic has no row gather, so the selected rows are compacted around the kernels."""
  del count
  o_c, lse = _forward(gather_rows(q, pos), k, v, pos, gather_rows(seg, pos), ok, seg,
                      st.window, st.block_sizes.forward, st.interpret)
  return scatter_rows(o_c, pos, q.shape[1]), lse


def _backward_rows(q, k, v, pos, count, ok, seg, o, lse, do, st):
  do_c = gather_rows(do, pos)
  delta = jnp.einsum("bshd,bshd->bhs", do_c.astype(_F32), gather_rows(o, pos).astype(_F32))
  dq_c, dk, dv = _backward(gather_rows(q, pos), k, v, pos, count, gather_rows(seg, pos), ok,
                           seg, lse, delta, do_c, st.window, st.block_sizes.forward, st.interpret)
  return scatter_rows(dq_c, pos, q.shape[1]), dk, dv


_compacted_attention = make_selective_attention(_forward_rows, _backward_rows)


def selective_attention_tpu(q, k, v, select, *, window: int, kv_select=None, segment_ids=None,
                            block_sizes: BlockSizes = BlockSizes.for_backend("tpu"),
                            interpret: bool | pltpu.InterpretParams = False):
  """As selective_attention_gpu, on the Mosaic kernels (TPU, or any backend in interpret
  mode). One tile for all three kernels (BlockSizes.uniform), block_q and block_k multiples
  of 8 (128 fills the MXU)."""
  tile = block_sizes.forward
  tiles = {(t.block_q, t.block_k) for t in (block_sizes.forward, block_sizes.dq, block_sizes.dkv)}
  if len(tiles) > 1:
    raise ValueError(f"{block_sizes}: the TPU kernels use one block_q x block_k tile for "
                     "forward, dq and dk/dv; build it with BlockSizes.uniform(block_q, block_k)")
  # Compiled, the dk/dv kernel slices its rows' facts and the forward kernels their keys'
  # in lanes: whole tiles of 128. Interpret mode takes any multiple of 8.
  multiple = 8 if interpret else 128
  for name in ("block_q", "block_k"):
    if getattr(tile, name) % multiple:
      raise ValueError(f"block {name}={getattr(tile, name)} must be a multiple of {multiple} "
                       f"for the TPU kernels{' in interpret mode' if interpret else ''}; 128 "
                       "fills the MXU")
  return _compacted_attention(q, k, v, select, window=window, kv_select=kv_select,
                              segment_ids=segment_ids, block_sizes=block_sizes,
                              interpret=interpret)
