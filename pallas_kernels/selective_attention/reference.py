"""Selective sliding-window attention as one dense masked softmax: the ground truth for the
kernels (and for taipan_jax's XLA path). Quadratic in the sequence: for tests only.

Query i sees key j when i - window < j <= i, kv_select[j] (when given) and both carry the same
segment id (when given); rows not selected, and rows that see no key, are 0.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def selective_attention_reference(q, k, v, select, *, window: int, kv_select=None,
                                  segment_ids=None):
  """q, k, v: [b, l, h, d]; select, kv_select: [b, l] bool; segment_ids: [b, l] int.

  Computes in fp32, or float64 for float64 inputs (under jax.enable_x64); returns that dtype.
  Masked scores are -1e30 rather than -inf, so rows that see no key stay finite and
  differentiable.
  """
  dtype = jnp.promote_types(q.dtype, jnp.float32)
  q, k, v = (t.astype(dtype) for t in (q, k, v))
  b, l = q.shape[:2]
  i = jnp.arange(l)[:, None]
  j = jnp.arange(l)[None, :]
  mask = jnp.broadcast_to((j <= i) & (j > i - window), (b, l, l))
  if kv_select is not None:
    mask = mask & jnp.asarray(kv_select, bool)[:, None, :]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  hi = jax.lax.Precision.HIGHEST
  s = jnp.einsum("bihd,bjhd->bhij", q, k, precision=hi) / math.sqrt(q.shape[-1])
  s = jnp.where(mask[:, None], s, -1e30)
  p = jnp.exp(s - s.max(-1, keepdims=True)) * mask[:, None]
  denom = p.sum(-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bhij,bjhd->bihd", p, v, precision=hi)
  return out * jnp.asarray(select, bool)[:, :, None, None]
