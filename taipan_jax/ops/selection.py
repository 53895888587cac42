"""Token selection for the SAL and its budget loss (docs/spec.md sections 3 and 4).

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
  noise = _row_noise(jax.random.gumbel, key, scores.shape)
  y = jax.nn.softmax((scores + noise) / tau, axis=-1)[..., 1]
  hard = (scores[..., 1] + noise[..., 1] > scores[..., 0] + noise[..., 0]).astype(jnp.float32)
  # (y - y) is exactly 0, so the forward value is exactly 0 or 1; hard + y - y is not.
  return hard + (y - jax.lax.stop_gradient(y))


def _row_noise(draw, key, shape):
  """draw(key, shape, fp32) of shape [..., seq, n]. Under context parallelism the noise of
  the whole sequence is drawn and this device's stretch cut out, so a split run selects as
  the unsplit one does."""
  axis = sequence_axis()
  if axis is None:
    return draw(key, shape, jnp.float32)
  l = shape[-2]
  whole = draw(key, shape[:-2] + (l * jax.lax.axis_size(axis), shape[-1]), jnp.float32)
  return jax.lax.dynamic_slice_in_dim(whole, jax.lax.axis_index(axis) * l, l, axis=-2)


def forced_selection(mask, key, rate):
  """The dense-to-sparse warm-up's selection (sal.dense_warmup_steps): the gate's
  straight-through mask, plus every token a uniform draw picks with probability `rate`.

  A forced token is selected with a constant mask of 1, so the gate gets no gradient through
  its mask (the mix weight alpha of eq. 5 still trains the gate there); the other tokens keep
  the gate's mask and its gradient. At rate 0 this is `mask` exactly.

  mask: [..., seq] fp32 (ops.straight_through_gumbel); key: PRNG key; rate: scalar in [0, 1]
  (may be traced). Returns [..., seq] fp32 with forward values in {0, 1}.
  """
  u = _row_noise(jax.random.uniform, key, mask.shape + (1,))[..., 0]
  return jnp.where(u < rate, jnp.ones_like(mask), mask)


def deterministic_selection(scores):
  """Selection without noise for evaluation and decoding (decision e): m = [s1 > s0].

  scores: [..., 2] -> [...] fp32 mask (no gradient).
  """
  return (scores[..., 1] > scores[..., 0]).astype(jnp.float32)


def positional_gumbel_selection(scores, key, positions, token_ids=None):
  """The training rule's Gumbel-max draw with noise fixed by (position, token).

  The token at position p with id t gets the noise `gumbel(fold_in(fold_in(key, p), t))`, so
  a prefill, a decode step and a context-parallel stretch draw the same noise for the same
  token, rows with different tokens draw independently, and the selection is distributed
  exactly as in training (P(select) = sigmoid(s1 - s0)).

  scores: [..., seq, 2]; positions: int [..., seq]; token_ids: int [..., seq] or None (the
  position alone). Returns [..., seq] fp32 {0, 1}.
  """
  ids = jnp.zeros_like(positions) if token_ids is None else token_ids
  flat_p = positions.reshape(-1).astype(jnp.uint32)
  flat_t = jnp.broadcast_to(ids, positions.shape).reshape(-1).astype(jnp.uint32)
  draw = lambda p, t: jax.random.gumbel(jax.random.fold_in(jax.random.fold_in(key, p), t), (2,))
  noise = jax.vmap(draw)(flat_p, flat_t).reshape(*positions.shape, 2)
  scores = scores.astype(jnp.float32)
  return (scores[..., 1] + noise[..., 1] > scores[..., 0] + noise[..., 0]).astype(jnp.float32)


def window_rank_selection(scores, *, window: int, capacity: float | None,
                          segment_ids=None, prev_margin=None, prev_ok=None,
                          prev_segment_ids=None, block: int = 256):
  """Causal per-window top-C (decision e): token t is selected when fewer than round(C * n_t)
  of the n_t tokens of its window (t - window + 1 .. t, its own document, itself included)
  rank above it by the gate margin s1 - s0; of equal margins the older token ranks higher.

  It selects about C of every window's tokens whatever the margins' scale or offset, so a
  gate trained to a budget selects at that budget at any position, and each decision needs
  only the last window - 1 margins (a decode cache of `window` floats).
  capacity None: the quota is the window's expected count under the training draw,
  sum of sigmoid(margin) (rounded), instead of C * n_t: the gate's own trained rate.

  scores: [batch, seq, 2]; segment_ids: optional [batch, seq] int.
  prev_margin, prev_ok, prev_segment_ids: optional [batch, window - 1] margins, validity and
    segment ids of the tokens before this stretch, oldest first (a decode cache, or a
    previous device's halo); absent: nothing precedes.
  block: queries ranked at a time (memory block x (block + window)).
  Returns [batch, seq] fp32 {0, 1} (no gradient).
  """
  margin = jax.lax.stop_gradient(scores[..., 1] - scores[..., 0]).astype(jnp.float32)
  b, l = margin.shape
  k = window - 1
  if prev_margin is None:
    prev_margin = jnp.zeros((b, k), jnp.float32)
    prev_ok = jnp.zeros((b, k), bool)
  seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  prev_seg = (jnp.zeros((b, k), jnp.int32) if prev_segment_ids is None
              else prev_segment_ids.astype(jnp.int32))
  q = min(block, l)
  pad = -l % q
  # keys in concatenated coordinates: k prefix tokens, the l tokens, then padding
  keys = jnp.pad(jnp.concatenate([prev_margin.astype(jnp.float32), margin], 1),
                 ((0, 0), (0, pad)))
  ok = jnp.pad(jnp.concatenate([prev_ok.astype(bool), jnp.ones((b, l), bool)], 1),
               ((0, 0), (0, pad)))
  kseg = jnp.pad(jnp.concatenate([prev_seg, seg], 1), ((0, 0), (0, pad)))
  qm = jnp.pad(margin, ((0, 0), (0, pad)))
  qseg = jnp.pad(seg, ((0, 0), (0, pad)))
  r = jnp.arange(q)[:, None]
  c = jnp.arange(q + k)[None, :]
  band = (c >= r) & (c <= r + k)          # key j = start + c lies in query start + r's window
  older = c < r + k

  def rank_block(start):
    km = jax.lax.dynamic_slice_in_dim(keys, start, q + k, 1)[:, None, :]
    kv = jax.lax.dynamic_slice_in_dim(ok, start, q + k, 1)[:, None, :]
    ks = jax.lax.dynamic_slice_in_dim(kseg, start, q + k, 1)[:, None, :]
    m = jax.lax.dynamic_slice_in_dim(qm, start, q, 1)[:, :, None]
    s = jax.lax.dynamic_slice_in_dim(qseg, start, q, 1)[:, :, None]
    valid = band[None] & kv & (ks == s)
    above = valid & ((km > m) | ((km == m) & older[None]))
    return jnp.sum(above, -1) < _quota(valid, km, capacity)         # [b, q]

  chosen = jax.lax.map(rank_block, jnp.arange(0, l + pad, q))        # [blocks, b, q]
  return jnp.moveaxis(chosen, 0, 1).reshape(b, l + pad)[:, :l].astype(jnp.float32)


def _quota(valid, margins, capacity):
  """How many of a window's n tokens to select: round(C * n), or (capacity None) the
  expected count of the training draw, round(sum of sigmoid(margin)). Rounding, not the
  ceiling: a row's first tokens see short windows, where ceil(C * n) / n is far above C."""
  if capacity is not None:
    return jnp.floor(capacity * jnp.sum(valid, -1) + 0.5)
  return jnp.floor(jnp.sum(jnp.where(valid, jax.nn.sigmoid(margins), 0.0), -1) + 0.5)


def window_rank_step(margin, cached_margin, cached_ok, *, capacity: float | None):
  """window_rank_selection for one new token per row against its cached window.

  margin: [batch] s1 - s0 of the new token; cached_margin, cached_ok: [batch, window - 1]
  the margins of the window's other tokens (all older). Returns [batch] fp32 {0, 1}.
  """
  above = cached_ok & (cached_margin >= margin[:, None])           # older wins ties
  valid = jnp.concatenate([cached_ok, jnp.ones((margin.shape[0], 1), bool)], -1)
  margins = jnp.concatenate([cached_margin, margin[:, None]], -1)
  return (jnp.sum(above, -1) < _quota(valid, margins, capacity)).astype(jnp.float32)


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
