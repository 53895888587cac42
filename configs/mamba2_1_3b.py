"""Mamba-2 baseline at 1.3B: 39 Mamba-2 blocks, no attention, no MLP (parameters within 3% of taipan_1_3b)."""
from taipan_jax.configs import taipan_1_3b


def get_config():
  cfg = taipan_1_3b.get_config()
  cfg.name = "mamba2_1_3b"
  cfg.model.pattern = "m"
  cfg.model.num_units = 39
  cfg.loss.budget_weight = 0.0
  return cfg
