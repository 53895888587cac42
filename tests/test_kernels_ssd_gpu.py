"""The Pallas Triton SSD kernels (forward and backward) against the sequential reference.

On a CPU they run in Pallas interpret mode (small shapes, in CI); on a GPU
(`JAX_PLATFORMS=cuda python -m pytest tests/test_kernels_ssd_gpu.py`) they compile, and the
GPU-only tests below run too. Gradients are compared for every input: x, dt, A, B, C and the
initial state, through a loss that weights every output element and the final state.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_inputs import ssd_inputs, ssd_segments
from pallas_kernels.ssd import BlockSizes, gpu, gpu_two_level, ssd_gpu, ssd_reference

ON_GPU = jax.default_backend() == "gpu"
NEEDS_GPU = pytest.mark.skipif(not ON_GPU, reason="compiled Triton kernels need a CUDA GPU: "
                               "run with JAX_PLATFORMS=cuda on a GPU machine")

# (batch, seq, heads, head_dim, groups, d_state, chunk, block_p, heads_per_program)
SHAPES_CPU = [
    (1, 40, 2, 16, 1, 16, 16, 16, None),   # seq not a multiple of the chunk, head_dim split
    (2, 37, 4, 16, 2, 32, 16, None, 1),    # two groups, dB/dC summed over 2 programs
    (1, 50, 3, 32, 3, 16, 32, 16, None),   # one head per group, 2 head_dim blocks
]
SHAPES_GPU = SHAPES_CPU + [
    (2, 1000, 8, 64, 2, 128, 64, None, 2),  # Mamba-2 head_dim / d_state, awkward length
    (1, 1500, 24, 64, 1, 128, 64, 32, None),
    (3, 333, 4, 64, 1, 16, 32, None, None),  # tiny d_state
    (1, 300, 2, 16, 1, 256, 32, None, None),  # large d_state
]
SHAPES = SHAPES_GPU if ON_GPU else SHAPES_CPU


def _loss(fn, seg, wy, ws):
  def loss(x, dt, A, B, C, init):
    y, final = fn(x, dt, A, B, C, init, seg)
    return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(final * ws)
  return loss


def _kernel(block_sizes):
  return lambda x, dt, A, B, C, init, seg: ssd_gpu(x, dt, A, B, C, init, seg,
                                                   block_sizes=block_sizes, interpret=not ON_GPU)


def _reference(x, dt, A, B, C, init, seg):
  f32 = lambda t: t.astype(jnp.float32)
  return ssd_reference(f32(x), dt, A, f32(B), f32(C), initial_state=init, segment_ids=seg)


def _compare(rng, shape, dtype, packed, rtol, block_sizes=None):
  b, l, h, p, g, n = shape[:6]
  if block_sizes is None:
    q, bp, hpp = shape[6:]
    block_sizes = BlockSizes(chunk=q, chunk_bwd=q, block_p=bp, heads_per_program=hpp)
  args = ssd_inputs(rng, b, l, h, p, g, n, dtype)
  seg = ssd_segments(rng, b, l, first_id=7) if packed else None
  wy = jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.float32)
  ws = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)
  kernel = _kernel(block_sizes)
  (y, final), (y_ref, final_ref) = kernel(*args, seg), _reference(*args, seg)
  errors = {"y": _rel(y, y_ref), "final": _rel(final, final_ref)}
  # Compiled: eager op-by-op dispatch is slow on the CPU.
  grads = jax.jit(jax.grad(_loss(kernel, seg, wy, ws), argnums=range(6)))(*args)
  grads_ref = jax.jit(jax.grad(_loss(_reference, seg, wy, ws), argnums=range(6)))(*args)
  for name, got, want in zip(("dx", "ddt", "dA", "dB", "dC", "dinit"), grads, grads_ref):
    assert got.dtype == args[("dx", "ddt", "dA", "dB", "dC", "dinit").index(name)].dtype
    errors[name] = _rel(got, want)
  print(f"\n{shape} {jnp.dtype(dtype).name} packed={packed}: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
  bad = {k: v for k, v in errors.items() if not v < rtol}       # NaN fails too
  assert not bad, f"relative errors above {rtol}: {bad}"


def _rel(got, want):
  """max |got - want| / max |want|: one figure per array, NaN if anything is not finite."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if not np.isfinite(got).all():
    return float("nan")
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("packed", [False, True])
def test_fp32_forward_and_gradients_match_reference(rng, shape, packed):
  _compare(rng, shape, jnp.float32, packed, rtol=2e-5)


@pytest.mark.parametrize("shape", SHAPES[1:2] + SHAPES[3:5], ids=lambda s: "x".join(map(str, s)))
def test_bf16_forward_and_gradients_within_bf16_error(rng, shape):
  # bf16 inputs (matmuls in bf16, fp32 accumulation) against the fp32 recurrence on the same
  # rounded inputs: a few bf16 ulps of the largest value.
  _compare(rng, shape, jnp.bfloat16, True, rtol=3e-2)


