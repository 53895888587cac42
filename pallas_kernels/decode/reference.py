"""Plain jnp forms of the decode kernels: the ground truth they are tested against, and the
path every backend without the kernels takes (their numerics are the model's own layers')."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _normalize(u, weight, eps, group_size):
  """u: [b, k] fp32 -> RMS-normalised in groups of group_size, times weight, fp32."""
  b, k = u.shape
  grouped = u.reshape(b, k // group_size, group_size)
  grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + eps)
  return grouped.reshape(b, k) * weight.astype(_F32)


def check_norm_matvec_operands(x, norm_weight, w, *, eps=None, gate=None, group_size=None,
                               residual=None):
  """Raises ValueError naming the operand whose shape disagrees (see norm_matvec_reference)."""
  if x.ndim != 2:
    raise ValueError(f"x {x.shape} must be [batch, k]: one token per row")
  b, k = x.shape
  ws = tuple(w) if isinstance(w, (tuple, list)) else (w,)
  if not ws:
    raise ValueError("norm_matvec needs at least one weight")
  if gate is not None and (gate.ndim != 2 or gate.shape[0] != b or gate.shape[1] < k):
    raise ValueError(f"gate {gate.shape} must be [{b}, >= {k}]")
  if norm_weight is None:
    if group_size is not None:
      raise ValueError(f"group_size={group_size} needs a norm_weight: without one nothing is "
                       "normalised")
  else:
    if eps is None:
      raise ValueError("a norm_weight needs its eps (the RMSNorm's epsilon)")
    if norm_weight.shape != (k,):
      raise ValueError(f"x {x.shape} and norm_weight {norm_weight.shape} disagree on the "
                       "channel count")
    if k % (group_size or k):
      raise ValueError(f"group_size={group_size} does not divide the {k} channels")
  for wi in ws:
    if wi.ndim != 2 or wi.shape[0] != k:
      raise ValueError(f"x {x.shape} and w {wi.shape} disagree on the channel count")
  if residual is not None:
    if isinstance(w, (tuple, list)):
      raise ValueError("a residual is added to a single product: pass one weight, not "
                       f"{len(ws)} in a tuple")
    if residual.shape != (b, ws[0].shape[1]):
      raise ValueError(f"residual {residual.shape} must be [{b}, {ws[0].shape[1]}]")


def norm_matvec_reference(x, norm_weight, w, *, eps: float | None = None, dtype, gate=None,
                          group_size: int | None = None, residual=None):
  """(residual +) RMSNorm(x [* silu(gate)]) @ w, for one token per row.

  x: [b, k]; gate: [b, >= k] (its first k columns); norm_weight: [k], or None to skip the
  normalisation (eps, the norm's epsilon, is needed only with a norm_weight); w: [k, n], or a
  tuple of weights that share the normalised row; residual: [b, n] fp32 (a single weight
  only).
  The normalised row is rounded to `dtype` and multiplied in `dtype` (an nnx.Linear with that
  dtype); groups of group_size channels (default k) are normalised separately.
  Returns [b, n] (a tuple of [b, n_i] for a tuple of weights): in `dtype`, or fp32 (residual
  + the product) with a residual.
  """
  check_norm_matvec_operands(x, norm_weight, w, eps=eps, gate=gate, group_size=group_size,
                             residual=residual)
  u = x.astype(_F32)
  if gate is not None:
    u = u * jax.nn.silu(gate[:, :u.shape[1]].astype(_F32))
  if norm_weight is not None:
    u = _normalize(u, norm_weight, eps, group_size or u.shape[-1])
  xn = u.astype(dtype)
  product = lambda wi: jax.lax.dot_general(xn, wi.astype(dtype), (((1,), (0,)), ((), ())))
  if isinstance(w, (tuple, list)):
    return tuple(product(wi) for wi in w)
  y = product(w)
  if residual is None:
    return y
  return residual.astype(_F32) + y.astype(_F32)


def mamba2_step_reference(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log,
                          D, *, heads: int, head_dim: int, n_groups: int, d_state: int):
  """One token of a Mamba-2 mixer between its two projections.

  zxbcdt: [b, d_inner + conv_dim + heads] the in-projection, split z | x B C | dt.
  conv_state: [b, d_conv - 1, conv_dim] the last inputs of the causal convolution.
  ssm_state: [b, heads, head_dim, d_state] fp32.
  conv_weight: [d_conv, conv_dim]; conv_bias: [conv_dim]; dt_bias, A_log, D: [heads].
  Returns (y [b, d_inner] fp32 = SSD output + D x, new conv_state, new ssm_state).
  """
  d_inner = heads * head_dim
  conv_dim = d_inner + 2 * n_groups * d_state
  b = zxbcdt.shape[0]
  dtype = conv_state.dtype
  xbc = zxbcdt[:, d_inner:d_inner + conv_dim]
  dt = zxbcdt[:, d_inner + conv_dim:]
  window = jnp.concatenate([conv_state, xbc[:, None].astype(dtype)], axis=1)
  conv = jnp.einsum("bkc,kc->bc", window.astype(_F32), conv_weight.astype(_F32),
                    precision=jax.lax.Precision.HIGHEST) + conv_bias.astype(_F32)
  xbc = jax.nn.silu(conv).astype(dtype)
  x = xbc[:, :d_inner].reshape(b, heads, head_dim)
  B = xbc[:, d_inner:d_inner + n_groups * d_state].reshape(b, n_groups, d_state)
  C = xbc[:, d_inner + n_groups * d_state:].reshape(b, n_groups, d_state)
  dt = jax.nn.softplus(dt.astype(_F32) + dt_bias.astype(_F32))
  A = -jnp.exp(A_log.astype(_F32))
  rep = heads // n_groups
  Bh = jnp.repeat(B.astype(_F32), rep, axis=1)                 # [b, h, n]
  Ch = jnp.repeat(C.astype(_F32), rep, axis=1)
  decay = jnp.exp(dt * A)[..., None, None]
  xdt = x.astype(_F32) * dt[..., None]
  state = decay * ssm_state.astype(_F32) + xdt[..., :, None] * Bh[..., None, :]
  y = jnp.einsum("bhpn,bhn->bhp", state, Ch, precision=jax.lax.Precision.HIGHEST)
  y = y.astype(dtype).astype(_F32) + x.astype(_F32) * D.astype(_F32)[:, None]
  return y.reshape(b, d_inner), window[:, 1:], state


def window_attention_reference(q, k_cache, v_cache, valid, active=None):
  """softmax(q k^T / sqrt(d)) v over the valid slots, fp32 statistics; zeros for rows with no
  valid slot and for inactive rows.

  q: [b, heads, head_dim]; k_cache, v_cache: [b, slots, heads, head_dim]; valid: [b, slots]
  bool; active: optional [b] bool. Returns [b, heads, head_dim] in q.dtype.
  """
  prec = jax.lax.Precision.HIGHEST if q.dtype == _F32 else jax.lax.Precision.DEFAULT
  s = jnp.einsum("bhd,bshd->bhs", q, k_cache, precision=prec,
                 preferred_element_type=_F32) * (1.0 / math.sqrt(q.shape[-1]))
  s = jnp.where(valid[:, None, :], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))      # masked slots: exp(-inf) = 0
  total = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("bhs,bshd->bhd", p.astype(v_cache.dtype), v_cache, precision=prec,
                   preferred_element_type=_F32)
  if active is not None:
    out = out * active[:, None, None]
  return out.astype(q.dtype)
