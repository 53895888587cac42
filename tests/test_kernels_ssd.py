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

from helpers import ssd_inputs, ssd_segments
from pallas_kernels.ssd import BlockSizes, ssd_forward_tpu, ssd_reference, ssd_tpu
from taipan_jax import ops
from taipan_jax.ops.ssd import KERNELS as SSD_KERNELS

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


@pytest.mark.parametrize("packed", [False, True])
def test_ops_ssd_interpret_forward_and_gradients_match_reference(rng, packed):
  b, l, h, p, g, n = 2, 37, 4, 8, 2, 8
  x, dt, A, B, C, init = ssd_inputs(rng, b, l, h, p, g, n)
  seg = ssd_segments(rng, b, l) if packed else None
  w_y = jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.float32)
  w_s = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)

  def loss(impl, *args):
    y, s = ops.ssd(*args[:5], chunk_size=16, initial_state=args[5], return_final_state=True,
                   segment_ids=seg, implementation=impl, interpret=impl == "pallas")
    return jnp.sum(y * w_y) + jnp.sum(s * w_s)

  args = (x, dt, A, B, C, init)
  # Compiled: eager op-by-op dispatch is slow on the CPU.
  value_and_grad = lambda impl: jax.jit(jax.value_and_grad(lambda *a: loss(impl, *a),
                                                           argnums=tuple(range(6))))
  value, got = value_and_grad("pallas")(*args)
  value_ref, want = value_and_grad("xla")(*args)
  assert abs(float(value) - float(value_ref)) < 1e-3
  for name, a, w in zip(("x", "dt", "A", "B", "C", "init"), got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-4, atol=1e-4,
                               err_msg=name)


def test_environment_variable_forces_the_path(rng, monkeypatch):
  x, dt, A, B, C, _ = ssd_inputs(rng, 1, 20, 2, 8, 1, 8)
  monkeypatch.setenv("TAIPAN_KERNELS", "pallas")
  monkeypatch.setenv("TAIPAN_INTERPRET", "1")
  assert ops.choose(SSD_KERNELS) == ops.Route("pallas", "tpu", True)
  y = ops.ssd(x, dt, A, B, C, chunk_size=8)
  monkeypatch.setenv("TAIPAN_KERNELS", "xla")
  np.testing.assert_allclose(np.asarray(y), np.asarray(ops.ssd(x, dt, A, B, C, chunk_size=8)),
                             rtol=1e-5, atol=1e-5)
  monkeypatch.setenv("TAIPAN_KERNELS", "pallas")
  monkeypatch.delenv("TAIPAN_INTERPRET")
  with pytest.raises(ValueError, match="no Pallas SSD kernel for platform 'cpu'"):
    ops.ssd(x, dt, A, B, C, chunk_size=8)
  monkeypatch.setenv("TAIPAN_KERNELS", "fast")
  with pytest.raises(ValueError, match="'fast' is unknown"):
    ops.ssd(x, dt, A, B, C, chunk_size=8)
  monkeypatch.setenv("TAIPAN_KERNELS", "interpret")
  with pytest.raises(ValueError, match="old spelling; use 'pallas' with interpret=True"):
    ops.ssd(x, dt, A, B, C, chunk_size=8)


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


def test_ops_ssd_under_a_mesh_runs_the_kernel_per_batch_shard(rng, monkeypatch):
  """With a mesh set, ops.ssd wraps the kernel in shard_map over the batch axis: forward and
  gradients on 8 simulated devices equal the unsharded kernel's."""
  monkeypatch.setenv("TAIPAN_KERNELS", "pallas")
  monkeypatch.setenv("TAIPAN_INTERPRET", "1")
  x, dt, A, B, C, init = ssd_inputs(rng, 8, 20, 2, 8, 1, 8)
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))

  def loss(x, dt, A, B, C, init):
    y, final = ops.ssd(x, dt, A, B, C, chunk_size=8, initial_state=init,
                       return_final_state=True)
    return jnp.sum(y * jnp.cos(y)) + jnp.sum(final ** 2)

  value_and_grads = jax.value_and_grad(loss, argnums=range(6))
  expected = jax.jit(value_and_grads)(x, dt, A, B, C, init)
  put = lambda t: jax.device_put(t, NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    args = (put(x), put(dt), A, put(B), put(C), put(init))
    assert "shard_map" in str(jax.make_jaxpr(value_and_grads)(*args))
    got = jax.jit(value_and_grads)(*args)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=2e-5)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="batch 4 does not split"):
    ops.ssd(x[:4], dt[:4], A, B[:4], C[:4], chunk_size=8)


def test_per_shard_takes_a_kernel_that_returns_a_list():
  """A pallas_call with several outputs returns a list (the GPU SSD kernel does): per_shard
  must accept it. (Two-GPU training failed on exactly this.)"""
  from taipan_jax.ops.kernel_sharding import per_shard
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  x = jax.device_put(jnp.arange(48.0).reshape(16, 3), NamedSharding(mesh, P("data")))
  kernel = lambda a, x: [x * a, x + a]
  with jax.set_mesh(mesh):
    y, z = jax.jit(lambda a, x: per_shard(kernel, (a,), (x,), num_outputs=2))(2.0, x)
  np.testing.assert_array_equal(np.asarray(y), np.arange(48.0).reshape(16, 3) * 2)
  np.testing.assert_array_equal(np.asarray(z), np.arange(48.0).reshape(16, 3) + 2)


def test_taipan_forward_with_the_kernel_matches_reference(rng):
  """mamba.kernel='pallas' in interpret mode end to end: the whole tiny Taipan's logits."""
  from helpers import build, jit_forward, random_tokens, tiny_config
  tokens = random_tokens(rng, 2, 40)
  logits = {}
  for kernel in ("xla", "pallas"):
    model = build(tiny_config(mamba__kernel=kernel, mamba__interpret=kernel == "pallas"))
    model.eval()
    logits[kernel] = np.asarray(jit_forward(model, tokens)[0])
  err = np.abs(logits["pallas"] - logits["xla"]).max()
  print(f"\ntiny Taipan logits, kernel vs XLA: {err:.2e}")
  assert err < 1e-5 * max(1.0, np.abs(logits["xla"]).max())
