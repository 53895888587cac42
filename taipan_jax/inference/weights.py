"""Matmul weights in their compute dtype for decoding, cast once instead of once per token."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def cast_matmul_weights(model):
  """Stores every nnx.Linear / nnx.Embed parameter in the dtype the layer computes in.

  Those layers cast their parameters to `dtype` on every call, so this changes no result.
  Inside a decode loop it matters: the per-call cast re-reads the fp32 weights each token
  (XLA does not hoist it out of the loop), twice the bytes of the weights themselves. Call it
  on the model merged inside the jitted function, before the loop, so the trained fp32 copy
  is left alone. Returns the model, changed in place.
  """
  for _, module in nnx.iter_graph(model):
    if not isinstance(module, (nnx.Linear, nnx.Embed)) or module.dtype is None:
      continue
    dtype = jnp.dtype(module.dtype)
    for name in ("kernel", "bias", "embedding"):
      param = getattr(module, name, None)
      if isinstance(param, nnx.Param) and jnp.issubdtype(param[...].dtype, jnp.floating):
        param.set_value(param[...].astype(dtype))
  return model
