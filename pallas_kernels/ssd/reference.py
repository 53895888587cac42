"""The SSD as its plain recurrence, one position at a time: the ground truth for kernels.

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T      S: [head_dim, d_state]
    y_t = S_t C_t
A position whose segment id differs from the previous one starts from S = 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ssd_reference(x, dt, A, B, C, *, initial_state=None, segment_ids=None):
  """x: [b, l, h, p]; dt: [b, l, h]; A: [h]; B, C: [b, l, g, n]; initial_state
  [b, h, p, n]; segment_ids [b, l] int. Returns (y [b, l, h, p], final state [b, h, p, n]),
  computed and returned in fp32, or float64 for float64 inputs (under jax.enable_x64: the
  tests' oracle for the XLA path and the kernels alike)."""
  b, l, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  rep = h // g
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  f32 = lambda t: jnp.asarray(t).astype(dtype)
  Bh = jnp.repeat(f32(B), rep, axis=2)                 # [b, l, h, n]
  Ch = jnp.repeat(f32(C), rep, axis=2)
  state = (jnp.zeros((b, h, p, n), dtype) if initial_state is None
           else f32(initial_state))
  seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else segment_ids
  prev = jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1)
  hi = jax.lax.Precision.HIGHEST

  def step(state, inputs):
    xt, dtt, bt, ct, reset = inputs
    state = jnp.where(reset[:, None, None, None], 0.0, state)
    decay = jnp.exp(dtt * f32(A))[:, :, None, None]
    state = decay * state + (dtt[:, :, None] * xt)[..., None] * bt[:, :, None, :]
    y = jnp.einsum("bhpn,bhn->bhp", state, ct, precision=hi)
    return state, y

  xs = (jnp.moveaxis(f32(x), 1, 0), jnp.moveaxis(f32(dt), 1, 0), jnp.moveaxis(Bh, 1, 0),
        jnp.moveaxis(Ch, 1, 0), jnp.moveaxis(seg != prev, 1, 0))
  state, ys = jax.lax.scan(step, state, xs)
  return jnp.moveaxis(ys, 0, 1), state
