"""One new query per row against a cache of keys and values, one Pallas Triton kernel.

A SAL decodes each token against its ring buffer of the last `window` keys and values, a
Transformer++ against its whole cache. Each (row, head) program runs an online softmax (base 2,
fp32 statistics) over the cache in blocks of block_s slots, masked by `valid`.

Rows whose output is not needed (`active` false: a token the SAL's gate did not select) write
zeros and read no cache, so an unselected token's attention costs a launch, not a pass over
`window` keys and values; the XLA path computes every row and multiplies by the mask after.
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


def _kernel(q_ref, k_ref, v_ref, valid_ref, active_ref, o_ref, *, slots, block_s, scale):
  bi, hi = pl.program_id(0), pl.program_id(1)
  d = q_ref.shape[-1]
  active = active_ref[bi] != 0

  @pl.when(jnp.logical_not(active))
  def _():
    o_ref[bi, hi, :] = jnp.zeros((d,), o_ref.dtype)

  @pl.when(active)
  def _():
    q = q_ref[bi, hi, :].astype(_F32) * (scale * _LOG2E)

    def body(i, carry):
      acc, m, l = carry
      start = i * block_s
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
    acc, _, l = jax.lax.fori_loop(0, pl.cdiv(slots, block_s), body, init)
    seen = l > 0
    o_ref[bi, hi, :] = jnp.where(seen, acc / jnp.where(seen, l, 1.0), 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_s", "num_warps", "num_stages", "interpret"))
def window_attention_gpu(q, k_cache, v_cache, valid, active=None, *, block_s: int = 128,
                         num_warps: int = 4, num_stages: int = 3, interpret: bool = False):
  """softmax(q k^T / sqrt(d)) v over the valid slots, per row and head; zeros for rows with
  no valid slot and for inactive rows.

  q: [batch, heads, head_dim]; k_cache, v_cache: [batch, slots, heads, head_dim] (any slot
  count; head_dim a power of two); valid: [batch, slots] bool; active: optional [batch] bool
  (default all). Returns [batch, heads, head_dim] in q.dtype.
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
  kernel = functools.partial(_kernel, slots=slots, block_s=block_s,
                             scale=1.0 / math.sqrt(d))
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((b, h, d), q.dtype), grid=(b, h),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="window_decode_attention",
  )(q, k_cache, v_cache, valid.astype(jnp.int32), active)
