"""Jamba-style baseline at 450M: taipan_450m's layout with full RoPE attention in place of each SAL
(Mamba-2 : attention = 6 : 1, no selection; docs/decisions.md says why not 1:7)."""
from taipan_jax.configs import taipan_450m


def get_config():
  cfg = taipan_450m.get_config()
  cfg.name = "jamba_450m"
  cfg.model.pattern = "mmmmmma"
  cfg.model.num_units = 6
  cfg.loss.budget_weight = 0.0
  return cfg
