"""The Pallas TPU SSD kernels, forward and backward (interpret mode on the CPU), against the
sequential reference.

Interpret mode fills memory the kernel never writes with NaN, so an unwritten output block
fails the comparison.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kernel_inputs import ssd_inputs, ssd_segments
from pallas_kernels.ssd import BlockSizes, ssd_forward_tpu, ssd_reference, ssd_tpu

# (batch, seq, heads, head_dim, groups, d_state, chunk): awkward lengths, groups, tiny and
# large states.
SHAPES = [
    (1, 16, 1, 8, 1, 4, 8),
    (2, 45, 4, 8, 2, 16, 16),        # seq not a multiple of the chunk
    (1, 70, 6, 16, 3, 2, 32),        # tiny d_state, 3 groups
    (2, 33, 2, 64, 1, 128, 16),      # Mamba-2 head_dim and d_state
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("packed", [False, True])
def test_forward_matches_the_recurrence(rng, shape, packed):
  b, l, h, p, g, n, q = shape
  x, dt, A, B, C, init = ssd_inputs(rng, b, l, h, p, g, n)
  seg = ssd_segments(rng, b, l) if packed else None
  y, final = ssd_forward_tpu(x, dt, A, B, C, init, seg, block_sizes=BlockSizes(q),
                             interpret=True)
  y_ref, final_ref = ssd_reference(x, dt, A, B, C, initial_state=init, segment_ids=seg)
  scale = float(jnp.abs(y_ref).max())
  err, ferr = float(jnp.abs(y - y_ref).max()), float(jnp.abs(final - final_ref).max())
  print(f"\n{shape} packed={packed}: y {err:.2e} (|y| {scale:.1f}), final {ferr:.2e}")
  assert err < 2e-5 * max(scale, 1.0) and ferr < 2e-5 * max(float(jnp.abs(final_ref).max()), 1)


def test_bfloat16_inputs_accumulate_in_fp32(rng):
  x, dt, A, B, C, init = ssd_inputs(rng, 2, 40, 4, 16, 2, 32, dtype=jnp.bfloat16)
  y, final = ssd_forward_tpu(x, dt, A, B, C, init, block_sizes=BlockSizes(16), interpret=True)
  y_ref, final_ref = ssd_reference(x, dt, A, B, C, initial_state=init)
  assert y.dtype == jnp.bfloat16
  rel = float(jnp.abs(y.astype(jnp.float32) - y_ref).max() / jnp.abs(y_ref).max())
  print(f"\nbf16: relative error {rel:.2e}")
  assert rel < 1e-2


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_backward_kernels_match_reference_gradients(rng, shape, dtype):
  """Every gradient (x, dt, A, B, C, initial state) of a loss weighting all of y and the
  final state, packed documents included."""
  b, l, h, p, g, n, q = shape
  args = ssd_inputs(rng, b, l, h, p, g, n, dtype)
  seg = ssd_segments(rng, b, l)
  wy = jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.float32)
  ws = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)
  up = lambda t: t.astype(jnp.float32)

  def loss(fn):
    def value(x, dt, A, B, C, init):
      y, final = fn(x, dt, A, B, C, init)
      return jnp.sum(up(y) * wy) + jnp.sum(final * ws)
    return value

  kernel = lambda x, dt, A, B, C, init: ssd_tpu(x, dt, A, B, C, init, seg,
                                               block_sizes=BlockSizes(q), interpret=True)
  reference = lambda x, dt, A, B, C, init: ssd_reference(up(x), dt, A, up(B), up(C),
                                                         initial_state=init, segment_ids=seg)
  # Compiled: eager op-by-op dispatch is slow on the CPU.
  grads = jax.jit(jax.grad(loss(kernel), argnums=range(6)))(*args)
  grads_ref = jax.jit(jax.grad(loss(reference), argnums=range(6)))(*args)
  tol = 2e-5 if dtype == jnp.float32 else 2e-2
  for name, got, want, primal in zip(("dx", "ddt", "dA", "dB", "dC", "dinit"), grads,
                                     grads_ref, args):
    assert got.dtype == primal.dtype, name
    err = float(jnp.max(jnp.abs(up(got) - want)) / jnp.max(jnp.abs(want)))
    print(f"{shape} {jnp.dtype(dtype).name} {name}: {err:.1e}")
    assert err < tol, name   # NaN fails too


def test_kernel_inside_shard_map_matches_unsharded(rng):
  """Pallas calls are not partitioned by XLA: the batch is split with shard_map."""
  x, dt, A, B, C, init = ssd_inputs(rng, 8, 24, 2, 8, 1, 8)
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  row = P("data")

  def local(x, dt, B, C, init):
    return ssd_forward_tpu(x, dt, A, B, C, init, block_sizes=BlockSizes(8), interpret=True)

  sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(row,) * 5,
                                  out_specs=(row, row), check_vma=False))
  put = lambda t: jax.device_put(t, NamedSharding(mesh, row))
  y, final = sharded(*(put(t) for t in (x, dt, B, C, init)))
  y_ref, final_ref = ssd_forward_tpu(x, dt, A, B, C, init, block_sizes=BlockSizes(8),
                                     interpret=True)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(final), np.asarray(final_ref), rtol=1e-6, atol=1e-6)


