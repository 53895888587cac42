"""Token selection for the SAL and its budget loss (SPEC sections 3 and 4).

Scores have two classes per token; index 1 means "select".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from taipan_jax.ops.context_parallel import sequence_axis


def straight_through_gumbel(scores, key, *, tau: float = 1.0):
  """Hard Gumbel-softmax selection with the straight-through gradient (eq. 1-3).

  Forward: m = 1 where the noisy argmax picks "select", else 0 (exactly).
  Backward: the gradient of the soft Gumbel-softmax probability y[..., 1].
  This equals `gumbel_softmax(scores, tau, hard=True)[..., 1]`.

  Args:
    scores: [..., 2] gate scores (any float dtype; computed in fp32).
    key: PRNG key for the Gumbel noise.
    tau: temperature > 0.

  Returns:
    m: [...] fp32 mask.
  """
  scores = scores.astype(jnp.float32)
  noise = _gumbel_noise(key, scores.shape)
  y = jax.nn.softmax((scores + noise) / tau, axis=-1)[..., 1]
  hard = (scores[..., 1] + noise[..., 1] > scores[..., 0] + noise[..., 0]).astype(jnp.float32)
  # (y - y) is exactly 0, so the forward value is exactly 0 or 1; hard + y - y is not.
  return hard + (y - jax.lax.stop_gradient(y))


def _gumbel_noise(key, shape):
  """Gumbel noise [..., seq, 2]. Under context parallelism the noise of the whole sequence is
  drawn and this device's stretch cut out, so a split run selects as the unsplit one does."""
  axis = sequence_axis()
  if axis is None:
    return jax.random.gumbel(key, shape, jnp.float32)
  l = shape[-2]
  whole = jax.random.gumbel(key, shape[:-2] + (l * jax.lax.axis_size(axis), shape[-1]),
                            jnp.float32)
  return jax.lax.dynamic_slice_in_dim(whole, jax.lax.axis_index(axis) * l, l, axis=-2)


def deterministic_selection(scores):
  """Selection without noise for evaluation and decoding (decision e): m = [s1 > s0].

  scores: [..., 2] -> [...] fp32 mask (no gradient).
  """
  return (scores[..., 1] > scores[..., 0]).astype(jnp.float32)


def capped_selection(mask, *, window: int, capacity: int, segment_ids=None):
  """Causal greedy cap: token t stays selected only if fewer than `capacity` tokens among
  t-window+1 .. t-1 were kept (decision e's optional inference cap).

  mask: [batch, seq] {0, 1}; segment_ids: optional [batch, seq] int, packed documents as
  contiguous runs: the count restarts where the id changes. Returns the capped mask, same
  shape. Runs as a scan over seq; meant for evaluation, where the per-token decode step
  applies the same rule.
  """
  if sequence_axis() is not None:
    raise ValueError("sal.inference_capacity counts selections over each window, which "
                     "context parallelism does not carry across devices; fix: leave it unset "
                     "for context-parallel evaluation")
  b, l = mask.shape
  if segment_ids is None:
    starts = jnp.zeros((l, b), bool)
  else:
    starts = jnp.concatenate([jnp.zeros((1, b), bool),
                              (segment_ids[:, 1:] != segment_ids[:, :-1]).T], axis=0)

  def step(carry, inputs):
    ring, count = carry                     # ring: [b, window] kept flags by slot
    t, want, start = inputs
    ring = jnp.where(start[:, None], 0.0, ring)     # a new document forgets the last one
    count = jnp.where(start, 0.0, count)
    slot = t % window
    leaving = ring[:, slot]                 # the flag of token t - window leaves the window
    count = count - leaving
    keep = want * (count < capacity)
    ring = ring.at[:, slot].set(keep)
    return (ring, count + keep), keep

  init = (jnp.zeros((b, window), jnp.float32), jnp.zeros((b,), jnp.float32))
  _, kept = jax.lax.scan(step, init, (jnp.arange(l), mask.astype(jnp.float32).T, starts))
  return kept.T


def selected_fraction(mask, token_mask=None):
  """frac per sequence: selected real tokens / real tokens.

  mask: [batch, seq] (straight-through, so gradients flow); token_mask: [batch, seq] bool
  marking real (non-padding) tokens. Returns [batch] fp32 (under context parallelism, over
  the whole row).
  """
  mask = mask.astype(jnp.float32)
  real = jnp.ones_like(mask) if token_mask is None else token_mask.astype(jnp.float32)
  chosen, count = jnp.sum(mask * real, axis=-1), jnp.sum(real, axis=-1)
  axis = sequence_axis()
  if axis is not None:            # this device holds a stretch of each row: sum over all
    chosen, count = jax.lax.psum((chosen, count), axis)
  return chosen / jnp.maximum(count, 1.0)


def budget_loss(fractions, capacity: float):
  """L_budget = sum over SALs of mean over batch of (C - frac)^2 (eq. 7).

  fractions: [num_sal, batch]. Returns a scalar (0 when there is no SAL).
  """
  fractions = jnp.asarray(fractions, jnp.float32)
  if fractions.size == 0:
    return jnp.zeros((), jnp.float32)
  return jnp.sum(jnp.mean((capacity - fractions) ** 2, axis=-1))
