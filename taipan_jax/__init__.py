"""taipan-jax: the reference JAX implementation of Taipan (arXiv 2410.18572).

    import taipan_jax
    from flax import nnx
    cfg = taipan_jax.load_config("configs/taipan_190m.py")
    model = taipan_jax.build_model(cfg, rngs=nnx.Rngs(0))
    logits, aux = model(tokens)          # [batch, seq] int32 -> [batch, seq, vocab] fp32
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from taipan_jax.config import ConfigError, load_config, validate
from taipan_jax.models import LanguageModel

__version__ = "0.1.0"


def build_model(cfg, *, rngs: nnx.Rngs) -> LanguageModel:
  """The LanguageModel a validated config describes, in training mode."""
  return LanguageModel(cfg, rngs=rngs)


def count_params(cfg) -> int:
  """Number of parameters (embedding padding included), via eval_shape: nothing allocated."""
  abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  return int(sum(np.prod(leaf.shape) for leaf in leaves))


__all__ = ["load_config", "validate", "build_model", "count_params", "ConfigError",
           "LanguageModel", "__version__"]

# Imported last: interop builds models through the functions above.
from taipan_jax import interop  # noqa: E402
