"""ops.linear_cross_entropy against float64 numpy and against the unfused head + optax loss."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from taipan_jax import ops


def _reference(h, w, t, tw):
  """float64: (ce_sum, correct_sum) and the gradients of ce_sum in h, w and tw."""
  h, w, tw = (np.asarray(x, np.float64) for x in (h, w, tw))
  logits = h @ w.T                                               # [b, l, v]
  top = logits.max(-1, keepdims=True)
  p = np.exp(logits - top)
  lse = np.log(p.sum(-1)) + top[..., 0]
  p /= p.sum(-1, keepdims=True)
  target = np.take_along_axis(logits, np.asarray(t)[..., None], -1)[..., 0]
  ce = lse - target
  d_logits = (p - np.eye(w.shape[0])[np.asarray(t)]) * tw[..., None]
  return ((tw * ce).sum(), (tw * (target >= top[..., 0])).sum(),
          d_logits @ w, np.einsum("blv,bld->vd", d_logits, h), ce)


def _inputs(b, l, d, v, seed):
  rng = np.random.default_rng(seed)
  h = rng.standard_normal((b, l, d)).astype(np.float32)
  w = (rng.standard_normal((v, d)) / np.sqrt(d) * 3).astype(np.float32)
  t = rng.integers(0, v, (b, l)).astype(np.int32)
  tw = (rng.random((b, l)) < 0.8).astype(np.float32)
  return h, w, t, tw


@pytest.mark.parametrize("b,l,d,v,chunk", [(2, 37, 16, 101, 8), (1, 64, 32, 250, 64),
                                           (3, 5, 8, 19, 16)])
def test_fp32_matches_float64_forward_and_gradients(b, l, d, v, chunk):
  h, w, t, tw = _inputs(b, l, d, v, seed=b * 1000 + l)
  ce_ref, correct_ref, dh_ref, dw_ref, dtw_ref = _reference(h, w, t, tw)
  f = lambda h, w, tw: ops.linear_cross_entropy(h, w, t, tw, chunk=chunk)
  (ce, correct), vjp = jax.vjp(jax.jit(f), h, w, tw)
  dh, dw, dtw = vjp((jnp.float32(1.0), jnp.float32(0.0)))
  np.testing.assert_allclose(ce, ce_ref, rtol=1e-5)
  assert correct == correct_ref
  for got, want in ((dh, dh_ref), (dw, dw_ref), (dtw, dtw_ref)):
    assert np.isfinite(got).all()
    err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    assert err < 1e-5, err


def test_matches_the_unfused_loss_under_grad_with_a_scaled_cotangent():
  """The train step's use: grad of ce_sum / total weight, against optax on full logits."""
  h, w, t, tw = _inputs(2, 48, 24, 130, seed=7)

  def fused(h, w):
    ce, _ = ops.linear_cross_entropy(h, w, t, tw, chunk=20)
    return ce / tw.sum()

  def plain(h, w):
    logits = jnp.einsum("bld,vd->blv", h, w, precision="highest")
    return (optax.softmax_cross_entropy_with_integer_labels(logits, t) * tw).sum() / tw.sum()

  (lf, gf), (lp, gp) = (jax.value_and_grad(fn, argnums=(0, 1))(h, w) for fn in (fused, plain))
  np.testing.assert_allclose(lf, lp, rtol=1e-5)
  for a, b in zip(gf, gp):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bf16_matmuls_stay_near_float64():
  h, w, t, tw = _inputs(2, 96, 64, 300, seed=3)
  ce_ref, _, dh_ref, dw_ref, _ = _reference(h, w, t, tw)
  f = lambda h, w: ops.linear_cross_entropy(h, w, t, tw, chunk=32, dtype=jnp.bfloat16)[0]
  ce, (dh, dw) = jax.value_and_grad(f, argnums=(0, 1))(h, w)
  assert dh.dtype == jnp.float32 and dw.dtype == jnp.float32
  np.testing.assert_allclose(ce, ce_ref, rtol=1e-2)
  for got, want in ((dh, dh_ref), (dw, dw_ref)):
    err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    assert err < 2e-2, err


@pytest.mark.parametrize("seq,chunk,want", [(64, 512, 64), (128, 512, 128), (600, 512, 300),
                                             (37, 8, 8), (1024, 512, 512), (1025, 512, 342),
                                             (5, 16, 5), (1, 1, 1)])
def test_the_chunk_is_split_evenly_and_never_padded_past_the_sequence(seq, chunk, want):
  from taipan_jax.ops.cross_entropy import balanced_chunk
  got = balanced_chunk(seq, chunk)
  steps = -(-seq // chunk)
  assert got == want
  assert got <= chunk and -(-seq // got) == steps       # no more steps than asked for
  assert steps * got - seq < steps                      # under one padded position a step


def test_an_empty_sequence_gets_a_valid_chunk():
  from taipan_jax.ops.cross_entropy import balanced_chunk
  assert balanced_chunk(0, 512) == 1


def test_bad_chunk_is_one_clear_error():
  h, w, t, tw = _inputs(1, 4, 8, 10, seed=0)
  with pytest.raises(ValueError, match="chunk=0"):
    ops.linear_cross_entropy(h, w, t, tw, chunk=0)


@pytest.mark.parametrize("tie", [True, False])
def test_train_step_with_the_fused_head_equals_the_unfused_one(tie):
  """One step of the tiny model (padding weighted 0): same metrics and
  parameters whether the head's loss is fused (an awkward chunk) or computed on full logits."""
  import taipan_jax
  from flax import nnx
  from taipan_jax.training.step import make_steps

  rng = np.random.default_rng(11)
  b, l = 2, 24
  batch = {"tokens": rng.integers(1, 64, (b, l)).astype(np.int32),
           "targets": rng.integers(0, 64, (b, l)).astype(np.int32),
           "segment_ids": np.repeat([[1] * 10 + [2] * 9 + [0] * 5], b, 0).astype(np.int32)}
  batch["loss_mask"] = (batch["segment_ids"] > 0).astype(np.float32)
  states, metrics = [], []
  for chunk in (0, 7):
    cfg = taipan_jax.load_config("tiny", {
        "loss.ce_chunk": chunk, "model.vocab_size": 64, "model.tie_embeddings": tie,
        "data.seq_len": l, "train.batch_size": b})
    steps = make_steps(cfg, lambda cfg=cfg: taipan_jax.build_model(cfg, rngs=nnx.Rngs(0)))
    state, m = jax.jit(steps.train_step)(jax.jit(steps.init_state)(), batch)
    states.append(state.params)
    metrics.append(m)
    sums = jax.jit(steps.eval_step)(state.params, batch)
    metrics.append({f"eval_{k}": v for k, v in sums.items()})
  for key in ("loss", "ce", "accuracy", "grad_norm", "tokens"):
    np.testing.assert_allclose(metrics[2][key], metrics[0][key], rtol=2e-5, err_msg=key)
  for key in ("eval_ce_sum", "eval_weight", "eval_correct"):
    np.testing.assert_allclose(metrics[3][key], metrics[1][key], rtol=2e-5, err_msg=key)
  for a, c in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)
