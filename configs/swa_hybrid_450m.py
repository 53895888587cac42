"""SWA-only hybrid at 450M: taipan_450m's layout with every token selected and no budget loss."""
from taipan_jax.configs import taipan_450m


def get_config():
  cfg = taipan_450m.get_config()
  cfg.name = "swa_hybrid_450m"
  cfg.sal.selection = "all"
  cfg.loss.budget_weight = 0.0
  return cfg
