"""Weights for a decode loop, cast and laid out once instead of once per token."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from taipan_jax.models.mamba2 import Mamba2Mixer


def cast_matmul_weights(model):
  """Stores every nnx.Linear / nnx.Embed parameter in the dtype the layer computes in.

  Those layers cast their parameters to `dtype` on every call, so this changes no result.
  Inside a decode loop it matters: the per-call cast re-reads the fp32 weights each token
  (XLA does not hoist it out of the loop), twice the bytes of the weights themselves. Call it
  on a copy (nnx.merge of the split model) so that the trained fp32 weights are left alone.
  Returns the model, changed in place.
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


def prepare_decode_weights(model):
  """cast_matmul_weights, then the layouts the decode kernels read: each Mamba-2 mixer's
  in_proj transposed (Mamba2Mixer.prepare_decode). Changes no result, of the decode step or
  of the parallel forward. Call it once on a copy of the model, outside the jitted decode
  function, as Generator does when it is built: inside that function the casts and the
  transpose would run again on every call (a chunk of tokens), re-reading every weight.
  Returns the model, changed in place."""
  cast_matmul_weights(model)
  mixers = [m for _, m in nnx.iter_graph(model) if isinstance(m, Mamba2Mixer)]
  for mixer in mixers:
    mixer.prepare_decode()
  return model


def split_for_decode(model):
  """(graphdef, state) of a copy of `model` with prepare_decode_weights applied; the model
  itself is left as it is."""
  return nnx.split(prepare_decode_weights(nnx.merge(*nnx.split(model))))
