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
                               residual=None, mix=None, product_dtypes=None):
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
  if mix is not None:
    if residual is None:
      raise ValueError("mix blends the product into a residual: pass residual= too")
    if mix.shape != (b,):
      raise ValueError(f"mix {mix.shape} must be [{b}], one weight per row")
  if product_dtypes is not None and len(product_dtypes) != len(ws):
    raise ValueError(f"product_dtypes has {len(product_dtypes)} entries for {len(ws)} "
                     "weights: give one per weight")


def norm_matvec_reference(x, norm_weight, w, *, eps: float | None = None, dtype, gate=None,
                          group_size: int | None = None, residual=None, mix=None,
                          product_dtypes: tuple | None = None):
  """(residual +) RMSNorm(x [* silu(gate)]) @ w, for one token per row.

  x: [b, k]; gate: [b, >= k] (its first k columns); norm_weight: [k], or None to skip the
  normalisation (eps, the norm's epsilon, is needed only with a norm_weight); w: [k, n], or a
  tuple of weights that share the normalised row; residual: [b, n] fp32 (a single weight
  only); mix: [b], with a residual: residual + mix * (product - residual), a SAL's mix.
  The normalised row is rounded to `dtype` and multiplied in `dtype` (an nnx.Linear with that
  dtype), or for weight i in product_dtypes[i] (a fp32 gate beside bf16 projections: the
  row is still rounded to `dtype`, as the gate's input is); groups of group_size channels
  (default k) are normalised separately.
  Returns [b, n] (a tuple of [b, n_i] for a tuple of weights): in the product's dtype, or
  fp32 with a residual.
  """
  check_norm_matvec_operands(x, norm_weight, w, eps=eps, gate=gate, group_size=group_size,
                             residual=residual, mix=mix, product_dtypes=product_dtypes)
  u = x.astype(_F32)
  if gate is not None:
    u = u * jax.nn.silu(gate[:, :u.shape[1]].astype(_F32))
  if norm_weight is not None:
    u = _normalize(u, norm_weight, eps, group_size or u.shape[-1])
  xn = u.astype(dtype)
  ws = tuple(w) if isinstance(w, (tuple, list)) else (w,)
  products = tuple(
      jax.lax.dot_general(xn.astype(pd), wi.astype(pd), (((1,), (0,)), ((), ())))
      for wi, pd in zip(ws, product_dtypes or (dtype,) * len(ws)))
  if isinstance(w, (tuple, list)):
    return products
  y, = products
  if residual is None:
    return y
  res = residual.astype(_F32)
  if mix is None:
    return res + y.astype(_F32)
  return res + mix.astype(_F32)[:, None] * (y.astype(_F32) - res)


def check_mamba2_in_proj_operands(x, norm_weight, w_t, conv_state, conv_weight, conv_bias, *,
                                  d_inner):
  """Raises ValueError naming the operand whose shape disagrees (mamba2_in_proj_reference)."""
  if x.ndim != 2:
    raise ValueError(f"x {x.shape} must be [batch, d_model]: one token per row")
  b, k = x.shape
  if norm_weight.shape != (k,):
    raise ValueError(f"x {x.shape} and norm_weight {norm_weight.shape} disagree on d_model")
  if w_t.ndim != 2 or w_t.shape[1] != k:
    raise ValueError(f"in_proj transposed {w_t.shape} must be [outputs, d_model={k}] (pass "
                     "in_proj.kernel.T)")
  if conv_weight.ndim != 2:
    raise ValueError(f"conv_weight {conv_weight.shape} must be [d_conv, conv_dim]")
  d_conv, conv_dim = conv_weight.shape
  if conv_bias.shape != (conv_dim,):
    raise ValueError(f"conv_bias {conv_bias.shape} must be [{conv_dim}] (conv_weight "
                     f"{conv_weight.shape})")
  if conv_state.shape != (b, d_conv - 1, conv_dim):
    raise ValueError(f"conv_state {conv_state.shape} is not [{b}, {d_conv - 1}, "
                     f"{conv_dim}] (batch, d_conv - 1, conv_dim)")
  if w_t.shape[0] <= d_inner + conv_dim:
    raise ValueError(f"in_proj transposed {w_t.shape} has fewer outputs than z | x B C | dt: "
                     f"d_inner {d_inner} + conv_dim {conv_dim} + heads")


