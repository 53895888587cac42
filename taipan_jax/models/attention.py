"""Full causal attention block with RoPE (Transformer++ and Jamba baselines) and RoPE itself."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from taipan_jax import ops
from taipan_jax.config import mlp_hidden_size
from taipan_jax.models.layer import LayerOutput
from taipan_jax.models.mlp import SwiGLU, dense
from taipan_jax.models.norms import RMSNorm


def apply_rope(x, positions, theta: float):
  """Rotary embedding, rotate-half layout (LLaMA).  x: [b, l, h, d], positions: [b, l]."""
  d = x.shape[-1]
  freqs = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  angles = positions.astype(jnp.float32)[..., None, None] * freqs      # [b, l, 1, d/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


@struct.dataclass
class KVCache:
  """Preallocated keys/values of a full attention layer.

  k, v: [batch, max_len, heads, head_dim]; pos: [batch] int32, tokens written so far.
  """
  k: jax.Array
  v: jax.Array
  pos: jax.Array


class AttentionBlock(nnx.Module):
  """LLaMA block: h + Attn(RMSNorm(h)), then h + SwiGLU(RMSNorm(h)).  h: [b, l, d_model]."""

  def __init__(self, cfg, *, residual_scale: float, rngs: nnx.Rngs):
    m, att = cfg.model, cfg.attention
    d = m.d_model
    self.heads = d // att.head_dim
    self.head_dim = att.head_dim
    self.rope_theta = att.rope_theta
    self.max_len = att.max_cache_len
    self.dtype = jnp.dtype(m.dtype)
    pdt = jnp.dtype(m.param_dtype)
    kw = dict(dtype=self.dtype, param_dtype=pdt, rngs=rngs)
    self.norm_attn = RMSNorm(d, eps=m.norm_eps, dtype=self.dtype, param_dtype=pdt)
    self.q_proj = dense(d, d, axes=("embed", "heads"), **kw)
    self.k_proj = dense(d, d, axes=("embed", "heads"), **kw)
    self.v_proj = dense(d, d, axes=("embed", "heads"), **kw)
    self.o_proj = dense(d, d, axes=("heads", "embed"), scale=residual_scale, **kw)
    self.norm_mlp = RMSNorm(d, eps=m.norm_eps, dtype=self.dtype, param_dtype=pdt)
    self.mlp = SwiGLU(d, mlp_hidden_size(cfg), residual_scale=residual_scale, **kw)

  def _qkv(self, x, positions):
    return self._heads(self.q_proj(x), self.k_proj(x), self.v_proj(x), positions)

  def _heads(self, q, k, v, positions):
    """Projections [b, l, d_model] -> q, k, v [b, l, heads, head_dim], RoPE at positions."""
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.head_dim)
    q = apply_rope(split(q), positions, self.rope_theta)
    k = apply_rope(split(k), positions, self.rope_theta)
    return q, k, split(v)

  def _mlp(self, h):
    return h + self.mlp(self.norm_mlp(h)).astype(jnp.float32)

  def init_cache(self, batch_size: int) -> KVCache:
    shape = (batch_size, self.max_len, self.heads, self.head_dim)
    return KVCache(k=jnp.zeros(shape, self.dtype), v=jnp.zeros(shape, self.dtype),
                   pos=jnp.zeros((batch_size,), jnp.int32))

  selects = False

  def __call__(self, h, *, token_mask=None, segment_ids=None, gumbel_key=None, tau=None,
               forced_rate=None, cache: KVCache | None = None, return_cache: bool = False,
               token_ids=None) -> LayerOutput:
    """h: [b, l, d_model] -> LayerOutput(h, {}, the KV cache after l or None): the layer
    interface (models/layer.py); token_mask, gumbel_key, tau, forced_rate and token_ids are
    unused.

    segment_ids: optional [b, l] int (packed documents): attention stays inside a segment.
    RoPE keeps absolute positions: it only sees differences, so an offset document gets the
    same scores. cache: continue from it (the rows also read its keys); it must have room for
    l more tokens.
    """
    if segment_ids is not None and (return_cache or cache is not None):
      raise ValueError("a decode cache continues one document: segment_ids cannot be combined "
                       "with cache or return_cache; prefill each document in its own row")
    b, l, d = h.shape
    if cache is None and return_cache:
      if l > self.max_len:
        raise ValueError(f"prompt of {l} tokens exceeds attention.max_cache_len="
                         f"{self.max_len}; raise attention.max_cache_len")
      cache = self.init_cache(b)
    start = jnp.zeros((b,), jnp.int32) if cache is None else cache.pos
    positions = start[:, None] + jnp.arange(l)[None, :]
    q, k, v = self._qkv(self.norm_attn(h), positions)
    # Full causal attention (the baselines) keeps the XLA path: the query-compacted kernels
    # pay off only when a fraction of the rows is selected.
    every = jnp.ones((b, l), bool)
    if cache is None:
      attn = ops.selective_window_attention(q, k, v, every, window=l,
                                            implementation="xla",
                                            segment_ids=segment_ids)
    else:
      # The whole preallocated cache is the prefix; its slots past pos are masked off.
      slots = cache.k.shape[1]
      written = jnp.arange(slots)[None, :] < cache.pos[:, None]
      attn = ops.attention_with_prefix(q, k, v, every, k_prefix=cache.k, v_prefix=cache.v,
                                       prefix_ok=written, window=slots + l,
                                       implementation="xla")
    h = self._mlp(h + self.o_proj(attn.reshape(b, l, d)).astype(jnp.float32))
    if not return_cache:
      return LayerOutput(h, {}, None)
    write = jax.vmap(lambda c, new, p: jax.lax.dynamic_update_slice_in_dim(c, new, p, axis=0))
    return LayerOutput(h, {}, KVCache(k=write(cache.k, k.astype(self.dtype), cache.pos),
                                      v=write(cache.v, v.astype(self.dtype), cache.pos),
                                      pos=cache.pos + l))

  def split_refusal(self) -> str | None:
    return ("context-parallel forward covers Mamba-2 and SAL layers; full attention "
            "('a' in model.pattern) is not split; fix: evaluate it on one device")

  def step(self, h, cache: KVCache, token_ids=None) -> LayerOutput:
    """h: [batch, d_model] one token per row -> LayerOutput(h, {}, cache)."""
    b, d = h.shape
    qkv = ops.norm_matvec(h, self.norm_attn.weight[...], (self.q_proj.kernel[...],
                                                           self.k_proj.kernel[...],
                                                           self.v_proj.kernel[...]),
                          eps=self.norm_attn.eps, dtype=self.dtype)
    q, k, v = self._heads(*(t[:, None] for t in qkv), cache.pos[:, None])
    rows = jnp.arange(b)
    ck = cache.k.at[rows, cache.pos].set(k[:, 0].astype(self.dtype))
    cv = cache.v.at[rows, cache.pos].set(v[:, 0].astype(self.dtype))
    valid = jnp.arange(ck.shape[1])[None, :] <= cache.pos[:, None]
    attn = ops.window_decode_attention(q[:, 0], ck, cv, valid)
    h = ops.norm_matvec(attn.reshape(b, d), None, self.o_proj.kernel[...], residual=h,
                        dtype=self.dtype)
    h = self.mlp.step(h, self.norm_mlp)
    return LayerOutput(h, {}, KVCache(k=ck, v=cv, pos=cache.pos + 1))
