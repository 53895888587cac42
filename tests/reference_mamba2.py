"""A float64 numpy Mamba-2 mixer written straight from docs/spec.md section 2 (no shared code)."""
import numpy as np

from reference import ssd_sequential


def softplus(x):
  return np.logaddexp(0.0, x)


def silu(x):
  return x / (1.0 + np.exp(-x))


def mamba2_mixer(u, p, *, d_inner, heads, head_dim, groups, d_state, eps):
  """u: [b, l, d]; p: dict of float64 parameters named as in Mamba2Mixer."""
  b, l, _ = u.shape
  gn = groups * d_state
  zxbcdt = u @ p["in_proj"]
  z = zxbcdt[..., :d_inner]
  xbc = zxbcdt[..., d_inner:2 * d_inner + 2 * gn]
  dt = zxbcdt[..., 2 * d_inner + 2 * gn:]
  k = p["conv_weight"].shape[0]
  padded = np.concatenate([np.zeros((b, k - 1, xbc.shape[-1])), xbc], axis=1)
  conv = np.stack([sum(padded[:, t + i] * p["conv_weight"][i] for i in range(k))
                   for t in range(l)], axis=1) + p["conv_bias"]
  xbc = silu(conv)
  x = xbc[..., :d_inner].reshape(b, l, heads, head_dim)
  B = xbc[..., d_inner:d_inner + gn].reshape(b, l, groups, d_state)
  C = xbc[..., d_inner + gn:].reshape(b, l, groups, d_state)
  dt = softplus(dt + p["dt_bias"])
  A = -np.exp(p["A_log"])
  y, _ = ssd_sequential(x, dt, A, B, C)
  y = (y + x * p["D"][:, None]).reshape(b, l, d_inner)
  gated = y * silu(z)
  grouped = gated.reshape(b, l, groups, d_inner // groups)
  normed = grouped / np.sqrt(np.mean(grouped ** 2, axis=-1, keepdims=True) + eps)
  y = normed.reshape(b, l, d_inner) * p["norm"]
  return y @ p["out_proj"]
