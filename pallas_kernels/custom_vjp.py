"""The one thin `jax.custom_vjp` every differentiable kernel package wraps its forward and
backward kernels in."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np


def kernel_vjp(forward: Callable, backward: Callable, *, differentiable: int) -> Callable:
  """op(statics, *arrays) -> outputs, differentiable in arrays[:differentiable].

  forward(statics, *arrays) -> (outputs, saved): saved are residuals besides the inputs
    (e.g. the output and its log-sum-exp), () when the backward needs only the inputs.
  backward(statics, arrays, saved, cotangents) -> gradients of arrays[:differentiable],
    cast here to their primal's dtype.
  statics: hashable (block sizes, interpret); the arrays after `differentiable` are integer
  (positions, segment ids) and get no gradient.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def op(statics, *arrays):
    return forward(statics, *arrays)[0]

  def op_fwd(statics, *arrays):
    outputs, saved = forward(statics, *arrays)
    return outputs, (arrays, saved)

  def op_bwd(statics, residuals, cotangents):
    arrays, saved = residuals
    grads = backward(statics, arrays, saved, cotangents)
    return (*(g.astype(a.dtype) for g, a in zip(grads, arrays[:differentiable])),
            *(np.zeros(a.shape, jax.dtypes.float0) for a in arrays[differentiable:]))

  op.defvjp(op_fwd, op_bwd)
  return op
