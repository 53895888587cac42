"""The query-compacted selective attention kernels against selective_attention_reference.

Both kernel families: the Triton one in interpret mode on the CPU (compiled on a GPU with
JAX_PLATFORMS=cuda) and the Mosaic one in TPU interpret mode. Forward and
the gradients of q, k and v through a loss that weights every output element.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_attention import (BlockSizes, Tile, selective_attention_gpu,
                                                selective_attention_reference,
                                                selective_attention_tpu)

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
    return selective_attention_reference(up(q), up(k), up(v), select, window=window,
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


