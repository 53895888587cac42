"""The LM head and its cross-entropy in one pass over the sequence, never holding all logits.

A 190M model with the Llama-3 vocabulary has a [batch * seq, 128,256] logit array: at 4 x 4096
tokens that is 8 GiB in fp32, written and re-read by the softmax, the loss, and again by their
gradients. Here the sequence is cut into chunks; each chunk's logits live only inside one step
of a `lax.scan`, and the gradients of the head's input and weight are made in the same step
(the loss is a sum, so its cotangent is one scalar that the backward pass multiplies in). The
matrix products are the three an unfused head does (logits, d input, d weight): nothing is
recomputed.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def linear_cross_entropy(h, weight, targets, token_weights, *, chunk: int = 512,
                         dtype=None):
  """Sums of the weighted cross-entropy and correct predictions of the head `h @ weight.T`.

  h: [batch, seq, d] the head's input (after the final norm); weight: [vocab, d] (the tied
  embedding, or the head's kernel transposed); targets: [batch, seq] int; token_weights:
  [batch, seq] float (0 drops a token). chunk: sequence positions per scan step (the step holds
  [batch, chunk, vocab] fp32 logits); seq need not divide by it. dtype: the matmul input dtype
  (default h's); products accumulate in fp32 and the softmax runs in fp32.

  Returns (ce_sum, correct_sum), fp32 scalars: sum_i w_i (logsumexp_i - logit_i[target_i]) and
  sum_i w_i [logit_i[target_i] >= max_i] (argmax accuracy; a target tied with the maximum
  counts as correct). Differentiable in h, weight and token_weights through ce_sum.
  """
  if chunk < 1:
    raise ValueError(f"chunk={chunk}: must be >= 1 sequence positions per step")
  dtype = jnp.dtype(dtype or h.dtype)
  return _fused(h, weight, targets, token_weights.astype(jnp.float32),
                balanced_chunk(h.shape[1], chunk), dtype)


def balanced_chunk(seq: int, chunk: int) -> int:
  """The chunk a sequence of `seq` positions is cut into: as few steps as `chunk` allows,
  split evenly, so the padded tail is under one position per step. Padding is computed as
  logits and thrown away: a 128-token row with a 512-position chunk would spend 4x the head's
  work (on a CPU, half a small model's step)."""
  steps = max(1, -(-seq // chunk))
  return max(1, -(-seq // steps))      # an empty sequence still gets a valid chunk


def _chunked(x, chunk):
  """[b, l, ...] -> [steps, b, chunk, ...], the tail padded with zeros."""
  b, l = x.shape[:2]
  steps = -(-l // chunk)
  x = jnp.pad(x, [(0, 0), (0, steps * chunk - l)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(b, steps, chunk, *x.shape[2:]), 1, 0)


def _unchunked(x, l):
  """[steps, b, chunk, ...] -> [b, l, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :l]


def _chunk_stats(h_c, w, t_c):
  """One chunk's logits [b, c, vocab] fp32, their logsumexp and the target's logit [b, c]."""
  logits = jnp.einsum("bcd,vd->bcv", h_c, w, preferred_element_type=jnp.float32)
  top = jnp.max(logits, axis=-1)
  lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
  target = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
  return logits, lse, target, top


def _sums(h, weight, targets, tw, chunk, dtype):
  w = weight.astype(dtype)

  def body(sums, xs):
    h_c, t_c, w_c = xs
    _, lse, target, top = _chunk_stats(h_c.astype(dtype), w, t_c)
    return (sums[0] + jnp.sum(w_c * (lse - target)),
            sums[1] + jnp.sum(w_c * (target >= top))), None

  zero = jnp.zeros((), jnp.float32)
  (ce, correct), _ = jax.lax.scan(
      body, (zero, zero), (_chunked(h, chunk), _chunked(targets, chunk), _chunked(tw, chunk)))
  return ce, correct


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(h, weight, targets, tw, chunk, dtype):
  return _sums(h, weight, targets, tw, chunk, dtype)


def _fused_fwd(h, weight, targets, tw, chunk, dtype):
  w = weight.astype(dtype)

  def body(carry, xs):
    ce, correct, d_w = carry
    h_c, t_c, w_c = xs
    h_c = h_c.astype(dtype)
    logits, lse, target, top = _chunk_stats(h_c, w, t_c)
    token_ce = lse - target
    # d ce_i / d logits_i = softmax_i - onehot(target_i), times the token's weight; cast to
    # the matmul dtype, as the unfused head's backward receives it.
    d_logits = jnp.exp(logits - lse[..., None])
    d_logits = d_logits - jax.nn.one_hot(t_c, logits.shape[-1], dtype=jnp.float32)
    d_logits = (d_logits * w_c[..., None]).astype(dtype)
    d_h = jnp.einsum("bcv,vd->bcd", d_logits, w, preferred_element_type=jnp.float32)
    d_w = d_w + jnp.einsum("bcv,bcd->vd", d_logits, h_c, preferred_element_type=jnp.float32)
    carry = (ce + jnp.sum(w_c * token_ce), correct + jnp.sum(w_c * (target >= top)), d_w)
    return carry, (d_h, token_ce)

  zero = jnp.zeros((), jnp.float32)
  (ce, correct, d_w), (d_h, token_ce) = jax.lax.scan(
      body, (zero, zero, jnp.zeros(weight.shape, jnp.float32)),
      (_chunked(h, chunk), _chunked(targets, chunk), _chunked(tw, chunk)))
  l = h.shape[1]
  # Empty arrays carry the input dtypes, which residuals cannot hold as such.
  residuals = (_unchunked(d_h, l), d_w, _unchunked(token_ce, l), jnp.zeros((0,), h.dtype),
               jnp.zeros((0,), weight.dtype))
  return (ce, correct), residuals


def _fused_bwd(chunk, dtype, residuals, cotangents):
  d_h, d_w, token_ce, h_like, w_like = residuals
  g = cotangents[0]         # correct_sum is a count: it passes no gradient
  return (g * d_h).astype(h_like.dtype), (g * d_w).astype(w_like.dtype), None, g * token_ce


_fused.defvjp(_fused_fwd, _fused_bwd)
