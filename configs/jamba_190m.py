"""Jamba-style baseline at 190M: taipan_190m's layout with full RoPE attention in place of each
SAL (Mamba-2 : attention = 6 : 1, no selection; docs/decisions.md says why not 1:7)."""
from taipan_jax.configs import taipan_190m


def get_config():
  cfg = taipan_190m.get_config()
  cfg.name = "jamba_190m"
  cfg.model.pattern = "mmmmmma"
  cfg.loss.budget_weight = 0.0
  return cfg
