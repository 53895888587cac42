"""taipan_jax.ops.ssd against a float64 sequential recurrence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kernel_inputs import ssd_inputs, ssd_segments
from reference import ssd_sequential, ssd_sequential_jax
from taipan_jax import ops
from taipan_jax.ops.ssd import KERNELS as SSD_KERNELS

# (batch, seq, heads, head_dim, groups, d_state, chunk)
SHAPES = [
    (2, 64, 4, 8, 1, 16, 16),    # seq a multiple of the chunk
    (2, 37, 4, 8, 2, 5, 16),     # not a multiple; groups > 1; odd d_state
    (1, 7, 2, 4, 1, 3, 16),      # shorter than one chunk
    (2, 50, 6, 4, 3, 8, 8),      # three groups
    (1, 1, 2, 4, 1, 4, 4),       # a single token
]


def make_inputs(rng, b, l, h, p, g, n):
  x = rng.standard_normal((b, l, h, p))
  dt = rng.uniform(0.01, 0.3, (b, l, h))
  A = -rng.uniform(1.0, 16.0, h) * 0.2
  B = rng.standard_normal((b, l, g, n))
  C = rng.standard_normal((b, l, g, n))
  s0 = rng.standard_normal((b, h, p, n))
  return x, dt, A, B, C, s0


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_matches_float64_recurrence(rng, shape, with_state):
  *dims, q = shape
  x, dt, A, B, C, s0 = make_inputs(rng, *dims)
  s0 = s0 if with_state else None
  y_ref, s_ref = ssd_sequential(x, dt, A, B, C, s0)
  f32 = lambda t: None if t is None else jnp.asarray(t, jnp.float32)
  y, s = ops.ssd(f32(x), f32(dt), f32(A), f32(B), f32(C), chunk_size=q,
                 initial_state=f32(s0), return_final_state=True)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert s.shape == s_ref.shape and s.dtype == jnp.float32
  scale = max(1.0, np.abs(y_ref).max())
  print(f"ssd fp32 {shape} state={with_state}: max abs error y "
        f"{np.abs(np.asarray(y) - y_ref).max():.2e} (|y|max {np.abs(y_ref).max():.1f}), "
        f"state {np.abs(np.asarray(s) - s_ref).max():.2e}")
  np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-5 * scale, rtol=0)
  np.testing.assert_allclose(np.asarray(s), s_ref, atol=2e-5 * max(1.0, np.abs(s_ref).max()))


def test_returns_y_only_by_default(rng):
  x, dt, A, B, C, _ = make_inputs(rng, 1, 10, 2, 4, 1, 4)
  y = ops.ssd(*(jnp.asarray(t, jnp.float32) for t in (x, dt, A, B, C)), chunk_size=4)
  assert isinstance(y, jax.Array) and y.shape == x.shape


@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_gradients_match_float64(rng, shape):
  *dims, q = shape
  inputs = make_inputs(rng, *dims)
  cot_y = rng.standard_normal(inputs[0].shape)
  cot_s = rng.standard_normal(inputs[-1].shape)

  def loss(fn, dtype):
    def f(x, dt, A, B, C, s0):
      y, s = fn(x, dt, A, B, C, s0)
      return jnp.sum(y * cot_y.astype(dtype)) + jnp.sum(s * cot_s.astype(dtype))
    return f

  with jax.enable_x64(True):
    ref = jax.grad(loss(ssd_sequential_jax, np.float64), argnums=range(6))(
        *(jnp.asarray(t, jnp.float64) for t in inputs))
    ref = [np.asarray(r) for r in ref]
  ours = jax.jit(jax.grad(loss(lambda *a: ops.ssd(*a[:5], chunk_size=q, initial_state=a[5],
                                                  return_final_state=True), np.float32),
                          argnums=range(6)))(*(jnp.asarray(t, jnp.float32) for t in inputs))
  for name, r, o in zip(["x", "dt", "A", "B", "C", "s0"], ref, ours):
    err = np.abs(np.asarray(o, np.float64) - r).max() / max(1.0, np.abs(r).max())
    assert err < 5e-5, f"d{name}: relative error {err:.2e}"


@pytest.mark.parametrize("chunks", [(4, 16), (8, 64), (5, 128)])
def test_independent_of_chunk_size(rng, chunks):
  x, dt, A, B, C, s0 = make_inputs(rng, 2, 45, 4, 8, 2, 8)
  args = [jnp.asarray(t, jnp.float32) for t in (x, dt, A, B, C)]
  s0 = jnp.asarray(s0, jnp.float32)
  y1, f1 = ops.ssd(*args, chunk_size=chunks[0], initial_state=s0, return_final_state=True)
  y2, f2 = ops.ssd(*args, chunk_size=chunks[1], initial_state=s0, return_final_state=True)
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), atol=3e-5)
  np.testing.assert_allclose(np.asarray(f1), np.asarray(f2), atol=3e-5)


def test_bfloat16_inputs_accumulate_in_float32(rng):
  x, dt, A, B, C, _ = make_inputs(rng, 2, 200, 4, 16, 1, 32)
  # The reference sees the same bf16-rounded inputs, so only the computation's error remains.
  bf = lambda t: jnp.asarray(t, jnp.bfloat16)
  xb, Bb, Cb = bf(x), bf(B), bf(C)
  y_ref, _ = ssd_sequential(np.asarray(xb, np.float64), dt, A, np.asarray(Bb, np.float64),
                            np.asarray(Cb, np.float64))
  y = ops.ssd(xb, jnp.asarray(dt, jnp.float32), jnp.asarray(A, jnp.float32), Bb, Cb,
              chunk_size=64)
  assert y.dtype == jnp.bfloat16
  err = np.abs(np.asarray(y, np.float64) - y_ref).max() / np.abs(y_ref).max()
  print(f"ssd bf16: max abs error {np.abs(np.asarray(y, np.float64) - y_ref).max():.3e}, "
        f"relative to |y|max {err:.2e}")
  assert err < 2e-2, f"bf16 relative error {err:.3e}"


def test_long_sequence_decay_stays_finite(rng):
  # Strong decay over many chunks: the masked-cumsum segsum must not produce inf - inf.
  x, dt, A, B, C, _ = make_inputs(rng, 1, 300, 2, 4, 1, 4)
  A = A * 50
  y_ref, _ = ssd_sequential(x, dt, A, B, C)
  y = ops.ssd(*(jnp.asarray(t, jnp.float32) for t in (x, dt, A, B, C)), chunk_size=128)
  assert np.isfinite(np.asarray(y)).all()
  np.testing.assert_allclose(np.asarray(y), y_ref, atol=1e-4)


def test_mismatched_groups_raise(rng):
  x, dt, A, B, C, _ = make_inputs(rng, 1, 8, 3, 4, 2, 4)
  with pytest.raises(ValueError, match="divisible by groups"):
    ops.ssd(*(jnp.asarray(t, jnp.float32) for t in (x, dt, A, B, C)), chunk_size=4)


def random_segments(rng, b, l, max_docs):
  """[b, l] non-decreasing document ids with random boundaries (some rows one document)."""
  ids = np.zeros((b, l), np.int32)
  for row in range(b):
    cuts = np.sort(rng.choice(np.arange(1, l), size=min(rng.integers(0, max_docs), l - 1),
                              replace=False)) if l > 1 else []
    for c in cuts:
      ids[row, c:] += 1
  return ids


@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_segment_ids_reset_the_state(rng, shape):
  *dims, q = shape
  x, dt, A, B, C, s0 = make_inputs(rng, *dims)
  seg = random_segments(rng, dims[0], dims[1], max_docs=6)
  seg[0, q - 1:] += 1          # a boundary exactly at a chunk edge
  y_ref, s_ref = ssd_sequential(x, dt, A, B, C, s0, segment_ids=seg)
  f32 = lambda t: jnp.asarray(t, jnp.float32)
  y, s = ops.ssd(f32(x), f32(dt), f32(A), f32(B), f32(C), chunk_size=q, initial_state=f32(s0),
                 return_final_state=True, segment_ids=jnp.asarray(seg))
  np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-5 * max(1, np.abs(y_ref).max()))
  np.testing.assert_allclose(np.asarray(s), s_ref, atol=2e-5 * max(1, np.abs(s_ref).max()))


def test_segment_ids_gradients_match_float64(rng):
  b, l, h, p, g, n, q = 2, 37, 4, 8, 2, 5, 8
  inputs = make_inputs(rng, b, l, h, p, g, n)
  seg_host = random_segments(rng, b, l, max_docs=5)
  seg = jnp.asarray(seg_host)
  cot = rng.standard_normal(inputs[0].shape)

  def reference(x, dt, A, B, C, s0):
    # Reference by documents: run the recurrence on each document separately.
    ys = []
    for row in range(b):
      ids = seg_host[row]
      parts = []
      for doc in np.unique(ids):
        idx = np.nonzero(ids == doc)[0]
        init = s0[row:row + 1] if idx[0] == 0 else jnp.zeros_like(s0[row:row + 1])
        sl = slice(idx[0], idx[-1] + 1)
        y, _ = ssd_sequential_jax(x[row:row + 1, sl], dt[row:row + 1, sl], A,
                                  B[row:row + 1, sl], C[row:row + 1, sl], init)
        parts.append(y)
      ys.append(jnp.concatenate(parts, axis=1))
    return jnp.sum(jnp.concatenate(ys) * cot)

  with jax.enable_x64(True):
    ref = jax.jit(jax.grad(reference, argnums=range(6)))(
        *(jnp.asarray(t, jnp.float64) for t in inputs))
    ref = [np.asarray(r) for r in ref]
  ours = jax.jit(jax.grad(lambda *a: jnp.sum(ops.ssd(*a[:5], chunk_size=q, initial_state=a[5],
                                                     segment_ids=seg) * cot.astype(np.float32)),
                          argnums=range(6)))(*(jnp.asarray(t, jnp.float32) for t in inputs))
  for name, r, o in zip(["x", "dt", "A", "B", "C", "s0"], ref, ours):
    err = np.abs(np.asarray(o, np.float64) - r).max() / max(1.0, np.abs(r).max())
    assert err < 5e-5, f"d{name}: relative error {err:.2e}"


# --- ops.ssd routed to the Pallas kernels (interpret mode on the CPU) ---------------------

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
