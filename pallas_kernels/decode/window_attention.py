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

ring_attention_gpu is the SAL's whole decode step on its ring buffer: the first kernel also
writes the token's key and value into slot pos % slots (in place) and sets that slot's
filled and kept flags, and attends with the new entry from registers; the second advances
pos. XLA spent about seven kernels on those scattered updates and their bounds checks (9 µs
a SAL on an H200, more than the attention itself).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode.reference import check_ring_attention_operands

_F32 = jnp.float32
_LOG2E = math.log2(math.e)
_NO_SCORE = -1e30    # the running max's start: below any score, finite (no -inf tests)


def _is_active(active_ref, bi):
  """A row's flag: int 0/1 from window_attention_gpu, a SAL's fp32 selection mask from
  ring_attention_gpu."""
  a = active_ref[bi]
  return a > 0.5 if jnp.issubdtype(active_ref.dtype, jnp.floating) else a != 0


def _partial_kernel(q_ref, k_ref, v_ref, valid_ref, active_ref, acc_ref, m_ref, l_ref, *,
                    slots, chunk, block_s, scale, new=None):
  """new: (slot, k_new, v_new, valid_new) of a ring buffer's appended entry (see
  _append_kernel), which replaces what the cache holds in that slot."""
  bi, hi, ci = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  d = q_ref.shape[-1]

  @pl.when(_is_active(active_ref, bi))
  def _():
    q = q_ref[bi, hi, :].astype(_F32) * (scale * _LOG2E)

    def body(i, carry):
      acc, m, l = carry
      start = ci * chunk + i * block_s
      inside = start + jnp.arange(block_s) < slots
      ok = plgpu.load(valid_ref.at[bi, pl.ds(start, block_s)], mask=inside, other=0) != 0
      k = plgpu.load(k_ref.at[bi, pl.ds(start, block_s), hi, :], mask=inside[:, None],
                     other=0.0)
      if new is not None:
        here = start + jnp.arange(block_s) == new[0]
        ok = jnp.where(here, new[3], ok)
        k = jnp.where(here[:, None], new[1][None, :], k)
      s = jnp.where(ok, jnp.sum(k.astype(_F32) * q[None, :], axis=1), -jnp.inf)   # [block_s]
      m_new = jnp.maximum(m, jnp.max(s))
      p = jnp.exp2(s - m_new)
      alpha = jnp.exp2(m - m_new)
      v = plgpu.load(v_ref.at[bi, pl.ds(start, block_s), hi, :], mask=inside[:, None],
                     other=0.0)
      if new is not None:
        v = jnp.where(here[:, None], new[2][None, :], v)
      acc = acc * alpha + jnp.sum(p[:, None] * v.astype(_F32), axis=0)
      return acc, m_new, l * alpha + jnp.sum(p)

    init = (jnp.zeros((d,), _F32), jnp.full((), _NO_SCORE, _F32), jnp.zeros((), _F32))
    acc, m, l = jax.lax.fori_loop(0, chunk // block_s, body, init)
    acc_ref[bi, hi, ci, :] = acc
    m_ref[bi, hi, ci] = m
    l_ref[bi, hi, ci] = l


def _append_kernel(q_ref, kn_ref, vn_ref, k_ref, v_ref, filled_ref, kept_ref, pos_ref, sel_ref,
                   acc_ref, m_ref, l_ref, k_out, v_out, filled_out, kept_out, *, slots, chunk,
                   block_s, scale, kv_selected_only):
  """The ring buffer's append and the partial attention (grid batch, heads, splits): the
  program whose chunk holds slot pos % slots writes this head's new key and value there, and
  head 0's also the slot's flags. The outputs alias the cache, so nothing else is copied.
  Only programs of that chunk read the slot, and they take the appended entry from registers,
  whatever the cache holds there when their loads land. pos is not written here: every
  program reads it, and the combine kernel advances it."""
  bi, hi, ci = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  d = q_ref.shape[-1]
  pos = pos_ref[bi]
  slot = pos % slots
  selected = sel_ref[bi] > 0.5
  cols = pl.ds(0, d)
  k_new = plgpu.load(kn_ref.at[bi, hi, cols])
  v_new = plgpu.load(vn_ref.at[bi, hi, cols])
  owner = slot // chunk == ci

  @pl.when(owner)
  def _():
    plgpu.store(k_out.at[bi, slot, hi, cols], k_new.astype(k_out.dtype))
    plgpu.store(v_out.at[bi, slot, hi, cols], v_new.astype(v_out.dtype))

  @pl.when(owner & (hi == 0))
  def _():
    filled_out[bi, slot] = True
    kept_out[bi, slot] = selected

  # The attention reads the flags that decide validity; the new slot's is set from registers.
  new = (slot, k_new.astype(k_out.dtype).astype(_F32), v_new.astype(v_out.dtype).astype(_F32),
         selected if kv_selected_only else True)
  _partial_kernel(q_ref, k_ref, v_ref, kept_ref if kv_selected_only else filled_ref, sel_ref,
                  acc_ref, m_ref, l_ref, slots=slots, chunk=chunk, block_s=block_s,
                  scale=scale, new=new)


def _combine_kernel(active_ref, acc_ref, m_ref, l_ref, *refs):
  """Outputs o, or (ring_attention_gpu) the operand pos aliased to the output pos + 1, which
  program (row, 0) writes: no other program reads pos, and the partial kernel is done."""
  bi, hi = pl.program_id(0), pl.program_id(1)    # outside pl.when: interpret mode needs it
  if len(refs) == 1:
    o_ref, = refs
  else:
    pos_ref, o_ref, pos_out = refs

    @pl.when(hi == 0)
    def _():
      pos_out[bi] = pos_ref[bi] + 1

  d = o_ref.shape[-1]
  active = _is_active(active_ref, bi)

  @pl.when(~active)
  def _():
    o_ref[bi, hi, :] = jnp.zeros((d,), o_ref.dtype)

  @pl.when(active)
  def _():
    m = m_ref[bi, hi, :]                           # [splits]
    weight = jnp.exp2(m - jnp.max(m))              # chunks with no valid slot: l = 0
    total = jnp.sum(weight * l_ref[bi, hi, :])
    out = jnp.sum(weight[:, None] * acc_ref[bi, hi, :, :], axis=0)
    seen = total > 0
    o_ref[bi, hi, :] = jnp.where(seen, out / jnp.where(seen, total, 1.0), 0.0).astype(o_ref.dtype)


def default_max_splits(slots: int) -> int:
  """About 512 slots a program, from 16 to 128 chunks (a power of two). Measured on an H200
  (12 heads of 64, bf16, batch 1; µs a call, XLA in brackets): 16K slots 40.1 at 16
  chunks, 30.3 at 32, 29.2 at 64 (37.2); 64K 116.4 at 16, 86.6 at 32, 76.2 at 128 (85.6);
  128K 212.4 at 16, 132.3 at 128 (143.0). At the SAL's 2048 slots it gives 16, as before."""
  return min(128, max(16, 1 << max(0, pl.cdiv(slots, 512) - 1).bit_length()))


def _splits(slots, block_s, max_splits):
  """(splits, chunk): a power-of-two number of chunks of whole blocks covering the slots;
  max_splits None takes default_max_splits."""
  max_splits = max_splits or default_max_splits(slots)
  blocks = pl.cdiv(slots, block_s)
  splits = min(1 << (blocks - 1).bit_length(), max_splits)
  return splits, pl.cdiv(blocks, splits) * block_s


@functools.partial(jax.jit, static_argnames=("block_s", "max_splits", "num_warps", "interpret"))
def window_attention_gpu(q, k_cache, v_cache, valid, active=None, *, block_s: int = 128,
                         max_splits: int | None = None, num_warps: int = 4,
                         interpret: bool = False):
  """softmax(q k^T / sqrt(d)) v over the valid slots, per row and head; zeros for rows with
  no valid slot and for inactive rows.

  q: [batch, heads, head_dim]; k_cache, v_cache: [batch, slots, heads, head_dim] (any slot
  count; head_dim a power of two); valid: [batch, slots] bool; active: optional [batch] bool
  (default all). The slots are split into up to max_splits chunks (a power of two; default
  default_max_splits(slots)) of whole blocks of block_s. Returns [batch, heads, head_dim] in
  q.dtype.
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


@functools.partial(jax.jit, static_argnames=("kv_selected_only", "block_s", "max_splits",
                                             "num_warps", "interpret"))
def ring_attention_gpu(q, k_new, v_new, k_cache, v_cache, filled, kept, pos, select, *,
                       kv_selected_only: bool = False, block_s: int = 128,
                       max_splits: int | None = None, num_warps: int = 4,
                       interpret: bool = False):
  """A SAL's decode step on its ring buffer: appends the token, then attends.

  The token's key and value go into slot pos % slots (filled; kept if selected) and pos
  advances, in place; the query attends to the filled slots, or the kept ones with
  kv_selected_only, the new one included. Rows with select <= 0.5 read no cache and return
  zeros (they are still appended).
  q, k_new, v_new: [batch, heads, head_dim]; k_cache, v_cache: [batch, slots, heads,
  head_dim]; filled, kept: [batch, slots] bool; pos: [batch] int32 (>= 0); select: [batch]
  fp32, the selection mask. Returns (out [batch, heads, head_dim] in q.dtype,
  (k_cache, v_cache, filled, kept, pos + 1)); see reference.ring_attention_reference.
  """
  check_ring_attention_operands(q, k_new, v_new, k_cache, v_cache, filled, kept, pos, select)
  b, h, d = q.shape
  if d & (d - 1):
    raise ValueError(f"ring_attention_gpu needs head_dim a power of two, got {d}")
  slots = k_cache.shape[1]
  splits, chunk = _splits(slots, block_s, max_splits)
  select = select.astype(_F32)
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=2)
  acc, m, l, k_cache, v_cache, filled, kept = pl.pallas_call(
      functools.partial(_append_kernel, slots=slots, chunk=chunk, block_s=block_s,
                        scale=1.0 / math.sqrt(d), kv_selected_only=kv_selected_only),
      out_shape=[jax.ShapeDtypeStruct((b, h, splits, d), _F32),
                 jax.ShapeDtypeStruct((b, h, splits), _F32),
                 jax.ShapeDtypeStruct((b, h, splits), _F32),
                 *(jax.ShapeDtypeStruct(t.shape, t.dtype)
                   for t in (k_cache, v_cache, filled, kept))],
      grid=(b, h, splits), compiler_params=params, interpret=interpret,
      input_output_aliases={3: 3, 4: 4, 5: 5, 6: 6},
      name="ring_attention_partial",
  )(q, k_new, v_new, k_cache, v_cache, filled, kept, pos, select)
  out, pos = pl.pallas_call(
      _combine_kernel, out_shape=(jax.ShapeDtypeStruct((b, h, d), q.dtype),
                                  jax.ShapeDtypeStruct(pos.shape, pos.dtype)),
      grid=(b, h), compiler_params=params, interpret=interpret, input_output_aliases={4: 1},
      name="window_decode_attention_combine",
  )(select, acc, m, l, pos)
  return out, (k_cache, v_cache, filled, kept, pos)
