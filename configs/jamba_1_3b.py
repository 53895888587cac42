"""Jamba-style baseline at 1.3B: taipan_1_3b's layout with full RoPE attention in place of each SAL
(Mamba-2 : attention = 6 : 1, no selection; docs/decisions.md says why not 1:7)."""
from taipan_jax.configs import taipan_1_3b


def get_config():
  cfg = taipan_1_3b.get_config()
  cfg.name = "jamba_1_3b"
  cfg.model.pattern = "mmmmmma"
  cfg.model.num_units = 5
  cfg.loss.budget_weight = 0.0
  return cfg
