"""RMSNorm and Mamba-2's gated RMSNorm; statistics always in fp32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from taipan_jax.sharding import with_axes


def _rms_normalize(x, eps):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * w.  x: [..., dim] -> [..., dim] in `dtype`."""

  def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), **with_axes("norm"))

  def __call__(self, x):
    y = _rms_normalize(x, self.eps) * self.weight[...].astype(jnp.float32)
    return y.astype(self.dtype)


class GatedRMSNorm(nnx.Module):
  """Mamba-2's output norm with norm_before_gate=False: rmsnorm(y * silu(z)) * w.

  Normalised in groups of `group_size` channels (d_inner / n_groups), as mamba_ssm does.
  y, z: [..., dim] -> [..., dim] in `dtype`.
  """

  def __init__(self, dim: int, *, group_size: int, eps: float = 1e-5, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.eps = eps
    self.group_size = group_size
    self.dtype = dtype
    # Mamba-2's gated norm spans d_inner, split like the out-projection's input.
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), **with_axes("mamba_inner"))

  def __call__(self, y, z):
    gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    shape = gated.shape
    grouped = gated.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
    out = _rms_normalize(grouped, self.eps).reshape(shape)
    return (out * self.weight[...].astype(jnp.float32)).astype(self.dtype)