def _silu_conv(window, conv_weight, conv_bias, dtype):
  """window: [b, d_conv, channels] the last inputs, oldest first -> silu(conv), in dtype."""
  conv = jnp.einsum("bkc,kc->bc", window.astype(_F32), conv_weight.astype(_F32),
                    precision=jax.lax.Precision.HIGHEST) + conv_bias.astype(_F32)
  return jax.nn.silu(conv).astype(dtype)


def mamba2_in_proj_reference(x, norm_weight, w_t, conv_state, conv_weight, conv_bias, *,
                             eps: float, dtype, d_inner: int):
  """A Mamba-2 mixer's decode in-projection and causal convolution.

  x: [b, d_model] the residual stream; norm_weight: [d_model] the block's RMSNorm;
  w_t: [d_inner + conv_dim + heads, d_model] in_proj transposed (outputs z | x B C | dt; the
  kernel reads whole rows of it);
  conv_state: [b, d_conv - 1, conv_dim] the last inputs of the convolution;
  conv_weight: [d_conv, conv_dim]; conv_bias: [conv_dim].
  Returns (zxbcdt [b, d_inner + conv_dim + heads] in dtype, its x B C columns replaced by
  silu(conv) over the cached inputs and the new one; the new conv_state).
  """
  check_mamba2_in_proj_operands(x, norm_weight, w_t, conv_state, conv_weight, conv_bias,
                                d_inner=d_inner)
  conv_dim = conv_weight.shape[1]
  zxbcdt = norm_matvec_reference(x, norm_weight, w_t.T, eps=eps, dtype=dtype)
  z, xbc, dt = jnp.split(zxbcdt, [d_inner, d_inner + conv_dim], axis=1)
  window = jnp.concatenate([conv_state, xbc[:, None].astype(conv_state.dtype)], axis=1)
  xbc = _silu_conv(window, conv_weight, conv_bias, dtype)
  return jnp.concatenate([z, xbc, dt], axis=1), window[:, 1:]


def check_mamba2_ssm_out_operands(zxbcdt, ssm_state, dt_bias, A_log, D, norm_weight, w,
                                  residual, *, group_size, heads, head_dim, n_groups, d_state):
  """Raises ValueError naming the operand whose shape disagrees (mamba2_ssm_out_reference)."""
  d_inner = heads * head_dim
  if heads % n_groups:
    raise ValueError(f"heads={heads} is not a multiple of n_groups={n_groups}")
  width = 2 * d_inner + 2 * n_groups * d_state + heads
  b = zxbcdt.shape[0]
  if zxbcdt.shape != (b, width):
    raise ValueError(f"zxbcdt {zxbcdt.shape} is not [batch, {width}] for {heads} heads of "
                     f"{head_dim}, {n_groups} groups of d_state {d_state}")
  if ssm_state.shape != (b, heads, head_dim, d_state):
    raise ValueError(f"ssm_state {ssm_state.shape} is not [{b}, {heads}, {head_dim}, {d_state}]")
  for name, t in (("dt_bias", dt_bias), ("A_log", A_log), ("D", D)):
    if t.shape != (heads,):
      raise ValueError(f"{name} {t.shape} must be [{heads}] (one per head)")
  if norm_weight.shape != (d_inner,) or d_inner % group_size:
    raise ValueError(f"norm_weight {norm_weight.shape} must be [{d_inner}] in groups of "
                     f"group_size={group_size}, which must divide it")
  if w.ndim != 2 or w.shape[0] != d_inner:
    raise ValueError(f"out_proj {w.shape} must be [{d_inner}, d_model]")
  if residual.shape != (b, w.shape[1]):
    raise ValueError(f"residual {residual.shape} must be [{b}, {w.shape[1]}]")