# The chunk-gradient kernel in sub-chunks of the stored states' chunk, and the two-level
# (chunk-parallel) forward and state passes: (batch, seq, heads, head_dim, groups, d_state)
# and the BlockSizes fields that select them.
SUB_CHUNK_AND_TWO_LEVEL = [
    ((1, 40, 2, 16, 1, 16), dict(chunk=16, chunk_bwd=32, chunk_grad=16)),  # last chunk: 1 sub
    ((2, 77, 4, 16, 2, 32), dict(chunk=16, chunk_bwd=64, chunk_grad=16, heads_per_program=1)),
    ((1, 50, 3, 32, 3, 16), dict(chunk=16, chunk_bwd=32, chunk_grad=8, two_level=True,
                                 block_p=16)),
    ((2, 37, 4, 16, 2, 32), dict(chunk=16, chunk_bwd=16, two_level=True)),
    ((1, 8, 2, 16, 1, 16), dict(chunk=16, chunk_bwd=32, chunk_grad=16, two_level=True)),  # 1 row
]
SUB_CHUNK_AND_TWO_LEVEL_GPU = SUB_CHUNK_AND_TWO_LEVEL + [
    ((2, 1000, 8, 64, 2, 128), dict(chunk=64, chunk_bwd=128, chunk_grad=32, two_level=True)),
    ((1, 1500, 24, 64, 1, 128), dict(chunk=128, chunk_bwd=128, chunk_grad=32)),
]


@pytest.mark.parametrize("case", SUB_CHUNK_AND_TWO_LEVEL_GPU if ON_GPU else SUB_CHUNK_AND_TWO_LEVEL,
                         ids=lambda c: "x".join(map(str, c[0])) + "-" + "-".join(
                             f"{k}{v}" for k, v in c[1].items()))
def test_sub_chunks_and_two_level_match_reference(rng, case):
  shape, fields = case
  _compare(rng, shape, jnp.float32, packed=shape[1] > 8, rtol=2e-5,
           block_sizes=BlockSizes(**fields))


def test_sub_chunks_and_two_level_bf16_within_bf16_error(rng):
  fields = dict(chunk=16, chunk_bwd=64, chunk_grad=16, two_level=True)
  _compare(rng, (2, 150, 4, 32, 2, 32), jnp.bfloat16, True, 3e-2, BlockSizes(**fields))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_two_level_state_passes_write_what_the_sequential_ones_write(rng, dtype):
  """Every element of the stored states and state gradients, two-level against sequential.

  In interpret mode Pallas fills outputs with NaN before the kernel runs, so an element no
  program writes shows as NaN here (and is not equal to anything)."""
  b, l, h, p, g, n, q = 2, 45, 3, 16, 1, 16, 16
  x, dt, A, B, C, init = ssd_inputs(rng, b, l, h, p, g, n, dtype)
  seg = ssd_segments(rng, b, l)
  dy = jnp.asarray(rng.standard_normal((b, l, h, p)), dtype)
  passes = {}
  for two_level in (False, True):
    bs = BlockSizes(chunk=q, chunk_bwd=q, two_level=two_level, block_p=None)
    (states,) = gpu.ssd_forward_gpu(x, dt, A, B, C, init, seg, block_sizes=bs,
                                    interpret=not ON_GPU, emit_states=True)
    y, final = gpu.ssd_forward_gpu(x, dt, A, B, C, init, seg, block_sizes=bs,
                                   interpret=not ON_GPU)
    dstates, dinit = gpu.ssd_state_grads_gpu(dt, A, C, seg, dy, init, head_dim=p,
                                             block_sizes=bs, interpret=not ON_GPU)
    passes[two_level] = [np.asarray(t, np.float32) for t in (states, y, final, dstates, dinit)]
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for name, seq, two in zip(("states", "y", "final", "dstates", "dinit"), *passes.values()):
    assert np.isfinite(two).all(), f"{name}: elements left unwritten"
    np.testing.assert_allclose(two, seq, rtol=tol, atol=tol * np.abs(seq).max(), err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("fields", [dict(), dict(chunk_bwd=128, chunk_grad=32, two_level=True,
                                                 block_p=32, num_warps_bwd=8)],
                         ids=["defaults", "sub_chunks_two_level"])
def test_every_kernel_lowers_to_triton_for_cuda(dtype, fields):
  """Forward and backward lowered for CUDA (on any host): each pallas_call becomes a Triton
  module, so a construct Pallas Triton cannot lower fails here in CI, without a GPU."""
  b, l, h, p, g, n = 2, 1000, 4, 64, 2, 128
  S = jax.ShapeDtypeStruct
  args = (S((b, l, h, p), dtype), S((b, l, h), jnp.float32), S((h,), jnp.float32),
          S((b, l, g, n), dtype), S((b, l, g, n), dtype))
  bs = dataclasses.replace(BlockSizes.for_backend("gpu"), **fields)

  def loss(*a):
    y, final = ssd_gpu(*a, block_sizes=bs)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final)

  text = jax.jit(jax.value_and_grad(loss, argnums=range(5))).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()
  kernels = 1 + 3 if not fields else 3 + 2 + 2 + 1    # forward + the backward's passes
  assert text.count("__gpu$xla.gpu.triton") == kernels


