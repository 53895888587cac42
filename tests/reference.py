"""Plain numpy float64 references that the JAX ops and models are tested against."""
import numpy as np


def ssd_sequential(x, dt, A, B, C, initial_state=None, segment_ids=None):
  """The SSD recurrence one step at a time, float64.

  x: [b, l, h, p], dt: [b, l, h], A: [h], B/C: [b, l, g, n]. Returns y [b, l, h, p] and the
  final state [b, h, p, n].
  """
  x, dt, A, B, C = (np.asarray(t, np.float64) for t in (x, dt, A, B, C))
  b, l, h, p = x.shape
  g, n = B.shape[-2:]
  rep = h // g
  state = (np.zeros((b, h, p, n)) if initial_state is None
           else np.asarray(initial_state, np.float64).copy())
  y = np.zeros_like(x)
  for t in range(l):
    if segment_ids is not None and t > 0:   # a new document starts from a zero state
      new_doc = np.asarray(segment_ids)[:, t] != np.asarray(segment_ids)[:, t - 1]
      state = np.where(new_doc[:, None, None, None], 0.0, state)
    Bh = np.repeat(B[:, t], rep, axis=1)
    Ch = np.repeat(C[:, t], rep, axis=1)
    decay = np.exp(dt[:, t] * A)[:, :, None, None]
    state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, :, None, :]
    y[:, t] = np.einsum("bhpn,bhn->bhp", state, Ch)
  return y, state


def window_attention_dense(q, k, v, select, window, kv_select=None, segment_ids=None, xp=np):
  """Dense masked softmax attention; rows with no selected query or no key are 0.

  xp=np: float64 numpy. xp=jax.numpy (inside `jax.enable_x64(True)`): the same in float64
  jax, for reference gradients. Masked scores are -1e30 rather than -inf so that rows with
  no key stay finite (and differentiable) in both.
  """
  if xp is np:
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  b, l, h, d = q.shape
  i = xp.arange(l)[:, None]
  j = xp.arange(l)[None, :]
  mask = xp.broadcast_to((j <= i) & (j > i - window), (b, l, l))
  if kv_select is not None:
    mask = mask & xp.asarray(kv_select, bool)[:, None, :]
  if segment_ids is not None:
    seg = xp.asarray(segment_ids)
    mask = mask & (seg[:, :, None] == seg[:, None, :])
  s = xp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(d)
  s = xp.where(mask[:, None], s, -1e30)
  p = xp.exp(s - s.max(-1, keepdims=True)) * mask[:, None]
  denom = p.sum(-1, keepdims=True)
  p = p / xp.where(denom > 0, denom, 1.0)
  return xp.einsum("bhij,bjhd->bihd", p, v) * xp.asarray(select, bool)[:, :, None, None]


def ssd_sequential_jax(x, dt, A, B, C, initial_state):
  """The same recurrence in jax (call inside `jax.enable_x64(True)` for float64 gradients)."""
  import jax
  import jax.numpy as jnp
  h, g = x.shape[2], B.shape[2]
  Bh = jnp.repeat(B, h // g, axis=2)
  Ch = jnp.repeat(C, h // g, axis=2)

  def step(state, inputs):
    xt, dtt, bt, ct = inputs
    state = (jnp.exp(dtt * A)[..., None, None] * state
             + (dtt[..., None] * xt)[..., None] * bt[:, :, None, :])
    return state, jnp.einsum("bhpn,bhn->bhp", state, ct)

  moved = [jnp.moveaxis(t, 1, 0) for t in (x, dt, Bh, Ch)]
  final, ys = jax.lax.scan(step, initial_state, moved)
  return jnp.moveaxis(ys, 0, 1), final
