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
