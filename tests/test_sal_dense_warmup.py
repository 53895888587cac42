"""sal.dense_warmup_steps: the dense-to-sparse warm-up (docs/decisions.md, added decision 7).

In training, tokens the gate did not pick are also selected at a rate falling from 1 to 0; the
budget loss and the selected fraction count the gate's own draw."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import taipan_jax
from taipan_jax import ops
from taipan_jax.models import SelectiveAttentionLayer
from taipan_jax.training.optimizer import forced_selection_rate
from taipan_jax.training.step import make_steps
from helpers import tiny_config


def _scores(rng, shape):
  return jnp.asarray(rng.standard_normal(shape + (2,)), jnp.float32)


@pytest.mark.parametrize("shape", [(3, 17), (1, 64), (2, 5, 9)])
def test_forced_selection_adds_tokens_at_the_rate_and_cuts_only_their_gradient(rng, shape):
  scores = _scores(rng, shape)
  g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  key, fkey = jax.random.split(jax.random.key(int(rng.integers(1 << 30))))
  drawn = ops.straight_through_gumbel(scores, key)
  np.testing.assert_array_equal(ops.forced_selection(drawn, fkey, 0.0), drawn)
  np.testing.assert_array_equal(ops.forced_selection(drawn, fkey, 1.0), jnp.ones(shape))
  forced = ops.forced_selection(drawn, fkey, 0.5)
  f, d = np.asarray(forced), np.asarray(drawn)
  assert set(np.unique(f)) <= {0.0, 1.0}
  assert (f >= d).all()                                        # the gate's picks stay
  added = (f > d)
  assert added.any() and (f < 1).any()

  def grad(fn):
    return np.asarray(jax.grad(lambda s: jnp.sum(fn(s) * g))(scores))

  got = grad(lambda s: ops.forced_selection(ops.straight_through_gumbel(s, key), fkey, 0.5))
  want = grad(lambda s: ops.straight_through_gumbel(s, key))
  # A token the draw forced has no gradient through its mask; every other keeps the gate's.
  forced_rows = np.asarray(jax.random.uniform(fkey, shape + (1,))[..., 0]) < 0.5
  np.testing.assert_array_equal(got[forced_rows], 0.0)
  np.testing.assert_allclose(got[~forced_rows], want[~forced_rows], rtol=1e-6)
  assert np.abs(want[forced_rows]).max() > 0          # so the zeros above are the cut


def test_forced_selection_rate_matches_its_probability(rng):
  drawn = jnp.zeros((64, 512), jnp.float32)
  for rate in (0.1, 0.6):
    frac = float(ops.forced_selection(drawn, jax.random.key(int(rng.integers(1 << 30))),
                                      rate).mean())
    assert abs(frac - rate) < 0.01, (rate, frac)


def _layer(selection="gumbel"):
  cfg = tiny_config(model__pattern="s", sal__window=8, sal__capacity=0.15,
                    sal__selection=selection, loss__budget_weight=0.0)
  return SelectiveAttentionLayer(cfg, residual_scale=0.5, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("seq", [11, 32])
def test_sal_forced_at_rate_one_is_the_select_all_layer_and_counts_the_gate(rng, seq):
  h = jnp.asarray(rng.standard_normal((2, seq, 64)), jnp.float32)
  key = jax.random.key(int(rng.integers(1 << 30)))
  layer = _layer()
  out, aux, _ = layer(h, gumbel_key=key, forced_rate=1.0)
  out_all, _, _ = _layer("all")(h, gumbel_key=key)
  np.testing.assert_array_equal(np.asarray(aux["mask"]), np.ones((2, seq)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(out_all), atol=1e-6)
  # The fraction (budget loss, monitor) is the gate's own draw, not the forced mask.
  _, aux_gate, _ = layer(h, gumbel_key=key)
  np.testing.assert_array_equal(np.asarray(aux["fraction"]), np.asarray(aux_gate["fraction"]))
  assert float(aux["fraction"].max()) < 1.0


def test_sal_forced_at_rate_zero_is_the_gate_alone(rng):
  h = jnp.asarray(rng.standard_normal((2, 19, 64)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((2, 19, 64)), jnp.float32)
  key = jax.random.key(int(rng.integers(1 << 30)))
  outs, grads = [], []
  for rate in (None, 0.0):
    layer = _layer()
    outs.append(np.asarray(layer(h, gumbel_key=key, forced_rate=rate)[0]))
    grads.append(nnx.grad(lambda m: jnp.sum(m(h, gumbel_key=key, forced_rate=rate)[0] * g))(
        layer))
  np.testing.assert_array_equal(outs[0], outs[1])
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_forced_rate_is_ignored_at_evaluation(rng):
  h = jnp.asarray(rng.standard_normal((1, 24, 64)), jnp.float32)
  layer = _layer()
  layer.deterministic = True
  np.testing.assert_array_equal(np.asarray(layer(h, forced_rate=1.0)[0]),
                                np.asarray(layer(h)[0]))


def test_schedule_falls_linearly_to_zero():
  assert forced_selection_rate(tiny_config(), 0) is None
  cfg = tiny_config(sal__dense_warmup_steps=40)
  got = [float(forced_selection_rate(cfg, jnp.asarray(s))) for s in (0, 10, 30, 40, 400)]
  np.testing.assert_allclose(got, [1.0, 0.75, 0.25, 0.0, 0.0])


def test_bad_warmup_is_refused():
  with pytest.raises(ValueError, match="sal.dense_warmup_steps.*>= 0"):
    tiny_config(sal__dense_warmup_steps=-5)
  with pytest.raises(ValueError, match="sal.dense_warmup_steps.*selection='all'"):
    tiny_config(sal__dense_warmup_steps=10, sal__selection="all")


def test_train_step_uses_the_warmup_until_it_ends():
  """The tiny model's train step: during the warm-up it trains a different model than the
  paper's training (every token selected at step 0), and from step N on the identical one."""
  rng = np.random.default_rng(5)
  b, l = 2, 32
  batch = {"tokens": rng.integers(1, 64, (b, l)).astype(np.int32),
           "targets": rng.integers(0, 64, (b, l)).astype(np.int32),
           "segment_ids": np.ones((b, l), np.int32), "loss_mask": np.ones((b, l), np.float32)}
  out = {}
  for warmup in (0, 3):
    cfg = taipan_jax.load_config("tiny", {"sal.dense_warmup_steps": warmup,
                                          "sal.capacity": 0.15, "model.vocab_size": 64,
                                          "data.seq_len": l, "train.batch_size": b})
    steps = make_steps(cfg, lambda cfg=cfg: taipan_jax.build_model(cfg, rngs=nnx.Rngs(0)))
    state = jax.jit(steps.init_state)()
    step = jax.jit(steps.train_step)
    first = step(state, batch)[1]
    late = step(state._replace(step=jnp.asarray(3, state.step.dtype)), batch)[1]
    out[warmup] = (first, late)
  assert abs(float(out[3][0]["loss"]) - float(out[0][0]["loss"])) > 1e-4
  # The selected fraction is the gates' own draw either way (the same noise).
  np.testing.assert_allclose(out[3][0]["selected"], out[0][0]["selected"])
  # (Equal up to rounding: the warm-up's program has the forced draw in it, at rate 0.)
  np.testing.assert_array_equal(np.asarray(out[3][1]["selected"]),
                                np.asarray(out[0][1]["selected"]))
  for key in ("loss", "ce", "grad_norm"):
    np.testing.assert_allclose(np.asarray(out[3][1][key]), np.asarray(out[0][1][key]),
                               rtol=1e-6, err_msg=key)
