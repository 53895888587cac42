"""taipan_jax.ops.selective_window_attention / window_decode_attention vs float64 references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference import window_attention_dense
from taipan_jax import ops
from taipan_jax.ops.attention import KERNELS as ATTENTION_KERNELS

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


# --- routed to the Pallas kernels (interpret mode on the CPU) ----------------------------

def test_ops_dispatch_and_mesh(rng, monkeypatch):
  """TAIPAN_KERNELS=pallas with TAIPAN_INTERPRET=1 routes ops.selective_window_attention to
  the TPU kernels in interpret mode; under an
  8-device mesh they run per batch shard, and per batch and head shard on a data x tensor
  mesh (shard_map), and equal the unsharded result, gradients included."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  b, l, h, d, window = 8, 40, 2, 16, 12
  q, k, v = (jnp.asarray(rng.standard_normal((b, l, h, d)), jnp.float32) for _ in range(3))
  select = jnp.asarray(rng.random((b, l)) < 0.4)
  monkeypatch.setenv("TAIPAN_KERNELS", "pallas")
  monkeypatch.setenv("TAIPAN_INTERPRET", "1")
  assert ops.choose(ATTENTION_KERNELS, head_dim=d) == ops.Route("pallas", "tpu", True)

  def loss(q, k, v):
    out = ops.selective_window_attention(q, k, v, select, window=window)
    return jnp.sum(out * jnp.sin(out))

  expected = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
  reference = ops.selective_window_attention(q, k, v, select, window=window,
                                             implementation="xla")
  np.testing.assert_allclose(
      np.asarray(ops.selective_window_attention(q, k, v, select, window=window)),
      np.asarray(reference), rtol=2e-5, atol=2e-5)
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  put = lambda t: jax.device_put(t, NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    args = tuple(put(t) for t in (q, k, v))
    assert "shard_map" in str(jax.make_jaxpr(loss)(*args))
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=2e-5)
  # Batch over 'data' and heads over 'tensor': each kernel call sees 2 rows and 1 head.
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
  put = lambda t: jax.device_put(t, NamedSharding(mesh, P("data", None, "tensor")))
  with jax.set_mesh(mesh):
    args = tuple(put(t) for t in (q, k, v))
    jaxpr = str(jax.make_jaxpr(loss)(*args))
    assert "shard_map" in jaxpr and f"f32[2,{l},1,{d}]" in jaxpr
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=2e-5)
  monkeypatch.delenv("TAIPAN_INTERPRET")
  with pytest.raises(ValueError, match="no Pallas selective attention kernel for platform"):
    ops.selective_window_attention(q, k, v, select, window=window)
  monkeypatch.setenv("TAIPAN_KERNELS", "fast")
  with pytest.raises(ValueError, match="'fast' is unknown"):
    ops.selective_window_attention(q, k, v, select, window=window)


def test_taipan_with_the_attention_kernel_matches_reference(rng):
  """sal.kernel='pallas' in interpret mode end to end: a Taipan's logits and gradients (the
  tiny config's width, 2 x (Mamba-2, SAL)), with gates that select a real mix of tokens,
  against sal.kernel='xla'."""
  from flax import nnx
  from helpers import build, randomize_gates, random_tokens, tiny_config
  tokens = random_tokens(rng, 2, 40)
  results = {}
  for kernel in ("xla", "pallas"):
    # 2 x (Mamba-2, SAL): the second SAL's kernel takes the first's output, and the gradients
    # go back through both; the tiny pattern's second Mamba-2 blocks would only add compile time.
    model = build(tiny_config(sal__kernel=kernel, sal__interpret=kernel == "pallas",
                              model__pattern="ms"))
    randomize_gates(model, np.random.default_rng(1))
    model.eval()

    def loss(model):
      logits = model(tokens)[0]
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits

    (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    results[kernel] = (np.asarray(logits), jax.tree.leaves(nnx.state(grads)))
  (logits_ref, grads_ref), (logits, grads) = results["xla"], results["pallas"]
  err = np.abs(logits - logits_ref).max()
  grad_err = max(float(np.abs(np.asarray(g) - np.asarray(r)).max()) for g, r in
                 zip(grads, grads_ref))
  print(f"\nTaipan, attention kernel vs reference: logits {err:.1e}, grads {grad_err:.1e}")
  assert err < 1e-5 * max(1.0, np.abs(logits_ref).max())
  assert grad_err < 1e-5
