"""Mamba-2 baseline at 450M: 46 Mamba-2 blocks, no attention, no MLP (parameters within 3% of taipan_450m)."""
from taipan_jax.configs import taipan_450m


def get_config():
  cfg = taipan_450m.get_config()
  cfg.name = "mamba2_450m"
  cfg.model.pattern = "m"
  cfg.model.num_units = 46
  cfg.loss.budget_weight = 0.0
  return cfg
