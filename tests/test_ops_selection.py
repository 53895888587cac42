"""Straight-through Gumbel selection, the inference cap and the budget loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taipan_jax import ops


def test_forward_is_hard_noisy_argmax(rng):
  scores = jnp.asarray(rng.standard_normal((4, 50, 2)), jnp.float32)
  key = jax.random.key(int(rng.integers(1 << 30)))
  m = ops.straight_through_gumbel(scores, key, tau=0.7)
  noise = jax.random.gumbel(key, scores.shape, jnp.float32)
  expected = np.argmax(np.asarray(scores + noise), axis=-1)
  assert set(np.unique(np.asarray(m))) <= {0.0, 1.0}
  np.testing.assert_array_equal(np.asarray(m), expected)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_backward_is_soft_gumbel_softmax_gradient(rng, tau):
  scores = jnp.asarray(rng.standard_normal((3, 20, 2)), jnp.float32)
  cot = jnp.asarray(rng.standard_normal((3, 20)), jnp.float32)
  key = jax.random.key(int(rng.integers(1 << 30)))
  g = jax.grad(lambda s: jnp.sum(ops.straight_through_gumbel(s, key, tau=tau) * cot))(scores)
  # Hand derivative of y1 = softmax((s + g) / tau)[1]: dy1/ds1 = y1 y0 / tau = -dy1/ds0.
  noise = np.asarray(jax.random.gumbel(key, scores.shape, jnp.float32), np.float64)
  z = (np.asarray(scores, np.float64) + noise) / tau
  y1 = 1.0 / (1.0 + np.exp(z[..., 0] - z[..., 1]))
  d = y1 * (1 - y1) / tau * np.asarray(cot, np.float64)
  expected = np.stack([-d, d], axis=-1)
  np.testing.assert_allclose(np.asarray(g), expected, atol=1e-6)


def test_selection_frequency_follows_gate_probability():
  # P(select) under Gumbel-max is sigmoid(s1 - s0), whatever tau: the gate bias init relies
  # on it to start at the budget C.
  logit = np.log(0.15 / 0.85)
  scores = jnp.broadcast_to(jnp.array([0.0, logit], jnp.float32), (200_000, 2))
  m = ops.straight_through_gumbel(scores, jax.random.key(3), tau=1.0)
  assert abs(float(m.mean()) - 0.15) < 0.005


def test_deterministic_selection():
  s = jnp.array([[[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]])
  np.testing.assert_array_equal(np.asarray(ops.deterministic_selection(s)), [[1.0, 0.0, 0.0]])


def test_budget_loss_hand_computation():
  masks = np.array([[[1, 0, 0, 1], [0, 0, 0, 0]],
                    [[1, 1, 1, 1], [1, 0, 0, 0]]], np.float32)   # [sal, batch, seq]
  token_mask = np.array([[True, True, True, False], [True, True, True, True]])
  fracs = jnp.stack([ops.selected_fraction(jnp.asarray(m), jnp.asarray(token_mask))
                     for m in masks])
  # Padding does not count: row 0 has 3 real tokens.
  np.testing.assert_allclose(np.asarray(fracs), [[1 / 3, 0.0], [1.0, 0.25]], atol=1e-7)
  c = 0.15
  expected = ((c - 1 / 3) ** 2 + c ** 2) / 2 + ((c - 1.0) ** 2 + (c - 0.25) ** 2) / 2
  np.testing.assert_allclose(float(ops.budget_loss(fracs, c)), expected, rtol=1e-6)
  assert float(ops.budget_loss(jnp.zeros((0, 2)), c)) == 0.0


def test_budget_loss_gradient_reaches_scores(rng):
  scores = jnp.asarray(rng.standard_normal((2, 30, 2)), jnp.float32)
  key = jax.random.key(0)

  def loss(s):
    m = ops.straight_through_gumbel(s, key)
    return ops.budget_loss(ops.selected_fraction(m)[None], 0.15)

  g = jax.grad(loss)(scores)
  assert np.abs(np.asarray(g)).sum() > 0


def test_capped_selection_keeps_at_most_k_per_window(rng):
  mask = (rng.random((3, 200)) < 0.6).astype(np.float32)
  window, cap = 10, 3
  kept = np.asarray(ops.capped_selection(jnp.asarray(mask), window=window, capacity=cap))
  # Greedy reference, one token at a time.
  expected = np.zeros_like(mask)
  for b in range(mask.shape[0]):
    for t in range(mask.shape[1]):
      recent = expected[b, max(0, t - window + 1):t].sum()
      expected[b, t] = mask[b, t] * (recent < cap)
  np.testing.assert_array_equal(kept, expected)


def test_positional_gumbel_is_the_training_draw_fixed_by_position_and_token(rng):
  scores = jnp.asarray(rng.standard_normal((3, 40, 2)), jnp.float32)
  key = jax.random.key(int(rng.integers(1 << 30)))
  positions = jnp.broadcast_to(jnp.arange(40) + 5, (3, 40))
  ids = jnp.asarray(rng.integers(0, 50, (3, 40)))
  m = np.asarray(ops.positional_gumbel_selection(scores, key, positions, ids))
  for p in (0, 17, 39):         # one token at a time draws the same noise
    single = ops.positional_gumbel_selection(scores[:, p:p + 1], key, positions[:, p:p + 1],
                                             ids[:, p:p + 1])
    np.testing.assert_array_equal(np.asarray(single)[:, 0], m[:, p])
  noise = np.stack([[np.asarray(jax.random.gumbel(jax.random.fold_in(jax.random.fold_in(
      key, p + 5), int(ids[r, p])), (2,))) for p in range(40)] for r in range(3)])
  expected = np.asarray(scores) + noise
  np.testing.assert_array_equal(m, (expected[..., 1] > expected[..., 0]).astype(np.float32))
  # selects with probability sigmoid(s1 - s0), as the training draw does, and rows with
  # other tokens at a position draw other noise
  logit = np.log(0.15 / 0.85)
  flat = jnp.broadcast_to(jnp.array([0.0, logit], jnp.float32), (64, 2000, 2))
  pos = jnp.broadcast_to(jnp.arange(2000), (64, 2000))
  tok = jnp.asarray(rng.integers(0, 1000, (64, 2000)))
  sel = np.asarray(ops.positional_gumbel_selection(flat, key, pos, tok))
  assert abs(sel.mean() - 0.15) < 0.005
  assert np.std(sel.mean(0)) > 0.02          # not one draw shared by every row


def _window_rank_reference(margin, window, capacity, segment_ids):
  """float64 loops: t is selected when fewer than C * n of its window's n tokens (same
  segment) rank above it; of equal margins the older ranks higher."""
  b, l = margin.shape
  out = np.zeros((b, l), np.float32)
  for r in range(b):
    for t in range(l):
      js = [j for j in range(max(0, t - window + 1), t + 1)
            if segment_ids[r, j] == segment_ids[r, t]]
      higher = sum(margin[r, j] > margin[r, t] or (margin[r, j] == margin[r, t] and j < t)
                   for j in js)
      expected = (capacity * len(js) if capacity is not None else
                  sum(1 / (1 + np.exp(-np.float64(margin[r, j]))) for j in js))
      quota = np.floor(expected + 0.5)
      out[r, t] = float(higher < quota)
  return out


@pytest.mark.parametrize("shape,window,capacity,block",
                         [((2, 37), 8, 0.15, 256), ((3, 20), 20, 0.3, 7), ((1, 9), 1, 0.5, 4),
                          ((2, 50), 16, 0.15, 16), ((2, 41), 12, None, 8),
                          ((1, 30), 30, None, 256)])
def test_window_rank_selection_matches_reference(rng, shape, window, capacity, block):
  scores = rng.standard_normal(shape + (2,)).astype(np.float32)
  scores[..., 1] -= 1.0                            # expected counts below n / 2
  scores[:, ::5] = scores[:, 1:2]                  # repeated tokens: equal margins, ties
  margin = np.asarray(scores[..., 1] - scores[..., 0])
  segment_ids = np.cumsum(rng.random(shape) < 0.1, axis=1).astype(np.int32)
  scores = jnp.asarray(scores)
  got = ops.window_rank_selection(scores, window=window, capacity=capacity,
                                  segment_ids=jnp.asarray(segment_ids), block=block)
  np.testing.assert_array_equal(
      np.asarray(got), _window_rank_reference(margin, window, capacity, segment_ids))
  # a stretch continued from the window - 1 margins before it selects as the whole row does
  whole = np.asarray(ops.window_rank_selection(scores, window=window, capacity=capacity,
                                               block=block))
  cut, k = shape[1] // 2, window - 1
  prev = np.pad(margin[:, :cut], ((0, 0), (k, 0)))[:, cut:]
  ok = np.pad(np.ones((shape[0], cut), bool), ((0, 0), (k, 0)))[:, cut:]
  tail = ops.window_rank_selection(scores[:, cut:], window=window, capacity=capacity,
                                   prev_margin=jnp.asarray(prev), prev_ok=jnp.asarray(ok),
                                   block=block)
  np.testing.assert_array_equal(np.asarray(tail), whole[:, cut:])
  # and token by token against the cached window
  for t in range(cut, shape[1]):
    lo = t - k
    cached = np.pad(margin, ((0, 0), (k, 0)))[:, lo + k:t + k]
    cached_ok = np.pad(np.ones_like(margin, bool), ((0, 0), (k, 0)))[:, lo + k:t + k]
    step = ops.window_rank_step(jnp.asarray(margin[:, t]), jnp.asarray(cached),
                                jnp.asarray(cached_ok), capacity=capacity)
    np.testing.assert_array_equal(np.asarray(step), whole[:, t])


def test_window_rank_selects_the_budget_whatever_the_margins_scale(rng):
  base = rng.standard_normal((4, 512, 2))
  for scale, shift in [(1.0, 0.0), (3.0, 2.0), (0.1, -5.0)]:   # a gate biased to 0 or to all
    scores = jnp.asarray(base * scale + shift * np.array([0.0, 1.0]), jnp.float32)
    m = np.asarray(ops.window_rank_selection(scores, window=64, capacity=0.15))
    assert abs(m[:, 64:].mean() - 0.15) < 0.02
    rates = [m[:, t - 64:t].mean() for t in range(128, 513, 64)]   # 256 tokens each
    assert all(abs(r - 0.15) < 0.08 for r in rates), rates


def test_window_expected_quota_follows_the_gate():
  """capacity None: a closed gate (sigmoid(margin) ~ 1e-3) selects nothing; a gate at
  probability p selects about p of each window, as the training draw would."""
  closed = jnp.broadcast_to(jnp.array([0.0, np.log(1e-3)], jnp.float32), (2, 300, 2))
  assert float(ops.window_rank_selection(closed, window=64, capacity=None).sum()) == 0.0
  rng = np.random.default_rng(5)
  scores = rng.standard_normal((4, 512, 2)) * 0.3
  scores[..., 1] += np.log(0.3 / 0.7)
  m = np.asarray(ops.window_rank_selection(jnp.asarray(scores, jnp.float32), window=64,
                                           capacity=None))
  p = 1 / (1 + np.exp(-(scores[..., 1] - scores[..., 0])))
  assert abs(m[:, 64:].mean() - p[:, 64:].mean()) < 0.02
