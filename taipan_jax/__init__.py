"""taipan-jax: the reference JAX implementation of Taipan (arXiv 2410.18572).

    import taipan_jax
    from flax import nnx
    cfg = taipan_jax.load_config("configs/taipan_190m.py")
    model = taipan_jax.build_model(cfg, rngs=nnx.Rngs(0))
    logits, aux = model(tokens)          # [batch, seq] int32 -> [batch, seq, vocab] fp32
"""
from __future__ import annotations

import importlib

from taipan_jax.config import ConfigError, load_config, validate

__version__ = "0.1.0"


def build_model(cfg, *, rngs) -> "LanguageModel":
  """The LanguageModel a validated config describes, in training mode."""
  from taipan_jax.models import LanguageModel
  return LanguageModel(cfg, rngs=rngs)


def count_params(cfg) -> int:
  """Number of parameters (embedding padding included), via eval_shape: nothing allocated."""
  import jax
  import numpy as np
  from flax import nnx
  abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  return int(sum(np.prod(leaf.shape) for leaf in leaves))


# jax is imported on first use, not with the package: `taipan --help` answers in a blink.
_LAZY = {"LanguageModel": "taipan_jax.models", "interop": "taipan_jax.interop"}


def __getattr__(name):
  if name in _LAZY:
    module = importlib.import_module(_LAZY[name])
    return module if module.__name__.endswith(name) else getattr(module, name)
  raise AttributeError(f"module 'taipan_jax' has no attribute {name!r}")


__all__ = ["load_config", "validate", "build_model", "count_params", "ConfigError",
           "LanguageModel", "__version__"]
