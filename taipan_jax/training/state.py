"""The training state: everything a checkpoint holds besides the data iterator's position."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class TrainState(NamedTuple):
  """A pytree. The Gumbel key of step s is fold_in(key(seed), s): saving `step` saves it.

  step: int32 scalar, optimizer steps taken (skipped non-finite steps included).
  params: nnx.State of the model's Params (fp32 by default).
  opt_state: the optax state.
  nonfinite_run: int32, non-finite steps in a row (reset by a finite one).
  nonfinite_total: int32, non-finite steps skipped so far.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_run: jax.Array
  nonfinite_total: jax.Array

  @classmethod
  def create(cls, params, tx) -> "TrainState":
    # Three separate buffers: the train step donates the state, and a buffer may be donated
    # only once.
    zero = lambda: jnp.zeros((), jnp.int32)
    return cls(step=zero(), params=params, opt_state=tx.init(params), nonfinite_run=zero(),
               nonfinite_total=zero())


def all_finite(tree) -> bool:
  """True when every floating leaf of the tree is finite (checked before a checkpoint)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))