def mamba2_ssm_out_reference(zxbcdt, ssm_state, dt_bias, A_log, D, norm_weight, w, residual, *,
                             eps: float, dtype, group_size: int, heads: int, head_dim: int,
                             n_groups: int, d_state: int):
  """A Mamba-2 mixer's decode token after mamba2_in_proj: the SSD state update, y = S C + D x,
  the gated RMSNorm and the out-projection, added to the residual.

  zxbcdt: [b, d_inner + conv_dim + heads] (z | x B C after the convolution | dt raw);
  ssm_state: [b, heads, head_dim, d_state] fp32; dt_bias, A_log, D: [heads];
  norm_weight: [d_inner], normalised in groups of group_size; w: [d_inner, d_model];
  residual: [b, d_model] fp32.
  Returns (residual + out [b, d_model] fp32, the new ssm_state).
  """
  check_mamba2_ssm_out_operands(zxbcdt, ssm_state, dt_bias, A_log, D, norm_weight, w, residual,
                                group_size=group_size, heads=heads, head_dim=head_dim,
                                n_groups=n_groups, d_state=d_state)
  d_inner = heads * head_dim
  gn = n_groups * d_state
  b = zxbcdt.shape[0]
  x = zxbcdt[:, d_inner:2 * d_inner].reshape(b, heads, head_dim).astype(_F32)
  B = zxbcdt[:, 2 * d_inner:2 * d_inner + gn].reshape(b, n_groups, d_state)
  C = zxbcdt[:, 2 * d_inner + gn:2 * d_inner + 2 * gn].reshape(b, n_groups, d_state)
  dt = jax.nn.softplus(zxbcdt[:, 2 * d_inner + 2 * gn:].astype(_F32) + dt_bias.astype(_F32))
  A = -jnp.exp(A_log.astype(_F32))
  rep = heads // n_groups
  Bh = jnp.repeat(B.astype(_F32), rep, axis=1)                 # [b, h, n]
  Ch = jnp.repeat(C.astype(_F32), rep, axis=1)
  decay = jnp.exp(dt * A)[..., None, None]
  state = decay * ssm_state.astype(_F32) + (x * dt[..., None])[..., :, None] * Bh[..., None, :]
  y = jnp.einsum("bhpn,bhn->bhp", state, Ch, precision=jax.lax.Precision.HIGHEST)
  y = y.astype(dtype).astype(_F32) + x * D.astype(_F32)[:, None]
  out = norm_matvec_reference(y.reshape(b, d_inner), norm_weight, w, eps=eps, dtype=dtype,
                              gate=zxbcdt, group_size=group_size, residual=residual)
  return out, state


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


def check_ring_attention_operands(q, k_new, v_new, k_cache, v_cache, filled, kept, pos, select):
  """Raises ValueError naming the operand whose shape disagrees (ring_attention_reference)."""
  if q.ndim != 3 or k_new.shape != q.shape or v_new.shape != q.shape:
    raise ValueError(f"q {q.shape}, k_new {k_new.shape} and v_new {v_new.shape} must all be "
                     "[batch, heads, head_dim]")
  b, h, d = q.shape
  if (k_cache.shape != v_cache.shape or k_cache.ndim != 4 or k_cache.shape[0] != b
      or k_cache.shape[2:] != (h, d)):
    raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must be "
                     f"[{b}, slots, {h}, {d}]")
  slots = k_cache.shape[1]
  for name, t in (("filled", filled), ("kept", kept)):
    if t.shape != (b, slots) or t.dtype != jnp.bool_:
      raise ValueError(f"{name} {t.shape} {t.dtype} must be bool [{b}, {slots}]")
  for name, t in (("pos", pos), ("select", select)):
    if t.shape != (b,):
      raise ValueError(f"{name} {t.shape} must be [{b}], one per row")


def ring_attention_reference(q, k_new, v_new, k_cache, v_cache, filled, kept, pos, select, *,
                             kv_selected_only: bool = False):
  """A SAL's decode step on its ring buffer: the token's key and value into slot
  pos % slots (filled, kept if selected), pos + 1, then its query against the filled slots
  (the kept ones with kv_selected_only), zeros for unselected rows.

  q, k_new, v_new: [b, heads, head_dim]; k_cache, v_cache: [b, slots, heads, head_dim];
  filled, kept: [b, slots] bool; pos: [b] int32; select: [b] float mask (> 0.5: selected).
  Returns (out [b, heads, head_dim] in q.dtype, (k_cache, v_cache, filled, kept, pos + 1)).
  """
  check_ring_attention_operands(q, k_new, v_new, k_cache, v_cache, filled, kept, pos, select)
  rows = jnp.arange(q.shape[0])
  slot = pos % k_cache.shape[1]
  selected = select > 0.5
  k_cache = k_cache.at[rows, slot].set(k_new.astype(k_cache.dtype))
  v_cache = v_cache.at[rows, slot].set(v_new.astype(v_cache.dtype))
  filled = filled.at[rows, slot].set(True)
  kept = kept.at[rows, slot].set(selected)
  out = window_attention_reference(q, k_cache, v_cache, kept if kv_selected_only else filled,
                                   selected)
  return out, (k_cache, v_cache, filled, kept, pos + 1)
