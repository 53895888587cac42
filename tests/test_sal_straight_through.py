"""sal.straight_through: what the gradient of an unselected token's mask sees as the attention
output in training (docs/decisions.md, added decision 2)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from taipan_jax import ops
from taipan_jax.models import SelectiveAttentionLayer
from helpers import tiny_config


def _layer(estimator, window=8):
  cfg = tiny_config(model__pattern="s", sal__window=window, sal__capacity=0.3,
                    sal__straight_through=estimator)
  return SelectiveAttentionLayer(cfg, residual_scale=0.5, rngs=nnx.Rngs(0))


def _dense_reference(layer, h, key):
  """The layer's training forward written out with the attention computed for every row
  (the plain XLA path), so that the straight-through gradient of every mask entry sees
  alpha * (o - h) with o the attention output that token would get."""
  x = layer.norm_a(h)
  scores = layer.gate(x)
  mask = ops.straight_through_gumbel(scores, key, tau=layer.tau)
  b, l = h.shape[:2]
  q, k, v = layer._qkv(x, jnp.broadcast_to(jnp.arange(l), (b, l)))
  attn = ops.selective_window_attention(q, k, v, jnp.ones((b, l), bool), window=layer.window,
                                        implementation="xla")
  return layer._mix_and_mlp(h, mask, scores, attn), mask


def _gate_grad(fn, layer, g):
  """The gradient of <fn(layer), g> with respect to the gate's parameters."""
  grads = nnx.grad(lambda m: jnp.sum(fn(m) * g))(layer)
  return grads["gate"]


@pytest.mark.parametrize("seq", [13, 32])
def test_attention_estimator_keeps_the_forward_and_gives_the_dense_gradient(rng, seq):
  h = jnp.asarray(rng.standard_normal((2, seq, 64)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((2, seq, 64)), jnp.float32)
  key = jax.random.key(int(rng.integers(1 << 30)))
  zero, dense = _layer("zero"), _layer("attention")
  out_zero, aux, _ = zero(h, gumbel_key=key)
  out_dense, aux_dense, _ = dense(h, gumbel_key=key)
  selected = np.asarray(aux["mask"]) > 0.5
  assert selected.any() and (~selected).any()
  np.testing.assert_array_equal(np.asarray(aux["mask"]), np.asarray(aux_dense["mask"]))
  # Same forward: an unselected row's mix weight is 0 whichever attention output it has.
  np.testing.assert_allclose(np.asarray(out_dense), np.asarray(out_zero), atol=1e-6)

  got = _gate_grad(lambda m: m(h, gumbel_key=key)[0], dense, g)
  want = _gate_grad(lambda m: _dense_reference(m, h, key)[0], _layer("attention"), g)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # The default estimator's gate gradient differs (it sees o = 0 for unselected tokens).
  default = _gate_grad(lambda m: m(h, gumbel_key=key)[0], _layer("zero"), g)
  diff = max(float(jnp.abs(a - b).max())
             for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(got)))
  assert diff > 1e-4


def test_attention_estimator_changes_nothing_at_evaluation(rng):
  h = jnp.asarray(rng.standard_normal((2, 20, 64)), jnp.float32)
  outs = []
  for estimator in ("zero", "attention"):
    layer = _layer(estimator)
    layer.deterministic = True
    outs.append(np.asarray(layer(h)[0]))
  np.testing.assert_array_equal(outs[0], outs[1])


def test_unknown_estimator_is_refused():
  with pytest.raises(ValueError, match="sal.straight_through.*'zero'"):
    tiny_config(sal__straight_through="dense")
