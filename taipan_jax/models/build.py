"""The model a config describes, and its size without building it."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from taipan_jax.models.lm import LanguageModel


def build_model(cfg, *, rngs: nnx.Rngs) -> LanguageModel:
  """The LanguageModel a validated config describes, in training mode."""
  return LanguageModel(cfg, rngs=rngs)


def count_params(cfg) -> int:
  """Number of parameters (embedding padding included), via eval_shape: nothing allocated."""
  abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  return int(sum(np.prod(leaf.shape) for leaf in leaves))
