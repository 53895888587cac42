"""Jamba-style baseline at 190M: Mamba-2 and full RoPE attention at 1:7, no selection."""
from taipan_jax.configs import base


def get_config():
  cfg = base.get_config()
  cfg.name = "jamba_190m"
  cfg.model.d_model = 768
  cfg.model.pattern = "mmmmmmma"
  cfg.model.num_units = 3
  cfg.loss.budget_weight = 0.0
  return cfg
