"""Selective sliding-window softmax attention (the SAL's attention, docs/spec.md section 3).

`selective_window_attention` is the parallel form used for training and prefill; it computes
the window blockwise so memory grows with seq * window, not seq^2. `window_decode_attention`
is the one-query form used when decoding against a cache.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.decode.reference import ring_attention_reference, window_attention_reference
from taipan_jax.ops.context_parallel import left_halo, sequence_axis, sequence_parallel
from taipan_jax.ops.dispatch import Kernels, Route, choose, power_of_two
from taipan_jax.ops.kernel_sharding import per_shard
from taipan_jax.ops.dispatch import target_platform

_MIN_BLOCK = 64


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _masked_softmax_attend(q, k, v, mask):
  """Softmax(q k^T / sqrt(d)) v over the keys where mask holds; rows with no key give 0.

  q: [..., tq, h, d], k/v: [..., tk, h, d], mask: [..., tq, tk] bool. Statistics in fp32.
  """
  prec = _precision(q.dtype)
  scale = 1.0 / math.sqrt(q.shape[-1])
  s = jnp.einsum("...ihd,...jhd->...hij", q, k, precision=prec,
                 preferred_element_type=jnp.float32) * scale
  mask = mask[..., None, :, :]
  s = jnp.where(mask, s, -jnp.inf)
  row_max = jnp.max(s, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)   # all-masked rows stay finite
  p = jnp.where(mask, jnp.exp(s - row_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("...hij,...jhd->...ihd", p.astype(v.dtype), v, precision=prec,
                   preferred_element_type=jnp.float32)
  return out


# 'auto' takes the GPU kernels where they tile the shape (measured faster than XLA on an H100,
# benchmarks/selective_attention.py) and the Mosaic kernels on a TPU where a head's whole
# sequence fits their VMEM blocks (chosen on compiled cost, not a timing: docs/tpu_pod.md);
# XLA elsewhere. Interpret mode off a TPU or GPU runs the TPU kernels.
KERNELS = Kernels("selective attention", {"tpu": {}, "gpu": {"head_dim": power_of_two(16)}})
# The decode attention has Triton kernels only.
DECODE_KERNELS = Kernels("decode attention", {"gpu": {"head_dim": power_of_two()}})


def _auto_takes_kernel(head_dim: int, seq_len: int, dtype) -> bool:
  """Whether 'auto' takes the kernel at this shape: on a TPU only where the VMEM blocks fit."""
  if target_platform() != "tpu":
    return True
  from pallas_kernels.selective_attention.tpu import fits_vmem
  return fits_vmem(seq_len, head_dim, dtype)


def attention_route(implementation: str = "auto", interpret: bool = False, *, head_dim: int,
                    seq_len: int, dtype) -> Route:
  """What `selective_window_attention` runs at this shape on the target platform."""
  return choose(KERNELS, implementation, interpret, head_dim=head_dim,
                kernel_by_default=_auto_takes_kernel(head_dim, seq_len, dtype))


def selective_window_attention(q, k, v, select, *, window: int, kv_select=None,
                               segment_ids=None, implementation: str = "auto",
                               interpret: bool = False):
  """Causal sliding-window attention computed for the selected query rows.

  Query i sees keys j with i - window < j <= i (and kv_select[j], when given); no
  positional encoding; scale 1/sqrt(head_dim).

  Args:
    q, k, v: [batch, seq, heads, head_dim].
    select: [batch, seq] bool; rows where it is False return zeros.
    window: the window length w >= 1.
    kv_select: optional [batch, seq] bool restricting the keys.
    segment_ids: optional [batch, seq] int (packed documents): a query sees only keys of
      its own segment.
    implementation, interpret: 'auto', 'xla' or 'pallas', and interpret mode
      (ops/dispatch.py); the kernels compute only the selected rows.

  Returns:
    [batch, seq, heads, head_dim] in q.dtype.
  """
  b, l, h, d = q.shape
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  if sequence_axis() is not None and window > 1:
    return _attention_context_parallel(q, k, v, select, window=window, kv_select=kv_select,
                                       segment_ids=segment_ids, implementation=implementation,
                                       interpret=interpret)
  route = attention_route(implementation, interpret, head_dim=d, seq_len=l, dtype=q.dtype)
  if route.implementation == "pallas":
    from pallas_kernels.selective_attention import (selective_attention_gpu,
                                                    selective_attention_tpu)
    if route.platform == "gpu":
      kernel = functools.partial(selective_attention_gpu, window=window,
                                 interpret=route.interpret)
    else:
      kernel = functools.partial(selective_attention_tpu, window=window,
                                 interpret=route.interpret)
    # Masks that are absent stay absent: the kernels then skip masking inside the window.
    extra = {name: t for name, t in (("kv_select", kv_select), ("segment_ids", segment_ids))
             if t is not None}
    call = lambda q, k, v, select, *rest: kernel(q, k, v, select, **dict(zip(extra, rest)))
    return per_shard(call, (), (q, k, v, select, *extra.values()), num_outputs=1,
                     per_head=(0, 1, 2))
  key_ok = jnp.ones((b, l), bool) if kv_select is None else kv_select.astype(bool)
  block = max(window, _MIN_BLOCK)
  if l <= 2 * block:
    # Short sequences: one dense block.
    i = jnp.arange(l)[:, None]
    j = jnp.arange(l)[None, :]
    mask = ((j <= i) & (j > i - window))[None] & key_ok[:, None, :]
    if segment_ids is not None:
      mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    out = _masked_softmax_attend(q, k, v, mask)
  else:
    # Query block c (block >= window rows) reads key blocks c-1 and c: exactly its window.
    pad = (-l) % block
    nb = (l + pad) // block

    def blocks(t):          # [b, l, ...] -> [b, nb, block, ...], the tail zero-padded
      t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
      return t.reshape(b, nb, block, *t.shape[2:])

    def with_previous(tb):  # [b, nb, block, ...] -> [b, nb, 2 * block, ...]: blocks c-1, c
      prev = jnp.concatenate([jnp.zeros_like(tb[:, :1]), tb[:, :-1]], axis=1)
      return jnp.concatenate([prev, tb], axis=2)

    # Padded keys and the block before 0 get key_ok = False, so whatever else those slots
    # hold (zeros, segment id 0) is never attended.
    qb = blocks(q)
    k2, v2, ok2 = (with_previous(blocks(t)) for t in (k, v, key_ok))
    i = jnp.arange(block)[:, None] + block                       # query offset from block c-1
    j = jnp.arange(2 * block)[None, :]
    mask = ((j <= i) & (j > i - window))[None, None] & ok2[:, :, None, :]
    if segment_ids is not None:
      segb = blocks(segment_ids)
      mask = mask & (segb[:, :, :, None] == with_previous(segb)[:, :, None, :])
    out = _masked_softmax_attend(qb, k2, v2, mask).reshape(b, nb * block, h, d)[:, :l]
  return (out * select[:, :, None, None]).astype(q.dtype)


def attention_with_prefix(q, k, v, select, *, k_prefix, v_prefix, prefix_ok, window: int,
                          kv_select=None, segment_ids=None, prefix_segment_ids=None,
                          implementation: str = "auto", interpret: bool = False):
  """selective_window_attention over a sequence whose keys continue `prefix` keys before it.

  q, k, v: [batch, seq, heads, head_dim]; select, kv_select: [batch, seq] bool as in
  selective_window_attention. k_prefix, v_prefix: [batch, p, heads, head_dim], the p
  positions just before position 0, oldest first; prefix_ok: [batch, p] bool, the prefix keys
  that may be read (False for slots before the document started, or not kv-selected).
  The prefix joins the front as unselected queries and is dropped from the output, so query
  i sees prefix key j when their distance p - j + i is below the window.
  segment_ids: optional [batch, seq] int (packed documents), with prefix_segment_ids
  [batch, p] the prefix keys' ids: no row reads a key of another document.
  Returns [batch, seq, heads, head_dim] in q.dtype.
  """
  b, l = select.shape
  size = k_prefix.shape[1]
  ok = jnp.ones((b, l), bool) if kv_select is None else kv_select.astype(bool)
  k_ext = jnp.concatenate([k_prefix.astype(k.dtype), k], axis=1)
  v_ext = jnp.concatenate([v_prefix.astype(v.dtype), v], axis=1)
  ok_ext = jnp.concatenate([prefix_ok.astype(bool), ok], axis=1)
  q_ext = jnp.concatenate([jnp.zeros((b, size) + q.shape[2:], q.dtype), q], axis=1)
  select_ext = jnp.concatenate([jnp.zeros((b, size), bool), select.astype(bool)], axis=1)
  seg_ext = None
  if segment_ids is not None:
    seg_ext = jnp.concatenate([prefix_segment_ids.astype(segment_ids.dtype), segment_ids], axis=1)
  with sequence_parallel(None):
    out = selective_window_attention(q_ext, k_ext, v_ext, select_ext, window=window,
                                     kv_select=ok_ext, segment_ids=seg_ext,
                                     implementation=implementation, interpret=interpret)
  return out[:, size:]


def _attention_context_parallel(q, k, v, select, *, window, kv_select, segment_ids,
                                implementation, interpret):
  """This device's shard of a sequence split over the sequence axis: its rows attend to the
  previous device's last window - 1 keys as well (a halo; none before the first device),
  those of its own document where segment_ids are given."""
  b, l = select.shape
  size = window - 1
  ok = jnp.ones((b, l), bool) if kv_select is None else kv_select.astype(bool)
  return attention_with_prefix(q, k, v, select, k_prefix=left_halo(k, size),
                               v_prefix=left_halo(v, size), prefix_ok=left_halo(ok, size),
                               window=window, kv_select=kv_select, segment_ids=segment_ids,
                               prefix_segment_ids=(None if segment_ids is None
                                                   else left_halo(segment_ids, size)),
                               implementation=implementation, interpret=interpret)


# 'auto' takes the decode attention kernel on a GPU at every cache length. At a 190M SAL's
# 2048-slot ring buffer on an H100 it took 9.8 us per call against XLA's 10.7 (6.7 against
# 10.4 for an unselected token) and the whole decode step 0.716 ms against 0.778. On a
# Transformer++ layer's cache (12 heads of 64) on an H200, with the split count of
# window_attention.default_max_splits: 4K slots 19.6 us against XLA's 18.0 (within the
# spread of single runs), 16K 30.3 against 37.2, 64K 76.2 against 85.6, 128K 132.3 against
# 143.0 (docs/kernels/decode.md).


def window_decode_attention(q, k_cache, v_cache, valid, *, active=None,
                            implementation: str = "auto", interpret: bool = False):
  """One query per row against a cache of keys.

  Args:
    q: [batch, heads, head_dim]; k_cache, v_cache: [batch, slots, heads, head_dim].
    valid: [batch, slots] bool, the slots this query may read.
    active: optional [batch] bool, the rows whose output is needed (a SAL's selected tokens);
      the others return zeros, and the Triton kernel reads no cache for them.
    implementation, interpret: as ops/dispatch.py; 'auto' (with $TAIPAN_KERNELS unset) takes
      the Triton kernel on a GPU.

  Returns:
    [batch, heads, head_dim] in q.dtype (zeros where no slot is valid).
  """
  route = choose(DECODE_KERNELS, implementation, interpret, head_dim=q.shape[-1])
  if route.implementation == "xla":
    return window_attention_reference(q, k_cache, v_cache, valid, active)
  from pallas_kernels.decode.window_attention import window_attention_gpu
  return window_attention_gpu(q, k_cache, v_cache, valid, active, interpret=route.interpret)


def ring_decode_attention(q, k_new, v_new, k_cache, v_cache, filled, kept, pos, select, *,
                          kv_selected_only: bool = False, implementation: str = "auto",
                          interpret: bool = False):
  """A SAL's decode step on its ring buffer of the last `slots` tokens: appends this token's
  key and value at slot pos % slots, then attends.

  Args:
    q, k_new, v_new: [batch, heads, head_dim], this token's.
    k_cache, v_cache: [batch, slots, heads, head_dim]; filled, kept: [batch, slots] bool
      (slot holds a token; that token was selected); pos: [batch] int32, tokens seen.
    select: [batch] float, the token's selection mask: its row attends if > 0.5 (and is kept),
      the others return zeros and read no cache on the kernel path.
    kv_selected_only: attend to the kept slots only (the kv_select variant), not all filled.
    implementation, interpret: as window_decode_attention's.

  Returns:
    (out [batch, heads, head_dim] in q.dtype, (k_cache, v_cache, filled, kept, pos + 1)).
    The Triton kernel updates the cache in place: it does not copy the buffers.
  """
  route = choose(DECODE_KERNELS, implementation, interpret, head_dim=q.shape[-1])
  args = (q, k_new, v_new, k_cache, v_cache, filled, kept, pos, select)
  if route.implementation == "xla":
    return ring_attention_reference(*args, kv_selected_only=kv_selected_only)
  from pallas_kernels.decode.window_attention import ring_attention_gpu
  return ring_attention_gpu(*args, kv_selected_only=kv_selected_only,
                            interpret=route.interpret)
