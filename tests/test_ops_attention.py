"""taipan_jax.ops.selective_window_attention / window_decode_attention vs float64 references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taipan_jax import ops
from reference import window_attention_dense

# (batch, seq, heads, head_dim, window): window > seq, small windows, and the blocked path
# (seq > 2 * max(window, 64)) with a seq that is not a multiple of the block.
CASES = [
    (2, 24, 2, 8, 100),
    (2, 40, 3, 16, 1),
    (1, 33, 2, 8, 5),
    (2, 300, 2, 8, 7),
    (1, 333, 2, 4, 80),
]
SELECTIONS = ["all", "none", "random"]


def make(rng, b, l, h, d, selection):
  q, k, v = (rng.standard_normal((b, l, h, d)) for _ in range(3))
  select = {"all": np.ones((b, l), bool), "none": np.zeros((b, l), bool),
            "random": rng.random((b, l)) < 0.4}[selection]
  return q, k, v, select


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("with_kv_select", [False, True])
def test_forward_matches_dense_float64(rng, case, selection, with_kv_select):
  b, l, h, d, window = case
  q, k, v, select = make(rng, b, l, h, d, selection)
  kv_select = rng.random((b, l)) < 0.3 if with_kv_select else None
  ref = window_attention_dense(q, k, v, select, window, kv_select)
  out = ops.selective_window_attention(
      *(jnp.asarray(t, jnp.float32) for t in (q, k, v)), jnp.asarray(select), window=window,
      kv_select=None if kv_select is None else jnp.asarray(kv_select))
  assert out.shape == q.shape and out.dtype == jnp.float32
  print(f"attention {case} {selection} kv_select={with_kv_select}: max abs error "
        f"{np.abs(np.asarray(out) - ref).max():.2e}")
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
  if selection == "none":
    assert not np.asarray(out).any()


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=str)
@pytest.mark.parametrize("with_kv_select", [False, True])
def test_gradients_match_float64(rng, case, with_kv_select):
  b, l, h, d, window = case
  q, k, v, select = make(rng, b, l, h, d, "random")
  kv_select = rng.random((b, l)) < 0.5 if with_kv_select else None
  cot = rng.standard_normal(q.shape)

  def loss(fn, dtype):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * cot.astype(dtype))

  sel, kvs = jnp.asarray(select), None if kv_select is None else jnp.asarray(kv_select)
  with jax.enable_x64(True):
    ref = jax.grad(loss(lambda q, k, v: window_attention_dense(q, k, v, sel, window, kvs,
                                                                 xp=jnp),
                        np.float64), argnums=(0, 1, 2))(
        *(jnp.asarray(t, jnp.float64) for t in (q, k, v)))
    ref = [np.asarray(r) for r in ref]
  ours = jax.jit(jax.grad(loss(lambda q, k, v: ops.selective_window_attention(
      q, k, v, sel, window=window, kv_select=kvs), np.float32), argnums=(0, 1, 2)))(
          *(jnp.asarray(t, jnp.float32) for t in (q, k, v)))
  for name, r, o in zip("qkv", ref, ours):
    assert np.isfinite(np.asarray(o)).all(), f"d{name} not finite"
    np.testing.assert_allclose(np.asarray(o), r, atol=2e-5, err_msg=f"d{name}")


def test_bfloat16_keeps_dtype_and_accuracy(rng):
  q, k, v, select = make(rng, 2, 300, 2, 32, "random")
  bf = [jnp.asarray(t, jnp.bfloat16) for t in (q, k, v)]
  ref = window_attention_dense(*(np.asarray(t, np.float64) for t in bf), select, 50)
  out = ops.selective_window_attention(*bf, jnp.asarray(select), window=50)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=3e-2)


def test_decode_attention_matches_last_row(rng):
  b, l, h, d, window = 2, 19, 2, 8, 6
  q, k, v, _ = make(rng, b, l, h, d, "all")
  ref = window_attention_dense(q, k, v, np.ones((b, l), bool), window)[:, -1]
  valid = np.zeros((b, l), bool)
  valid[:, l - window:] = True
  out = ops.window_decode_attention(jnp.asarray(q[:, -1], jnp.float32),
                                    jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
                                    jnp.asarray(valid))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_window_must_be_positive(rng):
  q, k, v, select = make(rng, 1, 4, 1, 4, "all")
  with pytest.raises(ValueError, match="window"):
    ops.selective_window_attention(*(jnp.asarray(t) for t in (q, k, v)), jnp.asarray(select),
                                   window=0)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[4]], ids=str)
def test_segment_ids_block_attention_across_documents(rng, case):
  from test_ops_ssd import random_segments
  b, l, h, d, window = case
  q, k, v, select = make(rng, b, l, h, d, "random")
  seg = random_segments(rng, b, l, max_docs=8)
  kv_select = rng.random((b, l)) < 0.6
  for kvs in (None, kv_select):
    ref = window_attention_dense(q, k, v, select, window, kvs, segment_ids=seg)
    out = ops.selective_window_attention(
        *(jnp.asarray(t, jnp.float32) for t in (q, k, v)), jnp.asarray(select), window=window,
        kv_select=None if kvs is None else jnp.asarray(kvs), segment_ids=jnp.asarray(seg))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_segment_ids_gradients_match_float64(rng):
  from test_ops_ssd import random_segments
  b, l, h, d, window = 2, 300, 2, 8, 7       # the blocked path
  q, k, v, select = make(rng, b, l, h, d, "random")
  seg = jnp.asarray(random_segments(rng, b, l, max_docs=10))
  sel = jnp.asarray(select)
  cot = rng.standard_normal(q.shape)
  with jax.enable_x64(True):
    ref = jax.grad(lambda q, k, v: jnp.sum(window_attention_dense(
        q, k, v, sel, window, segment_ids=seg, xp=jnp) * cot), argnums=(0, 1, 2))(
            *(jnp.asarray(t, jnp.float64) for t in (q, k, v)))
    ref = [np.asarray(r) for r in ref]
  ours = jax.jit(jax.grad(lambda q, k, v: jnp.sum(ops.selective_window_attention(
      q, k, v, sel, window=window, segment_ids=seg) * cot.astype(np.float32)),
      argnums=(0, 1, 2)))(*(jnp.asarray(t, jnp.float32) for t in (q, k, v)))
  for name, r, o in zip("qkv", ref, ours):
    np.testing.assert_allclose(np.asarray(o), r, atol=2e-5, err_msg=f"d{name}")
