"""Random inputs for the kernel tests; imports no taipan_jax, as the kernel packages do not."""
import jax.numpy as jnp
import numpy as np


def ssd_inputs(rng, b, l, h, p, g, n, dtype=jnp.float32):
  """x [b, l, h, p], dt, A, B, C [b, l, g, n] and an initial state, at Mamba-2-like scales."""
  x = jnp.asarray(rng.standard_normal((b, l, h, p)), dtype)
  dt = jnp.asarray(rng.uniform(0.01, 0.5, (b, l, h)), jnp.float32)
  A = -jnp.asarray(rng.uniform(0.5, 8.0, (h,)), jnp.float32)
  B = jnp.asarray(rng.standard_normal((b, l, g, n)) / np.sqrt(n), dtype)
  C = jnp.asarray(rng.standard_normal((b, l, g, n)), dtype)
  init = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)
  return x, dt, A, B, C, init


def ssd_segments(rng, b, l, first_id=1):
  """[b, l] contiguous runs of ids (packed documents) at random boundaries, from first_id."""
  cuts = np.sort(rng.choice(np.arange(1, l), size=(b, 3)), axis=1)
  seg = np.zeros((b, l), np.int32)
  for r in range(b):
    for c in cuts[r]:
      seg[r, c:] += 1
  return jnp.asarray(seg + first_id)
