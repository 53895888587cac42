"""taipan-jax: the reference JAX implementation of Taipan (arXiv 2410.18572).

    import taipan_jax
    from flax import nnx
    cfg = taipan_jax.load_config("configs/taipan_190m.py")
    model = taipan_jax.build_model(cfg, rngs=nnx.Rngs(0))
    logits, aux = model(tokens)          # [batch, seq] int32 -> [batch, seq, vocab] fp32

The import surface only: everything here is defined in a subpackage.
"""
from __future__ import annotations

import importlib

from taipan_jax.config import ConfigError, load_config, validate
from taipan_jax.version import __version__

# Re-exported, and imported on first use, not with the package (jax with them): `taipan
# --help` answers in a blink.
_LAZY = {"LanguageModel": "taipan_jax.models", "build_model": "taipan_jax.models",
         "count_params": "taipan_jax.models", "interop": "taipan_jax.interop"}


def __getattr__(name):
  if name in _LAZY:
    module = importlib.import_module(_LAZY[name])
    return module if module.__name__.endswith(name) else getattr(module, name)
  raise AttributeError(f"module 'taipan_jax' has no attribute {name!r}")


__all__ = ["load_config", "validate", "build_model", "count_params", "ConfigError",
           "LanguageModel", "interop", "__version__"]
