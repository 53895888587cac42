"""Mamba-2 baseline at 190M: 24 Mamba-2 blocks, no attention, no MLP."""
from taipan_jax.configs import base


def get_config():
  cfg = base.get_config()
  cfg.name = "mamba2_190m"
  cfg.model.d_model = 768
  cfg.model.pattern = "m"
  cfg.model.num_units = 24
  cfg.loss.budget_weight = 0.0
  return cfg