def test_rejects_a_chunk_grad_that_does_not_divide_chunk_bwd():
  with pytest.raises(ValueError, match="chunk_grad=48 must be a multiple of 8 that divides "
                     "chunk_bwd=128"):
    BlockSizes(chunk_bwd=128, chunk_grad=48)


def test_two_level_is_taken_below_the_program_count():
  auto = BlockSizes(two_level=None)
  assert gpu._two_level(auto, gpu_two_level.TWO_LEVEL_BELOW - 1)
  assert not gpu._two_level(auto, gpu_two_level.TWO_LEVEL_BELOW)
  assert not gpu._two_level(BlockSizes(), 1)        # off unless asked for
  assert gpu._two_level(BlockSizes(two_level=True), 10**6)


def test_rejects_shapes_the_kernel_does_not_tile(rng):
  x, dt, A, B, C, init = ssd_inputs(rng, 1, 16, 2, 12, 1, 16)
  with pytest.raises(ValueError, match="head_dim a power of two >= 16, got 12"):
    ssd_gpu(x, dt, A, B, C, init, interpret=True)


@NEEDS_GPU
def test_bf16_backward_finite_for_adversarial_decays(rng):
  """Large dt, A = -16 and long runs of near-zero decay: exp underflows to exactly 0."""
  b, l, h, p, g, n = 2, 2048, 4, 64, 1, 128
  x, dt, A, B, C, init = ssd_inputs(rng, b, l, h, p, g, n, jnp.bfloat16)
  dt = jnp.where(jnp.arange(l)[None, :, None] % 512 < 300, 12.0, 1e-4) * jnp.ones_like(dt)
  A = jnp.full((h,), -16.0)
  wy = jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.float32)
  ws = jnp.zeros((b, h, p, n))
  kernel = _kernel(BlockSizes.for_backend("gpu"))
  grads = jax.jit(jax.grad(_loss(kernel, None, wy, ws), argnums=range(6)))(x, dt, A, B, C, init)
  grads_ref = jax.jit(jax.grad(_loss(_reference, None, wy, ws), argnums=range(6)))(
      x, dt, A, B, C, init)
  for name, got, want in zip(("dx", "ddt", "dA", "dB", "dC", "dinit"), grads, grads_ref):
    err = _rel(got, want)
    print(f"adversarial {name}: finite={bool(np.isfinite(np.asarray(got, np.float32)).all())} "
          f"rel err {err:.1e}")
    assert err < 3e-2, name


@NEEDS_GPU
def test_offsets_past_2_to_the_31_match(rng):
  """batch 2 x 2**20 tokens x 24 heads x 64 = 3.2e9 elements (past int32 flat offsets).

  Every 4096 tokens start a new segment and the inputs repeat with that period, so every
  window's output must equal the first window's, which is checked against the reference.
  """
  b, l, h, p, g, n, w = 2, 2**20, 24, 64, 1, 128, 4096
  x, dt, A, B, C, _ = ssd_inputs(rng, 1, w, h, p, g, n, jnp.bfloat16)
  tile = lambda t: jnp.tile(t, (b, l // w) + (1,) * (t.ndim - 2))
  seg = tile(jnp.zeros((1, w), jnp.int32)) + jnp.arange(l)[None, :] // w
  y, final = jax.jit(lambda *a: ssd_gpu(*a, segment_ids=seg))(
      tile(x), tile(dt), A, tile(B), tile(C))
  assert y.size > 2**31
  y_ref, final_ref = _reference(x, dt, A, B, C, None, None)
  first = _rel(y[0, :w], y_ref[0])
  last = float(jnp.max(jnp.abs(y[-1, -w:].astype(jnp.float32) - y[0, :w].astype(jnp.float32))))
  print(f"\n2**31 offsets: first window vs reference {first:.1e}; last window vs first "
        f"{last:.1e}; final state vs reference {_rel(final[-1], final_ref[0]):.1e}")
  assert first < 3e-2 and last == 0.0 and _rel(final[-1], final_ref[0]) < 3e-2
