"""SWA-only hybrid at 1.3B: taipan_1_3b's layout with every token selected and no budget loss."""
from taipan_jax.configs import taipan_1_3b


def get_config():
  cfg = taipan_1_3b.get_config()
  cfg.name = "swa_hybrid_1_3b"
  cfg.sal.selection = "all"
  cfg.loss.budget_weight = 0.0
  return cfg
