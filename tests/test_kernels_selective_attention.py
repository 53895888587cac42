"""The query-compacted selective attention kernels against ops.selective_window_attention.

Both kernel families: the Triton one in interpret mode on the CPU (compiled on a GPU with
JAX_PLATFORMS=cuda) and the Mosaic one in TPU interpret mode. Forward and
the gradients of q, k and v through a loss that weights every output element.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_attention import (BlockSizes, Tile, selective_attention_gpu,
                                                selective_attention_tpu)
from taipan_jax import ops
from taipan_jax.ops.attention import KERNELS as ATTENTION_KERNELS

ON_GPU = jax.default_backend() == "gpu"

# (batch, seq, heads, head_dim, window, selection, kv_select, packed)
CASES = [
    (1, 50, 2, 16, 8, "random", False, False),      # window < block, awkward length
    (2, 70, 2, 16, 100, "random", True, True),      # window > seq, kv_select, documents
    (1, 64, 1, 16, 16, "all", False, True),
    (2, 40, 2, 16, 12, "none", False, False),
    (1, 96, 2, 32, 24, "clustered", True, False),
]
# No kv_select and one segment: the GPU kernels' mask is the window alone. Windows of several
# key blocks, so some blocks lie inside every row's window and some across its edges.
WINDOW_ONLY_CASES = [
    (2, 200, 2, 16, 64, "random", False, False),
    (1, 150, 1, 16, 70, "clustered", False, False),
]


def _selection(rng, kind, b, l):
  if kind == "all":
    return np.ones((b, l), bool)
  if kind == "none":
    return np.zeros((b, l), bool)
  if kind == "clustered":
    sel = np.zeros((b, l), bool)
    sel[:, l // 3: l // 3 + 12] = True
    sel[:, -5:] = True
    return sel
  return rng.random((b, l)) < 0.3


def _kernel_cases():
  """fp32 for every case; bf16 where rows are a real mix of selected and not (the all / none
  selections test control flow, which the dtype does not change)."""
  out = []
  for c, f in ([(c, f) for c in CASES for f in ("triton", "mosaic")]
               + [(c, "triton") for c in WINDOW_ONLY_CASES]):
    for dtype, name in ((jnp.float32, "fp32"), (jnp.bfloat16, "bf16")):
      if name == "bf16" and c[5] in ("all", "none"):
        continue
      out.append(pytest.param(c, f, dtype, id=f"{name}-{'-'.join(map(str, c))}-{f}"))
  return out


@pytest.mark.parametrize("case,family,dtype", _kernel_cases())
def test_forward_and_gradients_match_reference(rng, case, family, dtype):
  b, l, h, d, window, kind, use_kv, packed = case
  q, k, v = (jnp.asarray(rng.standard_normal((b, l, h, d)), dtype) for _ in range(3))
  select = jnp.asarray(_selection(rng, kind, b, l))
  kv_select = jnp.asarray(rng.random((b, l)) < 0.7) if use_kv else None
  seg = jnp.asarray(np.cumsum(rng.random((b, l)) < 0.05, axis=1)) if packed else None
  weights = jnp.asarray(rng.standard_normal((b, l, h, d)), jnp.float32)
  # The Triton kernels take a tile each (slots padded to the lcm of their block_q); the Mosaic
  # ones one tile for all three.
  bs = (BlockSizes.uniform(16, 16) if family == "mosaic" else
        BlockSizes(Tile(16, 16), Tile(32, 16), Tile(16, 32)))

  def kernel(q, k, v):
    if family == "mosaic":
      return selective_attention_tpu(q, k, v, select, window=window, kv_select=kv_select,
                                     segment_ids=seg, block_sizes=bs, interpret=True)
    return selective_attention_gpu(q, k, v, select, window=window, kv_select=kv_select,
                                   segment_ids=seg, block_sizes=bs, interpret=not ON_GPU)

  def reference(q, k, v):
    up = lambda t: t.astype(jnp.float32)
    return ops.selective_window_attention(up(q), up(k), up(v), select, window=window,
                                          kv_select=kv_select, segment_ids=seg)

  loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * weights))
  # Compiled, forward and gradients in one program each: eager op-by-op dispatch is slow on
  # the CPU.
  both = lambda f: jax.jit(lambda q, k, v: (f(q, k, v), jax.grad(loss(f), argnums=(0, 1, 2))(
      q, k, v)))
  out, grads = both(kernel)(q, k, v)
  out_ref, grads_ref = both(reference)(q, k, v)
  assert out.dtype == dtype
  tol = 2e-5 if dtype == jnp.float32 else 3e-2
  for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_ref, *grads_ref)):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1.0)
    print(f"{family} {case} {jnp.dtype(dtype).name} {name}: {err:.1e}")
    assert err < tol, name            # NaN fails too
  # Unselected rows are exactly zero, not merely small.
  assert not np.asarray(out, np.float32)[~np.asarray(select)].any()


def test_tpu_kernels_refuse_mixed_or_unaligned_tiles():
  q = jnp.zeros((1, 32, 1, 16), jnp.float32)
  select = jnp.ones((1, 32), bool)
  with pytest.raises(ValueError, match="one block_q x block_k tile"):
    selective_attention_tpu(q, q, q, select, window=8, interpret=True,
                            block_sizes=BlockSizes(Tile(16, 16), Tile(16, 8), Tile(16, 16)))
  with pytest.raises(ValueError, match="block_k=12 must be a multiple of 8"):
    selective_attention_tpu(q, q, q, select, window=8, interpret=True,
                            block_sizes=BlockSizes.uniform(16, 12))
  with pytest.raises(ValueError, match="block_q=64 must be a multiple of 128"):  # compiled
    selective_attention_tpu(q, q, q, select, window=8, block_sizes=BlockSizes.uniform(64, 64))


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
