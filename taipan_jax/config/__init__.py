"""Load and validate configs once; derive the sizes the model needs from them.

A config is an `ml_collections.ConfigDict` returned by a `get_config()` file in `configs/`.
`validate` checks it against the schema in `configs/base.py` and against the model's shape
rules, and raises `ConfigError` with one line that names the key, the value and the fix.
Code downstream reads validated fields directly and never guesses defaults.

The lowest layer of taipan_jax (tests/test_architecture.py): it imports none of the rest.
"""
from taipan_jax.config.axes import LOGICAL_AXES, MESH_AXES, RulesError, parse_rules
from taipan_jax.config.errors import ConfigError
from taipan_jax.config.load import bundled_configs, load_config, parse_overrides
from taipan_jax.config.sizes import (layer_kinds, mlp_hidden_size, padded_vocab_size,
                                     residual_branches)
from taipan_jax.config.validation import (DTYPES, INFERENCE_SELECTIONS, KERNELS, LAYER_KINDS,
                                          validate)

__all__ = ["ConfigError", "DTYPES", "INFERENCE_SELECTIONS", "KERNELS", "LAYER_KINDS", "LOGICAL_AXES", "MESH_AXES",
           "RulesError", "bundled_configs", "layer_kinds", "load_config", "mlp_hidden_size",
           "padded_vocab_size", "parse_overrides", "parse_rules", "residual_branches",
           "validate"]
